"""Live re-planning: the schedule follows the link and the machine while the job runs.

A schedule is planned from a profile taken before training; then the WAN slows down, a
neighbour starts using the cores, and the plan is priced for a world that is gone. With
``train.replan_every = N`` the trainer, every N periods, refreshes the profile from the job's
own observed timings (``DreamDDP(record_timings=True)``: each unit's ready time and each
bucket's transfer, ``profiler.refresh``), plans a new schedule on rank 0, broadcasts it, and
every rank switches at the same period boundary (with ``train.period = "auto"`` the period
is chosen again, and a new H starts its first period there). Every rank therefore runs the same
collectives in the same order, and the switch lands between periods, where every unit of the
old schedule has just been averaged once. Checkpoints record the schedule in force, and a
resume restores it (``Strategy.schedule_in_state``).

Only rank 0's timings are used: one rank's view is enough to price the shared link, and
planning on every rank from different timings could give different schedules.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch.distributed as dist

from dreamddp.core.schedule import Schedule
from dreamddp.planning import auto_period, plan, simulate
from dreamddp.planning.compression import auto_within, priced_for
from dreamddp.planning.profile import Profile
from dreamddp.planning.two_level import priced_two_level, two_level_of
from dreamddp.training.distributed import rank_zero_object
from dreamddp.training.schedules import check_profile_units
from profiler.observed import refresh

__all__ = ["Replanner"]

logger = logging.getLogger(__name__)


class Replanner:
    """Re-plans a ``PartialLocalSGD`` strategy's schedule every ``every`` periods."""

    def __init__(self, strategy: Any, profile_path: str, every: int) -> None:
        self.strategy = strategy
        self.every = every
        try:
            # Every re-plan refreshes this profile (not the last refresh): a resumed job, which
            # starts again from the file, then plans exactly as the uninterrupted one would.
            self.profile = Profile.from_json(profile_path)
            check_profile_units(self.profile, strategy.raw_model)
        except (OSError, ValueError) as err:
            raise ValueError(f"train.profile {profile_path!r} cannot seed re-planning: {err}") from None
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def due(self) -> bool:
        """At every ``every``-th boundary of the current period (counted from where its H began)."""
        ddp = self.strategy.ddp
        since = ddp.iteration - ddp.period_origin
        period = self.strategy.period
        return since > 0 and since % period == 0 and (since // period) % self.every == 0

    def maybe_replan(self, steps_done: int) -> dict[str, Any] | None:
        """Collective at a re-planning boundary: every rank gets rank 0's decision; a log record back.

        The schedule changes only when the new one is predicted faster on the refreshed profile.
        If planning fails on rank 0 (say, too few observed iterations), every rank keeps its
        schedule and the record says why: the others never wait on a broadcast that is not coming.
        """
        if not self.due():
            return None
        record = rank_zero_object(self._plan_or_error)
        summary: dict[str, Any] = {key: value for key, value in record.items() if key != "schedule"}
        summary["step"] = steps_done
        if "error" in record:
            summary["switched"] = False
            if self.rank == 0:
                logger.warning(
                    "re-planning at iteration %d failed (%s): keeping the schedule", steps_done, record["error"]
                )
            return {"event": "replan", **summary}
        summary["switched"] = record["predicted_iter_s"] < record["previous_predicted_iter_s"]
        if summary["switched"]:
            self.strategy.switch_schedule(Schedule.from_dict(record["schedule"]))
        if self.rank == 0:
            logger.info(
                "re-planned at iteration %d from %d observed iterations: %s (predicted %.4f s/iteration; the "
                "schedule in force, on the refreshed profile: %.4f)",
                steps_done,
                record["observed_iterations"],
                "switched" if summary["switched"] else "kept the schedule in force",
                record["predicted_iter_s"],
                record["previous_predicted_iter_s"],
            )
        return {"event": "replan", **summary}

    def _plan_or_error(self) -> dict[str, Any]:
        try:
            return self._plan_from_observations()
        except (ValueError, RuntimeError, ArithmeticError) as err:
            return {"error": f"{type(err).__name__}: {err}"}

    def _plan_from_observations(self) -> dict[str, Any]:
        observed = self.strategy.observed_timings()[-self.every * self.strategy.period :]
        refreshed = refresh(self.profile, observed)
        # Observed buckets carry the bytes really sent (compressed): the refit prices a wire byte.
        options = self.strategy.ddp.sync
        refreshed = priced_for(refreshed, options)
        two_level = two_level_of(self.profile)
        if two_level is not None and self.strategy.ddp.topology is not None:
            # Two-level buckets report their cross-site shard: the refit is the cross-site model.
            assert refreshed.comm is not None
            measured = dataclasses.replace(two_level, cross=refreshed.comm)
            refreshed = priced_two_level(refreshed, measured)
        current: Schedule = self.strategy.schedule
        overlap = self.strategy.ddp.overlap  # the mode the wrapper runs (train.overlap may override the file's)
        max_delay = max(current.delays.values(), default=0) if overlap == "forward" else 0
        auto = self.strategy.cfg.period == "auto"  # re-choose H too: a slower link may want a longer period
        period = auto_period(refreshed, overlap, max_delay, within=auto_within(options)) if auto else current.period
        schedule = plan(refreshed, period, overlap=overlap, max_delay=max_delay)
        return {
            "schedule": schedule.to_dict(),
            "observed_iterations": len(observed),
            "period": schedule.period,
            "predicted_iter_s": simulate(refreshed, schedule).iteration_s,
            "previous_predicted_iter_s": simulate(refreshed, current, overlap=overlap).iteration_s,
            "alpha_s": refreshed.comm.alpha_s if refreshed.comm is not None else None,
            "beta_s_per_byte": refreshed.comm.beta_s_per_byte if refreshed.comm is not None else None,
        }

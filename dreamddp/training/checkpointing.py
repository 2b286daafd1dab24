"""What a training checkpoint holds, when the trainer writes one, and resuming from the latest.

The file format and the commit protocol are ``dreamddp.ops.checkpoint``'s; this module only
decides the contents (strategy state, LR schedule, RNG streams, progress) and the moments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dreamddp.core.units import sync_units
from dreamddp.ops.checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng, unit_signatures
from dreamddp.training.config import ExperimentConfig
from dreamddp.training.distributed import agree
from dreamddp.training.evaluation import averaged_state
from dreamddp.training.resume_policy import ResumeChanges, apply_hyperparameters, compare_configs
from dreamddp.training.strategies import Strategy

__all__ = ["ResumePoint", "TrainingCheckpoints"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePoint:
    """Where training starts: iteration 0, or the latest checkpoint's."""

    step: int = 0
    train_time_s: float = 0.0  # training time already spent (evaluation excluded)


class TrainingCheckpoints:
    """The run's checkpoints; without ``train.checkpoint_dir`` every call does nothing."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        strategy: Strategy,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        device: torch.device,
    ) -> None:
        tc = cfg.train
        self.cfg, self.strategy, self.lr_scheduler, self.device = cfg, strategy, lr_scheduler, device
        self.checkpointer = (
            Checkpointer.for_process_group(tc.checkpoint_dir, tc.checkpoint_keep) if tc.checkpoint_dir else None
        )

    def _identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to be resumed exactly."""
        identity = {
            "units": unit_signatures(sync_units(self.strategy.raw_model)),
            "algorithm": self.cfg.train.algorithm,
            "schedule": self.strategy.schedule_record(),
        }
        if self.strategy.schedule_in_state:  # re-planned while running: the checkpoint's schedule is restored
            del identity["schedule"]
        return identity

    def resume(self) -> ResumePoint:
        """Load the newest checkpoint that verifies, if any, into the strategy, LR schedule and RNGs.

        The saved run's config is compared with this one first (``resume_policy``): a change that
        would load another run's state is refused naming every such key; the rest is applied,
        each named in one notice line.
        """
        if self.checkpointer is None:
            return ResumePoint()
        checkpointer, tc = self.checkpointer, self.cfg.train
        step = checkpointer.agreed_resume_step(self.device)
        if step is None:
            return ResumePoint()
        changes = agree(lambda: self._compare(step))

        def load() -> dict[str, Any]:
            state = checkpointer.load(step, self._identity())
            if step > tc.steps:
                raise CheckpointError(
                    f"checkpoint in {tc.checkpoint_dir!r} is at iteration {step}, past train.steps={tc.steps}"
                )
            return state

        state = agree(load)  # one rank's unreadable file stops every rank with its line
        self.strategy.load_checkpoint_state(state)
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        apply_hyperparameters(changes.applied_keys, tc, self.strategy.optimizer, self.lr_scheduler)
        restore_rng(state["rng"])
        progress = dict(state.get("progress", {}))
        if checkpointer.rank == 0:
            for line in changes.accepted:
                logger.warning("resuming at iteration %d with %s (changed since the checkpoint)", step, line)
        logger.info("resuming from the checkpoint at iteration %d in %s", step, tc.checkpoint_dir)
        return ResumePoint(step, float(progress.get("train_time_s", 0.0)))

    def _compare(self, step: int) -> ResumeChanges:
        """The saved run's config against this one; CheckpointError naming every refused change."""
        assert self.checkpointer is not None
        saved = self.checkpointer.metadata(step).get("config")
        if not isinstance(saved, dict):
            return ResumeChanges()  # written by a tool that records no config: the state checks below still apply
        changes = compare_configs(saved, self.cfg.to_dict())
        if changes.refused:
            raise CheckpointError(
                f"cannot resume from the checkpoint at iteration {step} in {self.cfg.train.checkpoint_dir!r}: "
                f"settings that define the run it continues were changed ({', '.join(changes.refused)}); "
                "resume with the checkpoint's values, or use another checkpoint directory"
            )
        return changes

    def maybe_save(self, steps_done: int, train_time_s: float) -> None:
        """Every ``train.checkpoint_every`` iterations; the last one is left to ``save`` at the end."""
        every = self.cfg.train.checkpoint_every
        if every and steps_done % every == 0 and steps_done < self.cfg.train.steps:
            self.save(steps_done, train_time_s)

    def resume_hint(self) -> str:
        """Where a rerun of this job would start, for the line that says why it stopped."""
        if self.checkpointer is None:
            return "no checkpoints are written (train.checkpoint_dir is not set): a rerun starts from iteration 0"
        # The directory, not this rank's memory: a stop can land between rank 0's commit and the others' return.
        step = self.checkpointer.newest_plausible()
        if step is None:
            return f"no checkpoint in {self.cfg.train.checkpoint_dir!r} yet: a rerun starts from iteration 0"
        return f"a rerun resumes from iteration {step} (the checkpoint in {self.cfg.train.checkpoint_dir!r})"

    def save(self, steps_done: int, train_time_s: float) -> None:
        """Collective: this rank's state after ``steps_done`` iterations (and rank 0 the averaged model)."""
        if self.checkpointer is None:
            return
        tc = self.cfg.train
        state = {
            **self.strategy.checkpoint_state(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "rng": capture_rng(),
            "progress": {"train_time_s": train_time_s},
            "algorithm": tc.algorithm,
            "units": unit_signatures(sync_units(self.strategy.raw_model)),
            "schedule": self.strategy.schedule_record(),
        }
        # The averaged model (for export) is written with the rest, before the commit mark.
        shared = {"averaged.pt": averaged_state(self.strategy.raw_model)} if tc.checkpoint_average else None
        meta = {"algorithm": tc.algorithm, "config": self.cfg.to_dict()}
        self.checkpointer.save(steps_done, state, meta=meta, shared=shared)

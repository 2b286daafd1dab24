"""The schedule a plsgd/dreamddp run follows, resolved once at start-up.

Reading the file, checking it against this job and choosing H happen here and nowhere else:
the strategy, the trace's phases and the summary all take the ``Schedule`` this returns, so
they cannot disagree when the file's H differs from ``train.period``.
"""

from __future__ import annotations

import logging

from torch import nn

from dreamddp.core.schedule import Schedule
from dreamddp.core.units import sync_units
from dreamddp.planning import auto_period, plan
from dreamddp.planning.compression import auto_within, priced_for
from dreamddp.planning.profile import Profile
from dreamddp.planning.two_level import priced_two_level, two_level_of
from dreamddp.training.config import ExperimentConfig
from dreamddp.training.strategies import SCHEDULED

__all__ = ["check_profile_units", "resolve_schedule"]

logger = logging.getLogger(__name__)


def resolve_schedule(cfg: ExperimentConfig, model: nn.Module, world_size: int) -> Schedule | None:
    """The schedule to run: the file's (dreamddp with ``train.schedule``), else PLSGD's groups.

    None for algorithms that run no DreamDDP schedule. Raises a one-line ``ValueError`` when
    the file cannot be read, was planned for another world size, or does not fit the model.
    Call it under ``agree`` before the wrapper is built: a file that only one node cannot read
    would otherwise fail that rank alone while the others wait in the wrapper's agreement
    collective until the process-group timeout.
    """
    tc = cfg.train
    if tc.algorithm not in SCHEDULED:
        return None
    if tc.period == "auto" and not tc.schedule:
        return _auto_schedule(cfg, model)
    if tc.algorithm != "dreamddp" or not tc.schedule:
        return Schedule.plsgd(sync_units(model), tc.period_h)
    schedule = Schedule.from_json(tc.schedule)  # its errors name the file
    planned_for = schedule.metadata.get("world_size")
    if isinstance(planned_for, int) and planned_for != world_size:
        # Ring all-reduce costs scale with (n-1)/n: a plan for another world size is a plan for another job.
        raise ValueError(
            f"schedule file {tc.schedule!r} was planned for world_size {planned_for}, but this job's "
            f"world size is {world_size}: profile and plan again with {world_size} rank(s)"
        )
    try:
        schedule.check_units([u.name for u in sync_units(model)])
    except ValueError as err:
        raise ValueError(f"schedule file {tc.schedule!r} does not fit model {cfg.model_name!r}: {err}") from None
    if schedule.period != tc.period:
        logger.info("schedule file %r sets H=%d; train.period=%s is not used", tc.schedule, schedule.period, tc.period)
    return schedule


def check_profile_units(profile: Profile, model: nn.Module) -> None:
    """A profile plans only for the model it measured: the same sync units, by name."""
    model_names = [u.name for u in sync_units(model)]
    extra = sorted(set(profile.names) - set(model_names))
    missing = sorted(set(model_names) - set(profile.names))
    if extra or missing:
        what = f"unit {extra[0]!r}, which the model does not have" if extra else f"no unit {missing[0]!r}"
        raise ValueError(f"it was measured on another model (it has {what})")


def _auto_schedule(cfg: ExperimentConfig, model: nn.Module) -> Schedule:
    """``train.period = "auto"``: plan from ``train.profile`` at the smallest H near the lower bound.

    The planner is deterministic, so every rank computes the same schedule from the same file.
    """
    tc = cfg.train
    try:
        profile = Profile.from_json(tc.profile)
        check_profile_units(profile, model)
    except (OSError, ValueError) as err:
        raise ValueError(f"train.profile {tc.profile!r} cannot choose train.period='auto': {err}") from None
    overlap = tc.overlap or "backward"
    profile = priced_for(profile, tc.sync_options)  # sync="delta": compressed bytes, codec compute
    two_level = two_level_of(profile) if tc.hierarchy != "flat" else None
    if two_level is not None:  # measured on sites of several ranks: the two-level price (planning.two_level)
        profile = priced_two_level(profile, two_level)
    period = auto_period(profile, overlap, within=auto_within(tc.sync_options))
    schedule = plan(profile, period, overlap=overlap)
    logger.info("train.period='auto': H=%d planned from %s", period, tc.profile)
    return schedule

"""The collective check that every rank wraps the same model with the same schedule.

Ranks that disagree would issue different collectives and hang until the timeout, or
average unrelated tensors. So each rank's claim is all-gathered once at construction and
every rank raises the same one-line error — a problem seen by one rank alone fails all of
them at once instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from dreamddp.core.schedule import Schedule
from dreamddp.core.units import SyncUnit

__all__ = ["check_agreement"]

Signature = tuple[tuple[str, tuple[int, ...], str], ...]


@dataclass
class _Claim:
    """What one rank built; pickled by the all-gather, so plain data only."""

    units: list[tuple[str, Signature]]  # (name, signature) in registration order
    period: int
    assignment: dict[str, tuple[int, ...]]
    problem: str | None  # this rank's own complaint about its schedule, if any
    overlap: str
    delays: dict[str, int]


def check_agreement(
    units: list[SyncUnit], schedule: Schedule, group: dist.ProcessGroup | None, overlap: str = "backward"
) -> None:
    """Raise the same one-line error on every rank unless all agree on model and schedule."""
    try:
        schedule.check_units([u.name for u in units])
        problem = None
    except ValueError as err:
        problem = str(err)
    mine = _Claim(
        units=[(u.name, u.signature) for u in units],
        period=schedule.period,
        assignment=dict(schedule.assignment),
        problem=problem,
        overlap=overlap,
        delays=dict(schedule.delays),
    )
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    claims: list[_Claim] = gathered
    reference = claims[0]
    for rank, theirs in enumerate(claims):  # a different model is the root cause
        if theirs.units != reference.units:
            raise ValueError(_model_difference(reference.units, theirs.units, rank))
    if problem is not None:
        raise ValueError(problem)
    for rank, theirs in enumerate(claims):
        if theirs.problem is not None:
            raise ValueError(f"rank {rank}: {theirs.problem}")
    for rank, theirs in enumerate(claims):
        if theirs.overlap != reference.overlap:
            raise ValueError(
                f"overlap differs across ranks: rank {rank} uses {theirs.overlap!r}, rank 0 "
                f"{reference.overlap!r}; every rank must wrap the model the same way"
            )
        if (theirs.period, theirs.assignment, theirs.delays) != (
            reference.period,
            reference.assignment,
            reference.delays,
        ):
            raise ValueError(
                f"schedules differ across ranks: rank {rank} has period {theirs.period} and "
                f"{sum(map(len, theirs.assignment.values()))} syncs, rank 0 period {reference.period} and "
                f"{sum(map(len, reference.assignment.values()))} syncs; give every rank the same schedule"
            )


def _model_difference(reference: list[tuple[str, Signature]], theirs: list[tuple[str, Signature]], rank: int) -> str:
    """The first difference between two ranks' units, in words."""
    ref_map, their_map = dict(reference), dict(theirs)
    for name in list(ref_map) + [n for n in their_map if n not in ref_map]:
        if name not in their_map:
            return f"models differ across ranks: rank {rank} has no unit {name!r} that rank 0 has"
        if name not in ref_map:
            return f"models differ across ranks: rank {rank} has unit {name!r} that rank 0 lacks"
        if ref_map[name] != their_map[name]:
            return (
                f"models differ across ranks: unit {name!r} is {_describe(their_map[name])} on rank {rank}"
                f" but {_describe(ref_map[name])} on rank 0"
            )
    return f"models differ across ranks: rank {rank} orders its units differently from rank 0"


def _describe(signature: Signature) -> str:
    return ", ".join(f"{name}{list(shape)}:{dtype.removeprefix('torch.')}" for name, shape, dtype in signature)

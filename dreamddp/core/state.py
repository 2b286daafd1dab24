"""What every part of the wrapper reads: units laid out flat in launch order, schedule, iteration, plans.

The reducer launches the current iteration's buckets, landing finds a unit's slices of the
flat storage, the facade lays the storage out again when something moved it. They share
one ``SyncState`` rather than copies, because a re-layout (a learned launch order, a
``model.to()``) changes the units, the layout and the plans together. Nothing here
communicates, so the plans can be built — and tested — without a process group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from dreamddp.core.buckets import Bucket, plan_buckets
from dreamddp.core.flat import FlatLayout
from dreamddp.core.schedule import Schedule
from dreamddp.core.units import SyncUnit, sync_units

__all__ = ["Companion", "SyncState", "bucket_plans", "initial_order"]


class Companion(Protocol):
    """State laid out like the flat storage (delta sync's anchors): it must follow a re-layout."""

    def relayout(self, old: FlatLayout, new: FlatLayout) -> None: ...


def initial_order(units: Sequence[SyncUnit]) -> list[int]:
    """The expected backward readiness order, before any backward has been seen.

    Reverse registration order, with units that get no gradient (buffer-only: frozen
    parameters are in no unit) last: they can only be averaged once backward ends.
    """
    backward = list(reversed(range(len(units))))
    has_grad = [any(p.requires_grad for p in u.params) for u in units]
    return [i for i in backward if has_grad[i]] + [i for i in backward if not has_grad[i]]


def bucket_plans(
    layout: FlatLayout, units: Sequence[SyncUnit], order: Sequence[int], schedule: Schedule, cap_bytes: int
) -> list[list[Bucket]]:
    """For each iteration of the period, its buckets in launch order.

    Scheduled units are walked in layout (= expected backward) order; a unit's slices extend
    the open bucket while adjacent in the same flat buffer and within ``cap_bytes``. Every
    bucket is therefore one contiguous view. The cap is the planner's, in bytes (``cap_bytes /
    element size`` elements, not rounded: a bucket is within it exactly when its bytes are),
    so even a cap below one element packs as the cost model predicts.
    """
    caps = {key: cap_bytes / flat.element_size() for key, flat in enumerate(layout.flats)}
    segments = [seg for unit_id in order for seg in layout.segments[unit_id]]
    index = {u.name: i for i, u in enumerate(units)}
    plans = []
    for h in range(schedule.period):
        scheduled = {index[name] for name in schedule.units_at(h)}
        plans.append(plan_buckets(segments, caps, scheduled=scheduled))
    return plans


class SyncState:
    """The module's units, their flat layout in ``order``, the schedule and where training is in it."""

    def __init__(self, module: nn.Module, schedule: Schedule, bucket_cap_bytes: int, order: Sequence[int]) -> None:
        self.module = module
        self.schedule = schedule
        self.bucket_cap_bytes = bucket_cap_bytes
        self.order = list(order)
        self.iteration = 0  # synchronising backward passes so far
        self.origin = 0  # the iteration the current period length started at (a switch of H resets it)
        self.units: list[SyncUnit] = []
        self.plans: list[list[Bucket]] = []
        self.companions: list[Companion] = []
        self.lay_out()

    @property
    def phase(self) -> int:
        return (self.iteration - self.origin) % self.schedule.period

    def plan(self) -> list[Bucket]:
        """This iteration's buckets, in launch order."""
        return self.plans[self.phase]

    def lay_out(self, order: Sequence[int] | None = None) -> None:
        """(Re)build the flat storage in ``order`` (default: the current one), and the plans on top of it."""
        if order is not None:
            self.order = list(order)
        current = sync_units(self.module)  # buffers are held by reference: take today's
        old: FlatLayout | None = getattr(self, "layout", None)  # None the first time
        self.layout = FlatLayout(self.module, current, self.order)
        self.units = sync_units(self.module)  # ... and again, now that they live in the flat storage
        self.plans = bucket_plans(self.layout, self.units, self.order, self.schedule, self.bucket_cap_bytes)
        if old is not None:
            for companion in self.companions:
                companion.relayout(old, self.layout)

    def set_schedule(self, schedule: Schedule) -> None:
        if schedule.period != self.schedule.period:
            self.origin = self.iteration  # a new period length starts its first period here
        self.schedule = schedule
        self.plans = bucket_plans(self.layout, self.units, self.order, schedule, self.bucket_cap_bytes)

    def chunks(self) -> list[torch.Tensor]:
        """The whole storage as in-place views of at most the bucket cap (broadcast, ``average_all``)."""
        caps = {k: max(1, self.bucket_cap_bytes // f.element_size()) for k, f in enumerate(self.layout.flats)}
        return self.layout.chunks(caps)

"""Averages that outlive their backward pass (``overlap="forward"`` and delays), and their landing.

With forward overlap nothing is waited for at the end of backward: a unit's average lands
at the latest just before the unit's forward in the next iteration (a forward pre-hook),
and its optimizer step is held back until then (``DeferredSteps``), so the arithmetic stays
the paper's. A unit the schedule delays by d lands d iterations later still, as a
correction ``w += mean(snapshot) - snapshot`` that keeps the local progress made meanwhile.
A checkpoint saves delayed averages unapplied, with the iteration that applies them.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.grad_mode import _unsafe_preserve_version_counter

from dreamddp.core.buckets import Bucket
from dreamddp.core.collectives import BucketSync
from dreamddp.core.deferred import DeferredSteps
from dreamddp.core.flat import FlatLayout
from dreamddp.core.state import SyncState

__all__ = ["InFlight", "Landing", "UnitSlice", "unit_slices"]


@dataclass(frozen=True)
class UnitSlice:
    """One of a unit's segments inside a delayed bucket's copies.

    Named by its index among the unit's segments, not by its offsets in the flat storage,
    so a correction still finds the live weights after a re-layout.
    """

    segment: int
    start: int  # within the bucket
    end: int


@dataclass
class InFlight:
    """A bucket whose average was launched and has not landed on every unit yet.

    Unit u of it is needed by the forward of iteration ``launched + 1 + delays[u]``. A bucket
    holding a delayed unit reduces a copy (``reduced``) of the weights as they were at launch
    (``snapshot``) while the live weights train on; each of its units lands on its own due
    iteration: ``w += mean(snapshot) - snapshot`` for a delayed unit, ``w = mean`` for an
    undelayed one (whose step was held back until then). Undelayed buckets reduce the weights
    in place and land as a whole.
    """

    average: BucketSync | None  # None: restored from a checkpoint, already finished
    bucket: Bucket
    launched: int  # the iteration whose backward launched it
    delays: dict[int, int]  # unit -> delay
    snapshot: torch.Tensor | None = None
    reduced: torch.Tensor | None = None
    waited: bool = False
    landed: set[int] = field(default_factory=set)
    offsets: dict[int, list[UnitSlice]] = field(default_factory=dict)  # delayed buckets only

    @property
    def delayed(self) -> bool:
        return self.snapshot is not None

    def due(self, unit_id: int) -> int:
        return self.launched + 1 + self.delays[unit_id]

    def left(self) -> list[int]:
        return [u for u in sorted(self.bucket.units) if u not in self.landed]


def unit_slices(bucket: Bucket, layout: FlatLayout) -> dict[int, list[UnitSlice]]:
    """Where each unit's segments lie within ``bucket`` (for corrections after a re-layout)."""
    return {
        i: [
            UnitSlice(k, seg.start - bucket.start, seg.end - bucket.start)
            for k, seg in enumerate(layout.segments[i])
            if seg.key == bucket.key and bucket.start <= seg.start < bucket.end
        ]
        for i in bucket.units
    }


class Landing:
    """Averages pending across iterations, the held-back optimizer steps, and when they land."""

    def __init__(self, state: SyncState, forward: bool) -> None:
        self.state = state
        self.pending: list[InFlight] = []
        # Weakly: the optimizer's hook must not keep the wrapper (and its process group) alive.
        this = weakref.ref(self)

        def to_defer() -> set[nn.Parameter]:
            landing = this()
            return landing._params_to_defer() if landing is not None else set()

        self.deferred = DeferredSteps(to_defer)
        self._stall_s = 0.0
        self._events: list[tuple[str, str, int, int]] = []
        self._hooks = self._register_forward_pre_hooks() if forward else []

    # ------------------------------------------------------------ what the others hand over
    def add(self, inflight: InFlight) -> None:
        """Leave ``inflight`` to land later (before its units' forward, or when due)."""
        self.pending.append(inflight)

    def complete(self, inflight: InFlight) -> None:
        """Land the whole of ``inflight`` now (the paper's mode: at the end of backward)."""
        self._wait(inflight)
        self._apply_landed(inflight, inflight.left())

    def needs_optimizer(self) -> bool:
        """An undelayed unit is still averaging, but no optimizer is registered to hold its step."""
        return not self.deferred.registered and any(not f.delays[u] for f in self.pending for u in f.left())

    def take_stalls(self) -> tuple[float, list[tuple[str, str, int, int]]]:
        """Forward stalls since the last call: (seconds, events (kind, units, start_ns, end_ns))."""
        taken = self._stall_s, self._events
        self._stall_s, self._events = 0.0, []
        return taken

    @property
    def snapshot_bytes(self) -> int:
        """Extra memory now held for delayed averages (snapshot + reduction buffer)."""
        return sum(2 * f.snapshot.numel() * f.snapshot.element_size() for f in self.pending if f.snapshot is not None)

    # ------------------------------------------------------------------------ landing
    @torch.no_grad()
    def land(self, *, due_only: bool, units: frozenset[int] | None = None, delayed: bool = True) -> None:
        """Land pending averages: units due now (or all), touching ``units`` if given.

        ``delayed=False`` lands undelayed units, and delayed ones only once due (an undelayed
        unit's landing time does not change the arithmetic; a delayed unit's does).
        """
        now = self.state.iteration
        keep = []
        for inflight in self.pending:
            chosen = [
                u
                for u in inflight.left()
                if (units is None or u in units)
                and (delayed or not inflight.delays[u] or inflight.due(u) <= now)
                and (not due_only or inflight.due(u) <= now)
            ]
            if chosen and not inflight.delayed:
                chosen = inflight.left()  # reduced in place: the whole bucket lands at once
            if chosen:
                start = time.perf_counter_ns()
                # Every parameter is a view of one flat buffer and shares its version counter, so
                # writing these units would look to autograd like a write to every tensor this
                # forward already saved. Only units whose forward has not run yet are written
                # (that is what a pre-hook is for): keep the counter, as FSDP does for its views.
                with _unsafe_preserve_version_counter(tuple(self.state.layout.flats)):
                    self._wait(inflight)
                    waited = time.perf_counter_ns()
                    self._apply_landed(inflight, chosen)
                if due_only:  # a stall of the next forward: counted and traced
                    names = "+".join(self.state.units[i].name for i in chosen)
                    self._stall_s += (waited - start) / 1e9
                    self._events.append(("wait", names, start, waited))
                    self._events.append(("optimizer", names, waited, time.perf_counter_ns()))
            if inflight.left():
                keep.append(inflight)
        self.pending = keep

    def _wait(self, inflight: InFlight) -> None:
        if not inflight.waited:
            assert inflight.average is not None  # only restored ones have none, and they are waited
            inflight.average.wait()
            inflight.waited = True

    def _apply_landed(self, inflight: InFlight, unit_ids: list[int]) -> None:
        """Put a landed average into these units' weights, then apply the steps held back for them."""
        if inflight.snapshot is not None and inflight.reduced is not None:
            layout = self.state.layout
            for unit_id in unit_ids:
                corrected = inflight.delays[unit_id] > 0
                for piece in inflight.offsets[unit_id]:
                    seg = layout.segments[unit_id][piece.segment]
                    live = layout.view(seg.key, seg.start, seg.end)
                    averaged = inflight.reduced[piece.start : piece.end]
                    if corrected:  # keep the local progress made since launch
                        live.add_(averaged - inflight.snapshot[piece.start : piece.end])
                    else:  # its step was held back: the weights are still the snapshot
                        live.copy_(averaged)
        inflight.landed.update(unit_ids)
        if self.deferred.pending:
            self.deferred.apply(p for i in unit_ids for p in self.state.units[i].params)

    def discard(self) -> None:
        """Drop what is in flight (a checkpoint is replacing the state): finish every collective
        on the wire first, so none is left dangling or writing into weights being loaded."""
        for inflight in self.pending:
            self._wait(inflight)  # a no-op for one restored from a checkpoint (already waited)
        self.pending = []
        self.deferred.discard()

    def _params_to_defer(self) -> set[nn.Parameter]:
        """Asked by the optimizer's step pre-hook: parameters whose average has not landed.

        Undelayed buckets that already arrived land now (same arithmetic, less waiting later).
        Buckets holding delayed units land only when due, whatever the network did, so the
        trajectory does not depend on timing.
        """
        defer: set[nn.Parameter] = set()
        keep = []
        for inflight in self.pending:
            if not inflight.delayed and inflight.average is not None and inflight.average.is_ready():
                self._wait(inflight)
                self._apply_landed(inflight, inflight.left())
                continue
            keep.append(inflight)
            for unit_id in inflight.left():
                if not inflight.delays[unit_id]:
                    defer.update(self.state.units[unit_id].params)
        self.pending = keep
        return defer

    # ------------------------------------------------------------------ forward pre-hooks
    def _register_forward_pre_hooks(self) -> list[Any]:
        """A pre-hook on every module that reads a unit's tensors directly (tied owners too)."""
        units = self.state.units
        unit_of = {id(t): i for i, u in enumerate(units) for t in (*u.params, *u.buffers)}
        landing = weakref.ref(self)  # a model that outlives its wrapper must not keep it alive
        handles = []
        for module in self.state.module.modules():
            own = list(module._parameters.values()) + list(module._buffers.values())
            unit_ids = frozenset(unit_of[id(t)] for t in own if t is not None and id(t) in unit_of)
            if not unit_ids:
                continue

            def hook(_module: nn.Module, _args: Any, unit_ids: frozenset[int] = unit_ids) -> None:
                this = landing()
                if this is not None and this.pending:
                    this.land(due_only=True, units=unit_ids)

            handles.append(module.register_forward_pre_hook(hook))
        return handles

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self.deferred.remove()

    # -------------------------------------------------------------------- checkpoints
    def export(self) -> list[dict[str, Any]]:
        """Delayed averages still in flight, finished on the wire and saved unapplied.

        Plain tensors, lists and ints only (the checkpoint is loaded with ``weights_only``);
        a unit's slices are saved as ``(segment, start, end)`` lists.
        """
        delayed = []
        for f in self.pending:
            self._wait(f)
            units = sorted(f.bucket.units)
            delayed.append(
                {
                    "key": f.bucket.key,
                    "start": f.bucket.start,
                    "end": f.bucket.end,
                    "units": units,
                    "landed": sorted(f.landed),
                    "launched": f.launched,
                    "delays": [f.delays[u] for u in units],
                    "offsets": [[(s.segment, s.start, s.end) for s in f.offsets[u]] for u in units],
                    "snapshot": f.snapshot,
                    "reduced": f.reduced,
                }
            )
        return delayed

    def restore(self, delayed: list[dict[str, Any]]) -> None:
        """Take back what ``export`` saved (after ``discard``)."""
        for d in delayed:
            bucket = Bucket(tuple(d["units"]), d["key"], d["start"], d["end"])
            device = self.state.layout.flats[bucket.key].device
            self.pending.append(
                InFlight(
                    None,
                    bucket,
                    d["launched"],
                    dict(zip(d["units"], d["delays"])),
                    d["snapshot"].to(device),
                    d["reduced"].to(device),
                    waited=True,
                    landed=set(d["landed"]),
                    offsets={u: [UnitSlice(*o) for o in offs] for u, offs in zip(d["units"], d["offsets"])},
                )
            )

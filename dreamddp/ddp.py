"""DreamDDP: partial local SGD with parameter averaging overlapped with backward.

In iteration t (h = t mod period) the units the schedule assigns to h have their parameter
*data* averaged across ranks, in place, by asynchronous all-reduces launched from
``register_post_accumulate_grad_hook`` — the moment a unit's gradients are complete its
weights are no longer read by the rest of backward, so they can be overwritten while backward
goes on with the layers below. At the end of backward (an autograd callback, as torch DDP
uses) the wrapper launches whatever is left, waits for all of it and finishes the averages.
When ``loss.backward()`` returns the scheduled units are identical on every rank, and the
user's ``optimizer.step()`` applies the *local* gradient: w <- mean(w) - lr * g_local.
Gradients are never averaged; optimizer state stays local.

Buckets are fixed per iteration of the period and launched strictly in order, so every rank
issues the same collectives in the same order even if its hooks fire in a different order.
The order is first the reverse of registration order, then — after the first synchronising
backward, as torch DDP does — the readiness order rank 0 actually observed.
"""

from __future__ import annotations

import collections
import contextlib
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import BucketAverage, SimulatedLink
from .flat import FlatLayout
from .schedule import Schedule
from .timing import Clock, ObservedBucket, ObservedIteration
from .units import SyncUnit, sync_units

__all__ = ["DreamDDP", "IterationStats", "TIMINGS_KEPT"]

TIMINGS_KEPT = 1024  # iterations of observed timings a wrapper keeps (record_timings=True)


@dataclass
class IterationStats:
    """What one synchronising backward pass communicated, and how long it waited."""

    iteration: int = 0
    phase: int = 0  # h = iteration mod period
    units: list[str] = field(default_factory=list)
    bytes_sent: int = 0  # payload bytes all-reduced by this rank
    buckets: int = 0
    wait_s: float = 0.0  # host time blocked at the end of backward (exposed communication)


@dataclass
class _Bucket:
    """A run of units adjacent in the flat layout: one in-place all-reduce of ``[start, end)``."""

    unit_ids: frozenset[int]
    key: int
    start: int
    end: int


class DreamDDP(nn.Module):
    """Wrap ``module`` so that ``backward()`` averages the scheduled units' parameters.

    Args:
        module: the model, already on its device.
        schedule: which units to average in which iteration of the period; must name every
            unit of ``sync_units(module)`` and nothing else.
        process_group: the data-parallel group (default: the world).
        bucket_cap_mb: largest coalesced all-reduce; small units are packed together.
        link: optional ``SimulatedLink`` that delays every collective like a slow network.
        broadcast_from_rank0: start every rank from rank 0's parameters and buffers.
        record_timings: keep, per synchronising iteration, when each unit's gradients became
            ready and when each bucket's all-reduce was launched and finished (read with
            ``observed_timings()``; the profiler refreshes a Profile from them). Off by default;
            when on, hooks only take timestamps — nothing waits for the device.
    """

    def __init__(
        self,
        module: nn.Module,
        schedule: Schedule,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        *,
        link: SimulatedLink | None = None,
        broadcast_from_rank0: bool = True,
        record_timings: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a dreamddp.Schedule, got {type(schedule).__name__}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DreamDDP needs an initialised process group: call torch.distributed.init_process_group() first"
            )
        self.module = module
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.link = link
        self.units: list[SyncUnit] = sync_units(module)
        _check_agreement(self.units, schedule, self.process_group)
        self._schedule = schedule
        self._iteration = 0
        self._sync_enabled = True
        self._order_rebuilt = False
        self._grad_params = [sum(1 for p in u.params if p.requires_grad) for u in self.units]
        # Expected backward readiness order: reverse registration order, with units that get no
        # gradient (frozen or buffer-only) last — they can only be averaged once backward ends.
        backward = list(reversed(range(len(self.units))))
        self._order = [i for i in backward if self._grad_params[i]] + [i for i in backward if not self._grad_params[i]]
        self._lay_out()
        if broadcast_from_rank0:
            src = dist.get_global_rank(self.process_group, 0)
            for chunk in self._storage_chunks():
                dist.broadcast(chunk, src=src, group=self.process_group)
        self.last_stats = IterationStats()
        self.total_bytes_sent = 0
        self._clock: Clock | None = None
        if record_timings:
            device = next((t.device for u in self.units for t in u.tensors), torch.device("cpu"))
            self._clock = Clock(device)
        self._raw_timings: collections.deque[tuple] = collections.deque(maxlen=TIMINGS_KEPT)
        self._observed_timings: collections.deque[ObservedIteration] = collections.deque(maxlen=TIMINGS_KEPT)
        self._forward_mark: Any = None
        self._ready_marks: dict[int, Any] = {}
        self._launch_marks: list[Any] = []

        # Per-backward state.
        self._in_backward = False
        self._grads_left: list[int] = []
        self._ready: list[bool] = []
        self._observed: list[int] = []
        self._next_bucket = 0
        self._in_flight: list[BucketAverage] = []
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, u in enumerate(self.units)
            for p in u.params
            if p.requires_grad
        ]

    # ------------------------------------------------------------------ API
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._in_backward:
            self._abandon_backward()
        if not self._layout.intact():
            self._lay_out()  # something (model.to(), load_state_dict(assign=True)) moved the storage
        output = self.module(*args, **kwargs)
        if self._clock is not None and self._sync_enabled:
            self._forward_mark = self._clock.mark()
        return output

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def iteration(self) -> int:
        """Synchronising backward passes so far; this backward uses ``iteration % period``."""
        return self._iteration

    @property
    def phase(self) -> int:
        return self._iteration % self._schedule.period

    def set_schedule(self, schedule: Schedule) -> None:
        """Switch schedules between iterations (call on every rank at the same iteration)."""
        if self._in_backward:
            raise RuntimeError("set_schedule() cannot be called during backward")
        schedule.check_units([u.name for u in self.units])
        self._schedule = schedule
        self._plans = self._build_plans()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient-accumulation micro-steps: backward sends nothing and the counter stays."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    @torch.no_grad()
    def average_all(self) -> None:
        """Average every unit now (before evaluation, checkpoints, the end of training)."""
        if self._in_backward:
            raise RuntimeError("average_all() cannot be called during backward")
        if not self._layout.intact():
            self._lay_out()
        pending = [BucketAverage([chunk], self.process_group, self.link) for chunk in self._storage_chunks()]
        for bucket in pending:
            bucket.wait()
        self.total_bytes_sent += sum(b.nbytes for b in pending)

    def get_extra_state(self) -> dict[str, Any]:
        # The bucket order is part of the state: buckets decide how a reduction is split, so a
        # resumed run must launch the same ones to continue bit for bit.
        return {"iteration": self._iteration, "period": self._schedule.period, "order": list(self._order)}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("iteration"), int) or state["iteration"] < 0:
            raise ValueError(f"DreamDDP state has no valid iteration counter: {state!r}")
        if state.get("period") != self._schedule.period:
            raise ValueError(
                f"checkpoint was written with period {state.get('period')!r}, this schedule has "
                f"period {self._schedule.period}"
            )
        order = state.get("order")
        if order is not None:
            if sorted(order) != list(range(len(self.units))):
                raise ValueError(f"checkpoint's bucket order does not fit this model's {len(self.units)} units")
            if list(order) != self._order:
                self._order = list(order)
                self._lay_out()
            self._order_rebuilt = True
        self._iteration = state["iteration"]

    def observed_timings(self) -> list[ObservedIteration]:
        """What the last (up to TIMINGS_KEPT) synchronising iterations really did, in seconds.

        Converting CUDA events needs one device synchronisation, done here, once, not in hooks.
        """
        if self._raw_timings:
            assert self._clock is not None
            self._clock.settle()
            while self._raw_timings:
                self._observed_timings.append(self._convert(*self._raw_timings.popleft()))
        return list(self._observed_timings)

    def _record_iteration(self) -> None:
        """Keep this backward's raw marks; converted to seconds only when someone asks."""
        plan = self._plans[self.phase]
        end = self._clock.mark()
        buckets = []
        for bucket_plan, work, launch in zip(plan, self._in_flight, self._launch_marks):
            done = work.done_ns if not self._clock.cuda else end
            names = [self.units[i].name for i in sorted(bucket_plan.unit_ids)]
            buckets.append((names, work.nbytes, launch, done if done is not None else end))
        origin = self._forward_mark if self._forward_mark is not None else (self._launch_marks or [end])[0]
        self._raw_timings.append((self._iteration, self.phase, origin, dict(self._ready_marks), buckets, end))

    def _convert(self, iteration, phase, origin, ready, buckets, end) -> ObservedIteration:
        clock = self._clock

        def seconds(mark: Any) -> float:
            return clock.seconds(origin, mark)

        return ObservedIteration(
            iteration=iteration,
            phase=phase,
            ready_s={self.units[i].name: seconds(m) for i, m in ready.items()},
            buckets=[ObservedBucket(names, nbytes, seconds(launch), seconds(done)) for names, nbytes, launch, done in buckets],
            backward_end_s=seconds(end),
            origin_ns=None if clock.cuda else origin,
        )

    def remove_hooks(self) -> None:
        """Detach from the model; it trains as a plain module afterwards."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # ------------------------------------------------------------- planning
    def _lay_out(self) -> None:
        """(Re)build the flat storage in the current order, and the bucket plans on top of it."""
        current = sync_units(self.module)  # buffers are held by reference: take today's
        self._layout = FlatLayout(self.module, current, self._order)
        self.units = sync_units(self.module)  # ... and again, now that they live in the flat storage
        self._plans = self._build_plans()

    def _storage_chunks(self) -> list[torch.Tensor]:
        caps = {k: max(1, self.bucket_cap_bytes // f.element_size()) for k, f in enumerate(self._layout.flats)}
        return self._layout.chunks(caps)

    def _build_plans(self) -> list[list[_Bucket]]:
        """For each iteration of the period, its buckets in launch order.

        Scheduled units are walked in layout (= expected backward) order; a unit's slices
        extend the open bucket while they are adjacent in the same flat buffer and the bucket
        stays within ``bucket_cap_mb``. Every bucket is therefore one contiguous view.
        """
        plans = []
        for h in range(self._schedule.period):
            scheduled = set(self._schedule.units_at(h))
            buckets: list[_Bucket] = []
            for unit_id in self._order:
                if self.units[unit_id].name not in scheduled:
                    continue
                for seg in self._layout.segments[unit_id]:
                    cap = max(1, self.bucket_cap_bytes // self._layout.flats[seg.key].element_size())
                    last = buckets[-1] if buckets else None
                    if last is not None and last.key == seg.key and last.end == seg.start and seg.end - last.start <= cap:
                        buckets[-1] = _Bucket(last.unit_ids | {unit_id}, seg.key, last.start, seg.end)
                    else:
                        buckets.append(_Bucket(frozenset({unit_id}), seg.key, seg.start, seg.end))
            plans.append(buckets)
        return plans

    def _rebuild_order_from_rank0(self) -> None:
        """Adopt rank 0's observed readiness order so buckets launch as early as they can."""
        observed = list(dict.fromkeys(self._observed))
        seen = set(observed)
        order = observed + [i for i in self._order if i not in seen]
        device = torch.device("cpu")
        if dist.get_backend(self.process_group) == dist.Backend.NCCL:
            device = torch.device("cuda", torch.cuda.current_device())
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        dist.broadcast(order_t, src=dist.get_global_rank(self.process_group, 0), group=self.process_group)
        new_order = order_t.tolist()
        if new_order != self._order:
            self._order = new_order
            self._lay_out()

    @torch.no_grad()
    def _abandon_backward(self) -> None:
        """A backward raised before its end callback ran: drain what it launched, count nothing.

        Every rank that launched a bucket waits for it, so no collective is left dangling;
        the iteration counter is not advanced, so the failed iteration is simply retried.
        """
        try:
            for bucket in self._in_flight:
                bucket.wait()
        finally:
            self._in_backward = False
            self._in_flight = []

    # ---------------------------------------------------------------- hooks
    def _make_hook(self, unit_id: int):
        # A weak reference: a model that outlives its wrapper trains on without communicating,
        # instead of keeping the wrapper alive and all-reducing through a dead process group.
        wrapper = weakref.ref(self)

        def hook(_param: torch.Tensor) -> None:
            ddp = wrapper()
            if ddp is not None:
                ddp._on_grad_ready(unit_id)

        return hook

    def _start_backward(self) -> None:
        self._in_backward = True
        self._grads_left = list(self._grad_params)
        self._ready = [False] * len(self.units)
        self._observed = []
        self._next_bucket = 0
        self._in_flight = []
        self._ready_marks = {}
        self._launch_marks = []
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _on_grad_ready(self, unit_id: int) -> None:
        if not self._sync_enabled:
            return
        if not self._in_backward:
            self._start_backward()
        self._grads_left[unit_id] -= 1
        if self._grads_left[unit_id] == 0:
            if self._clock is not None:
                self._ready_marks[unit_id] = self._clock.mark()
            self._ready[unit_id] = True
            self._observed.append(unit_id)
            self._launch_ready_buckets(force=False)

    @torch.no_grad()
    def _launch_ready_buckets(self, force: bool) -> None:
        plan = self._plans[self.phase]
        while self._next_bucket < len(plan):
            bucket = plan[self._next_bucket]
            if not force and not all(self._ready[i] for i in bucket.unit_ids):
                return
            view = self._layout.view(bucket.key, bucket.start, bucket.end)
            if self._clock is not None:
                self._launch_marks.append(self._clock.mark())
            self._in_flight.append(
                BucketAverage([view], self.process_group, self.link, track_done=self._clock is not None)
            )
            self._next_bucket += 1

    @torch.no_grad()
    def _finish_backward(self) -> None:
        """End of backward: launch what is left (units whose hooks never fired), wait, finish."""
        try:
            self._launch_ready_buckets(force=True)
            start = time.perf_counter()
            for bucket in self._in_flight:
                bucket.wait()
            wait_s = time.perf_counter() - start
            if self._clock is not None:
                self._record_iteration()
            sent = sum(b.nbytes for b in self._in_flight)
            self.last_stats = IterationStats(
                iteration=self._iteration,
                phase=self.phase,
                units=self._schedule.units_at(self.phase),
                bytes_sent=sent,
                buckets=len(self._in_flight),
                wait_s=wait_s,
            )
            self.total_bytes_sent += sent
            self._iteration += 1
            if not self._order_rebuilt:
                self._order_rebuilt = True
                self._rebuild_order_from_rank0()
        finally:
            self._in_backward = False
            self._in_flight = []


def _check_agreement(units: list[SyncUnit], schedule: Schedule, group: dist.ProcessGroup) -> None:
    """Raise the same one-line error on every rank unless all agree on model and schedule.

    Checked collectively (one all-gather), so a problem seen by one rank alone fails every
    rank at once instead of leaving the others waiting in a collective until the timeout.
    """
    try:
        schedule.check_units([u.name for u in units])
        problem = None
    except ValueError as err:
        problem = str(err)
    mine = ([(u.name, u.signature) for u in units], schedule.period, dict(schedule.assignment), problem)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    for rank, (theirs, _, _, _) in enumerate(gathered):  # a different model is the root cause
        if theirs != reference[0]:
            raise ValueError(_model_difference(reference[0], theirs, rank))
    if problem is not None:
        raise ValueError(problem)
    for rank, (_, _, _, their_problem) in enumerate(gathered):
        if their_problem is not None:
            raise ValueError(f"rank {rank}: {their_problem}")
    for rank, (_, period, assignment, _) in enumerate(gathered):
        if (period, assignment) != (reference[1], reference[2]):
            raise ValueError(
                f"schedules differ across ranks: rank {rank} has period {period} and "
                f"{sum(map(len, assignment.values()))} syncs, rank 0 period {reference[1]} and "
                f"{sum(map(len, reference[2].values()))} syncs; give every rank the same schedule"
            )


def _model_difference(reference: list, theirs: list, rank: int) -> str:
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


def _describe(signature: tuple[tuple[str, tuple[int, ...], str], ...]) -> str:
    return ", ".join(f"{name}{list(shape)}:{dtype.removeprefix('torch.')}" for name, shape, dtype in signature)

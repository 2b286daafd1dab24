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
from torch.autograd.grad_mode import _unsafe_preserve_version_counter

from dreamddp.core.collectives import BucketAverage
from dreamddp.core.deferred import DeferredSteps
from dreamddp.core.flat import FlatLayout
from dreamddp.core.schedule import OVERLAPS, Schedule
from dreamddp.core.timing import Clock, ObservedBucket, ObservedIteration
from dreamddp.core.units import SyncUnit, sync_units
from dreamddp.emulation.link import SimulatedLink

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
    wait_s: float = 0.0  # host time blocked on communication: end of backward + forward stalls
    backward_wait_s: float = 0.0  # blocked at the end of backward (the paper's mode)
    forward_stall_s: float = 0.0  # blocked before units' forward (overlap="forward")
    forward_events: list[tuple[str, str, int, int]] = field(default_factory=list)  # (kind, units, start_ns, end_ns)
    snapshot_bytes: int = 0  # extra memory held for delayed averages after this backward


@dataclass
class _InFlight:
    """A bucket whose average outlives its backward pass (``overlap="forward"``).

    Unit u of it is needed by the forward of iteration ``launched + 1 + delays[u]``. A bucket
    holding a delayed unit reduces a copy (``reduced``) of the weights as they were at launch
    (``snapshot``) while the live weights train on; each of its units lands on its own due
    iteration: ``w += mean(snapshot) - snapshot`` for a delayed unit, ``w = mean`` for an
    undelayed one (whose step was held back until then). Undelayed buckets reduce the weights
    in place and land as a whole.
    """

    average: BucketAverage | None
    plan: _Bucket
    launched: int
    delays: dict[int, int]
    snapshot: torch.Tensor | None = None
    reduced: torch.Tensor | None = None
    waited: bool = False
    landed: set[int] = field(default_factory=set)
    # unit -> (index among the unit's segments, start, end within the bucket): robust to a re-layout
    offsets: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)

    @property
    def delayed(self) -> bool:
        return self.snapshot is not None

    def due(self, unit_id: int) -> int:
        return self.launched + 1 + self.delays[unit_id]

    def left(self) -> list[int]:
        return [u for u in sorted(self.plan.unit_ids) if u not in self.landed]


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
        overlap: ``"backward"`` (the paper, default): every average launched in backward is
            waited for when backward ends. ``"forward"``: it is not; a unit's optimizer step is
            held back until its average lands, at the latest just before the unit's forward in
            the next iteration, so communication also hides behind the optimizer step and the
            next forward. Needs ``register_optimizer(optimizer)``. Also enables the schedule's
            ``delays``. None: what the schedule was planned for (``schedule.overlap``).
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
        overlap: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a dreamddp.Schedule, got {type(schedule).__name__}")
        overlap = schedule.overlap if overlap is None else overlap
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")
        if schedule.delays and overlap != "forward":
            raise ValueError(
                f"the schedule delays {len(schedule.delays)} units, which needs overlap='forward', got {overlap!r}"
            )
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
        self.overlap = overlap
        self.units: list[SyncUnit] = sync_units(module)
        _check_agreement(self.units, schedule, self.process_group, overlap)
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
        self._launched: list[_InFlight] = []  # this backward's buckets, as _InFlight (forward mode)

        # Across iterations (overlap="forward"): averages still landing, and held-back steps.
        self._pending: list[_InFlight] = []
        # Weakly: the optimizer's hook must not keep the wrapper (and its process group) alive.
        this = weakref.ref(self)
        self._deferred = DeferredSteps(lambda: this()._params_to_defer() if this() is not None else set())
        self._stall_s = 0.0
        self._forward_events: list[tuple[str, str, int, int]] = []
        self._forward_hook_handles: list[Any] = []
        if overlap == "forward":
            self._forward_hook_handles = self._register_forward_pre_hooks()
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, u in enumerate(self.units)
            for p in u.params
            if p.requires_grad
        ]

    # ------------------------------------------------------------------ API
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.prepare_forward()
        output = self.module(*args, **kwargs)
        if self._pending:
            # Units this forward did not run (or read only outside their modules) are due too.
            self._land(due_only=True)
        if self._clock is not None and self._sync_enabled:
            self._forward_mark = self._clock.mark()
        return output

    def prepare_forward(self) -> None:
        """What must happen before each forward; for integrations that call ``self.module`` themselves.

        Drains a backward that raised half-way (so no collective is left dangling) and lays
        the storage out again if something moved it.
        """
        if self._in_backward:
            self._abandon_backward()
        if not self._layout.intact():
            self.flush()
            self._lay_out()  # something (model.to(), load_state_dict(assign=True)) moved the storage

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let ``overlap="forward"`` hold back this optimizer's step for units still averaging.

        Register every optimizer that steps the model's parameters, once, on every rank.
        Harmless (and unused) with ``overlap="backward"``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"register_optimizer() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._deferred.register(optimizer)

    @torch.no_grad()
    def flush(self, delayed: bool = True) -> None:
        """Land every average still in flight and apply the steps held back for it.

        Needed before anything reads all the weights (evaluation, checkpoints, ``average_all``);
        changes nothing in the arithmetic of undelayed units. ``delayed=False`` leaves delayed
        averages in flight until they are due (their correction time is part of the
        trajectory); those due at the next forward land now, as they would there — so a
        forward that is not training's (evaluation) never lands one onto weights it restores.
        """
        if self._in_backward:
            raise RuntimeError("flush() cannot be called during backward")
        self._land(due_only=False, delayed=delayed)

    @property
    def snapshot_bytes(self) -> int:
        """Extra memory now held for delayed averages (snapshot + reduction buffer)."""
        return sum(2 * f.snapshot.numel() * f.snapshot.element_size() for f in self._pending if f.snapshot is not None)

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
        if schedule.delays and self.overlap != "forward":
            raise ValueError("a schedule with delays needs overlap='forward'")
        self.flush()
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
        self.flush()
        if not self._layout.intact():
            self._lay_out()
        pending = [BucketAverage([chunk], self.process_group, self.link) for chunk in self._storage_chunks()]
        for bucket in pending:
            bucket.wait()
        self.total_bytes_sent += sum(b.nbytes for b in pending)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.flush(delayed=False)  # undelayed averages land (arithmetic unchanged); delayed ones are saved
        return super().state_dict(*args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        # The bucket order is part of the state: buckets decide how a reduction is split, so a
        # resumed run must launch the same ones to continue bit for bit. Delayed averages still
        # in flight are finished on the wire and saved unapplied, with the iteration that applies them.
        delayed = []
        for f in self._pending:
            self._wait(f)
            delayed.append(
                {
                    "key": f.plan.key,
                    "start": f.plan.start,
                    "end": f.plan.end,
                    "units": sorted(f.plan.unit_ids),
                    "landed": sorted(f.landed),
                    "launched": f.launched,
                    "delays": [f.delays[u] for u in sorted(f.plan.unit_ids)],
                    "offsets": [f.offsets[u] for u in sorted(f.plan.unit_ids)],
                    "snapshot": f.snapshot,
                    "reduced": f.reduced,
                }
            )
        return {
            "iteration": self._iteration,
            "period": self._schedule.period,
            "order": list(self._order),
            "delayed": delayed,
        }

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
        self._discard_pending()
        for d in state.get("delayed", []):
            plan = _Bucket(frozenset(d["units"]), d["key"], d["start"], d["end"])
            device = self._layout.flats[plan.key].device
            self._pending.append(
                _InFlight(
                    None,
                    plan,
                    d["launched"],
                    dict(zip(d["units"], d["delays"])),
                    d["snapshot"].to(device),
                    d["reduced"].to(device),
                    waited=True,
                    landed=set(d["landed"]),
                    offsets={u: [tuple(o) for o in offs] for u, offs in zip(d["units"], d["offsets"])},
                )
            )

    def observed_timings(self) -> list[ObservedIteration]:
        """What the last (up to TIMINGS_KEPT) synchronising iterations really did, in seconds.

        Converting CUDA events needs one device synchronisation, done here, once, not in hooks.
        """
        if self._raw_timings:
            assert self._clock is not None
            self._clock.settle()
            while self._raw_timings:
                # With forward overlap a bucket may still be landing: leave its iteration for
                # the next call (for at most two iterations; then its finish counts as unknown).
                entry = self._raw_timings[0]
                landing = any(work.done_ns is None for _, work, _ in entry[4])
                if landing and not self._clock.cuda and entry[0] >= self._iteration - 2:
                    break
                self._observed_timings.append(self._convert(*self._raw_timings.popleft()))
        return list(self._observed_timings)

    def _record_iteration(self) -> None:
        """Keep this backward's raw marks; converted to seconds only when someone asks."""
        plan = self._plans[self.phase]
        end = self._clock.mark()
        buckets = []
        for bucket_plan, work, launch in zip(plan, self._in_flight, self._launch_marks):
            buckets.append(([self.units[i].name for i in sorted(bucket_plan.unit_ids)], work, launch))
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
            buckets=[
                ObservedBucket(
                    names,
                    work.nbytes,
                    seconds(launch),
                    seconds(work.done_ns if work.done_ns is not None and not clock.cuda else end),
                )
                for names, work, launch in buckets
            ],
            backward_end_s=seconds(end),
            origin_ns=None if clock.cuda else origin,
        )

    def remove_hooks(self) -> None:
        """Detach from the model; it trains as a plain module afterwards."""
        if not self._in_backward:
            self.flush()
        for handle in self._hook_handles + self._forward_hook_handles:
            handle.remove()
        self._hook_handles, self._forward_hook_handles = [], []
        self._deferred.remove()

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
                    if (
                        last is not None
                        and last.key == seg.key
                        and last.end == seg.start
                        and seg.end - last.start <= cap
                    ):
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
        if self._pending:
            self._land(due_only=True)  # a backward without our forward: nothing due may stay in flight
        self._in_backward = True
        self._grads_left = list(self._grad_params)
        self._ready = [False] * len(self.units)
        self._observed = []
        self._next_bucket = 0
        self._in_flight = []
        self._launched = []
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
            delays = {i: self._schedule.delay_of(self.units[i].name) for i in bucket.unit_ids}
            has_delayed = any(delays.values())
            snapshot = reduced = None
            if has_delayed:
                # The live weights train on while this average is in flight: reduce a copy.
                snapshot, reduced = view.clone(), view.clone()
            average = BucketAverage(
                [reduced if has_delayed else view], self.process_group, self.link, track_done=self._clock is not None
            )
            self._in_flight.append(average)
            offsets = {}
            if has_delayed:
                for i in bucket.unit_ids:
                    offsets[i] = [
                        (k, seg.start - bucket.start, seg.end - bucket.start)
                        for k, seg in enumerate(self._layout.segments[i])
                        if seg.key == bucket.key and bucket.start <= seg.start < bucket.end
                    ]
            self._launched.append(
                _InFlight(average, bucket, self._iteration, delays, snapshot, reduced, offsets=offsets)
            )
            self._next_bucket += 1

    @torch.no_grad()
    def _finish_backward(self) -> None:
        """End of backward: launch what is left (units whose hooks never fired), wait, finish."""
        try:
            self._launch_ready_buckets(force=True)
            start = time.perf_counter()
            if self.overlap == "forward" and self._order_rebuilt:
                self._pending.extend(self._launched)
            else:
                # The paper's mode, and the first synchronising backward of forward mode (the bucket
                # order may be rebuilt right after it, which moves the storage under any bucket left in flight).
                for inflight in self._launched:
                    if inflight.delayed:  # reduces its own copy: a re-layout cannot disturb it
                        self._pending.append(inflight)
                        continue
                    self._wait(inflight)
                    self._apply_landed(inflight, inflight.left())
            wait_s = time.perf_counter() - start
            if not self._deferred.registered and any(not f.delays[u] for f in self._pending for u in f.left()):
                raise RuntimeError(
                    "DreamDDP(overlap='forward') must hold back the optimizer step of units "
                    "still averaging: call ddp.register_optimizer(optimizer) once"
                )
            if self._clock is not None:
                self._record_iteration()
            sent = sum(b.nbytes for b in self._in_flight)
            stall_s, events = self._stall_s, self._forward_events
            self._stall_s, self._forward_events = 0.0, []
            self.last_stats = IterationStats(
                iteration=self._iteration,
                phase=self.phase,
                units=self._schedule.units_at(self.phase),
                bytes_sent=sent,
                buckets=len(self._in_flight),
                wait_s=wait_s + stall_s,
                backward_wait_s=wait_s,
                forward_stall_s=stall_s,
                forward_events=events,
                snapshot_bytes=self.snapshot_bytes,
            )
            self.total_bytes_sent += sent
            self._iteration += 1
            if not self._order_rebuilt:
                self._order_rebuilt = True
                self._rebuild_order_from_rank0()
        finally:
            self._in_backward = False
            self._in_flight = []
            self._launched = []

    # ------------------------------------------------- forward overlap (lazy completion)
    def _register_forward_pre_hooks(self) -> list[Any]:
        """A pre-hook on every module that reads a unit's tensors directly (tied owners too)."""
        unit_of = {id(t): i for i, u in enumerate(self.units) for t in (*u.params, *u.buffers)}
        wrapper = weakref.ref(self)
        handles = []
        for module in self.module.modules():
            own = list(module._parameters.values()) + list(module._buffers.values())
            unit_ids = frozenset(unit_of[id(t)] for t in own if t is not None and id(t) in unit_of)
            if not unit_ids:
                continue

            def hook(_module: nn.Module, _args: Any, unit_ids: frozenset[int] = unit_ids) -> None:
                ddp = wrapper()
                if ddp is not None and ddp._pending:
                    ddp._land(due_only=True, units=unit_ids)

            handles.append(module.register_forward_pre_hook(hook))
        return handles

    def _wait(self, inflight: _InFlight) -> None:
        if not inflight.waited:
            inflight.average.wait()
            inflight.waited = True

    @torch.no_grad()
    def _land(self, *, due_only: bool, units: frozenset[int] | None = None, delayed: bool = True) -> None:
        """Land pending averages: units due now (or all), touching ``units`` if given.

        ``delayed=False`` lands undelayed units, and delayed ones only once due (an undelayed
        unit's landing time does not change the arithmetic; a delayed unit's does).
        """
        keep = []
        for inflight in self._pending:
            chosen = [
                u
                for u in inflight.left()
                if (units is None or u in units)
                and (delayed or not inflight.delays[u] or inflight.due(u) <= self._iteration)
                and (not due_only or inflight.due(u) <= self._iteration)
            ]
            if chosen and not inflight.delayed:
                chosen = inflight.left()  # reduced in place: the whole bucket lands at once
            if chosen:
                start = time.perf_counter_ns()
                # Every parameter is a view of one flat buffer and shares its version counter, so
                # writing these units would look to autograd like a write to every tensor this
                # forward already saved. Only units whose forward has not run yet are written
                # (that is what a pre-hook is for): keep the counter, as FSDP does for its views.
                with _unsafe_preserve_version_counter(tuple(self._layout.flats)):
                    self._wait(inflight)
                    waited = time.perf_counter_ns()
                    self._apply_landed(inflight, chosen)
                if due_only:  # a stall of the next forward: counted and traced
                    names = "+".join(self.units[i].name for i in chosen)
                    self._stall_s += (waited - start) / 1e9
                    self._forward_events.append(("wait", names, start, waited))
                    self._forward_events.append(("optimizer", names, waited, time.perf_counter_ns()))
            if inflight.left():
                keep.append(inflight)
        self._pending = keep

    def _apply_landed(self, inflight: _InFlight, unit_ids: list[int]) -> None:
        """Put a landed average into these units' weights, then apply the steps held back for them."""
        if inflight.delayed:
            for unit_id in unit_ids:
                corrected = inflight.delays[unit_id] > 0
                for k, lo, hi in inflight.offsets[unit_id]:
                    seg = self._layout.segments[unit_id][k]
                    live = self._layout.view(seg.key, seg.start, seg.end)
                    if corrected:  # keep the local progress made since launch
                        live.add_(inflight.reduced[lo:hi] - inflight.snapshot[lo:hi])
                    else:  # its step was held back: the weights are still the snapshot
                        live.copy_(inflight.reduced[lo:hi])
        inflight.landed.update(unit_ids)
        if self._deferred.pending:
            self._deferred.apply(p for i in unit_ids for p in self.units[i].params)

    def _discard_pending(self) -> None:
        """Drop what is in flight (a checkpoint is replacing the state): finish every collective
        on the wire first, so none is left dangling or writing into weights being loaded."""
        for inflight in self._pending:
            self._wait(inflight)  # a no-op for one restored from a checkpoint (already waited)
        self._pending = []
        self._deferred.discard()

    def _params_to_defer(self) -> set[nn.Parameter]:
        """Asked by the optimizer's step pre-hook: parameters whose average has not landed.

        Undelayed buckets that already arrived land now (same arithmetic, less waiting later).
        Buckets holding delayed units land only when due, whatever the network did, so the
        trajectory does not depend on timing.
        """
        defer: set[nn.Parameter] = set()
        keep = []
        for inflight in self._pending:
            if not inflight.delayed and inflight.average.is_ready():
                self._wait(inflight)
                self._apply_landed(inflight, inflight.left())
                continue
            keep.append(inflight)
            for unit_id in inflight.left():
                if not inflight.delays[unit_id]:
                    defer.update(self.units[unit_id].params)
        self._pending = keep
        return defer


def _check_agreement(
    units: list[SyncUnit], schedule: Schedule, group: dist.ProcessGroup, overlap: str = "backward"
) -> None:
    """Raise the same one-line error on every rank unless all agree on model and schedule.

    Checked collectively (one all-gather), so a problem seen by one rank alone fails every
    rank at once instead of leaving the others waiting in a collective until the timeout.
    """
    try:
        schedule.check_units([u.name for u in units])
        problem = None
    except ValueError as err:
        problem = str(err)
    mine = (
        [(u.name, u.signature) for u in units],
        schedule.period,
        dict(schedule.assignment),
        problem,
        (overlap, dict(schedule.delays)),
    )
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    for rank, (theirs, *_) in enumerate(gathered):  # a different model is the root cause
        if theirs != reference[0]:
            raise ValueError(_model_difference(reference[0], theirs, rank))
    if problem is not None:
        raise ValueError(problem)
    for rank, (_, _, _, their_problem, _) in enumerate(gathered):
        if their_problem is not None:
            raise ValueError(f"rank {rank}: {their_problem}")
    for rank, (_, period, assignment, _, (their_overlap, delays)) in enumerate(gathered):
        if their_overlap != reference[4][0]:
            raise ValueError(
                f"overlap differs across ranks: rank {rank} uses {their_overlap!r}, rank 0 "
                f"{reference[4][0]!r}; every rank must wrap the model the same way"
            )
        if (period, assignment, delays) != (reference[1], reference[2], reference[4][1]):
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

"""The timeline cost model: one model for every algorithm, in both overlap modes.

Units in backward order i = 0..L-1 (i = L-1 is the input side: ready last in backward, run
first in forward) have backward windows b_i, so unit i's gradients are ready at
R_i = b_0 + ... + b_i after backward starts; B_end = max(B, R_{L-1}).
One serial channel: each all-reduce starts at max(its launch, channel free), in launch order.

With a fitted comm model the simulator sends what the wrapper sends: scheduled units adjacent
in backward order coalesced into one all-reduce (split at ``bucket_cap_mb``), launched when
its last unit is ready, one latency per bucket (``CostModel``). Without one (synthetic
profiles) each unit is its own message of its own ``comm_s``, as in the paper.

``overlap="backward"`` (the paper; the default). Every average is waited for at the end of
backward, before ``optimizer.step()``, so no iteration affects the next: the channel is free
when backward starts, exposed_h = max(0, end of the last all-reduce - B_end), and iteration h
takes F + B + exposed_h + O. Delays in the schedule mean nothing here and are ignored.

``overlap="forward"``. Nothing is waited for at the end of backward, so a unit's all-reduce
also hides behind the optimizer step and the next forward:

* at B_end the optimizer steps every unit whose average is not pending, each at its share
  o_u of O (split by bytes); a unit with delay 0 whose bucket has not finished by B_end has
  its step deferred (decided at B_end: a bucket finishing during the step does not help);
* in the next iteration, unit j's forward would start f_before_j = sum_{k>j} f_k after the
  forward begins (per-unit forward times scaled to add up to F, so the glue between modules
  is shared out in proportion). Just before it the wrapper waits for j's bucket — a stall of
  max(0, bucket end - now), which is when all of the bucket's units become usable — then runs
  j's deferred step (o_j), then j's forward; stalls and deferred steps push everything after
  them later. Units with no average due never wait;
* a bucket still in flight when the iteration ends keeps the channel: the next iteration's
  buckets queue behind it;
* a unit with delay d >= 1 launched in iteration t is not deferred (it steps locally at once;
  the wrapper corrects it when the average lands) and is waited for only before its forward
  in iteration t + 1 + d. A bucket holding a delayed unit is reduced from a copy while the
  live weights train on, so the wrapper holds two copies of the whole bucket (the snapshot
  and the reduction buffer), counted here from the bucket's launch until its last unit's
  wait (the wrapper's last chance to apply the correction) — an upper bound on how long the
  copies live; the most bytes held at once is ``peak_snapshot_bytes``.
  Buckets are formed as in the other mode, whatever their units' delays.

So comm spills across iterations and periods: periods are simulated back to back, from an
idle channel, until the state at a period boundary (channel backlog, pending buckets and
which steps they defer) repeats; the timeline reported is that steady state (a cycle of
several periods when it repeats only every few). Per period it takes H (F + B + O) plus the
stalls, since deferred steps only move compute between iterations. (Backward lasts B here;
where the windows add up to R_{L-1} > B, launches move earlier by R_{L-1} - B, which is what
the backward mode's exposed time, counted from B_end but added to B, amounts to — so the same
schedule is never predicted slower with forward overlap.)

Lower bound per period, both modes: max(H (F + B + O), time to send every unit once).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from dreamddp.core.buckets import Bucket, Segment, pack_in_order, plan_buckets
from dreamddp.core.schedule import OVERLAPS, Schedule
from dreamddp.planning.profile import Profile

__all__ = [
    "OVERLAPS",
    "CommEvent",
    "ComputeSpan",
    "CostModel",
    "ForwardEngine",
    "IterationTimeline",
    "Message",
    "Timeline",
    "check_overlap",
    "forward_windows",
    "optimizer_shares",
    "simulate",
    "simulate_method",
]

Message = tuple[Sequence[int], "float | None", float]
"""One all-reduce: (units, launch offset from the start of backward — None: right after the
optimizer step — , duration)."""


def check_overlap(overlap: str) -> str:
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap must be 'backward' or 'forward', got {overlap!r}")
    return overlap


@dataclass(frozen=True)
class CommEvent:
    unit: str  # the bucket's units, joined by "+"
    start_s: float  # since the start of this iteration's backward
    end_s: float  # may lie past the iteration's end (forward overlap): the all-reduce spills over
    ready_s: float | None = None  # when its last unit's gradients were ready (None: at start_s)


@dataclass(frozen=True)
class ComputeSpan:
    """A stretch of the compute lane: forward, backward, wait (blocked on comm) or optimizer."""

    name: str
    start_s: float  # since the start of the iteration
    duration_s: float
    unit: str = ""  # for a forward wait or a deferred step: whose


@dataclass(frozen=True)
class IterationTimeline:
    phase: int
    compute_s: float  # compute run in this iteration: F + B + O (forward overlap: less the
    # steps it defers, plus the deferred steps of the previous iteration it runs)
    comm_s: float  # channel busy time of the all-reduces launched in this iteration
    exposed_s: float  # time the compute lane waited on comm
    iteration_s: float
    events: tuple[CommEvent, ...] = ()
    spans: tuple[ComputeSpan, ...] = ()  # empty: forward, backward, wait, optimizer back to back
    backward_start_s: float | None = None  # since the iteration's start; None: the forward time F
    stalls: dict[str, float] = field(default_factory=dict)  # forward overlap: unit -> wait before its forward
    comm_cpu_s: float = 0.0  # backward mode: compute the transfers took from backward (in compute_s)


@dataclass(frozen=True)
class Timeline:
    """One period of an algorithm under the cost model (forward overlap: its steady state).

    ``periods`` > 1 only when the steady state repeats every few periods: ``iterations`` then
    holds that many periods and the per-period figures are their mean.
    """

    method: str
    period: int
    iterations: tuple[IterationTimeline, ...]
    lower_bound_s: float  # per period: max(H (F + B + O), sum of c_i)
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    overlap: str = "backward"
    peak_snapshot_bytes: int = 0  # forward overlap with delays: most snapshot bytes held at once
    periods: int = 1
    steady: bool = True  # False: no repeating state within ForwardEngine.MAX_PERIODS; the last period
    warmup_periods: int = 0  # periods simulated before the steady state

    @property
    def period_s(self) -> float:
        return sum(it.iteration_s for it in self.iterations) / self.periods

    @property
    def exposed_s(self) -> float:
        return sum(it.exposed_s for it in self.iterations) / self.periods

    @property
    def iteration_s(self) -> float:
        """Mean time per iteration."""
        return self.period_s / self.period

    @property
    def bound_ratio(self) -> float:
        """Time per period over the lower bound (1.0: nothing left to gain)."""
        return self.period_s / self.lower_bound_s if self.lower_bound_s > 0 else 1.0

    @property
    def stall_by_unit(self) -> dict[str, float]:
        """Per period: how long the compute lane waited for each unit before its forward."""
        out: dict[str, float] = {}
        for it in self.iterations:
            for unit, stall in it.stalls.items():
                out[unit] = out.get(unit, 0.0) + stall / self.periods
        return out

    def to_chrome_trace(self, repeat: int = 1) -> dict:
        """Chrome/Perfetto trace: a compute lane and a comm lane, iterations back to back.

        Compute events are named forward, backward, wait and optimizer (a forward-overlap wait
        or deferred step names its unit in ``args``); comm events are named for their units and
        keep their real length, so an all-reduce that spills into later iterations is drawn
        across them. ``repeat`` draws the steady state that many times in a row, to show the
        spill across a period boundary as well.
        """
        events = []
        t = 0.0
        for _ in range(repeat):
            for it in self.iterations:
                args = {"phase": it.phase}
                if it.spans:
                    spans = [(s.name, t + s.start_s, s.duration_s, s.unit) for s in it.spans]
                else:
                    f, b, o = self.forward_s, self.backward_s, self.optimizer_s
                    spans = [
                        ("forward", t, f, ""),
                        ("backward", t + f, b, ""),
                        ("wait", t + f + b, it.exposed_s, ""),
                        ("optimizer", t + f + b + it.exposed_s, o, ""),
                    ]
                for name, start, dur, unit in spans:
                    if dur > 0:
                        events.append(
                            {
                                "name": name,
                                "ph": "X",
                                "pid": 0,
                                "tid": 0,
                                "ts": start * 1e6,
                                "dur": dur * 1e6,
                                "args": {**args, "unit": unit} if unit else dict(args),
                            }
                        )
                backward = t + (self.forward_s if it.backward_start_s is None else it.backward_start_s)
                for e in it.events:
                    events.append(
                        {
                            "name": e.unit,
                            "ph": "X",
                            "pid": 0,
                            "tid": 1,
                            "ts": (backward + e.start_s) * 1e6,
                            "dur": (e.end_s - e.start_s) * 1e6,
                            "args": dict(args),
                        }
                    )
                t += it.iteration_s
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}}
            for tid, name in ((0, "compute"), (1, "comm"))
        ]
        return {
            "traceEvents": meta + events,
            "displayTimeUnit": "ms",
            "metadata": {"method": self.method, "overlap": self.overlap},
        }

    def write_chrome_trace(self, path: str | os.PathLike[str], repeat: int = 1) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome_trace(repeat), f)


def comm_cpu_taken(profile: Profile, transfers: Sequence[tuple[int, float, float]], backward_end: float) -> float:
    """Compute that ``transfers`` (bytes, start, end; seconds since backward began) take from
    backward on the same cores: ``Profile.comm_cpu_s_per_byte`` times the bytes in flight
    before backward ends (a transfer's bytes counted in proportion to its overlap)."""
    per_byte = profile.comm_cpu_s_per_byte
    if per_byte <= 0:
        return 0.0
    taken = 0.0
    for nbytes, start, end in transfers:
        overlap = max(0.0, min(end, backward_end) - start)
        taken += per_byte * nbytes * (overlap / (end - start) if end > start else 0.0)
    return taken


def _backward_iteration(
    profile: Profile, phase: int, events: tuple[CommEvent, ...], backward_end: float, taken: float
) -> IterationTimeline:
    """A backward-overlap iteration: backward stretched by the compute its transfers take
    (``taken``), then waiting for the last all-reduce, then the step."""
    exposed = max(0.0, events[-1].end_s - (backward_end + taken)) if events else 0.0
    compute = profile.compute_s + taken
    busy = sum(e.end_s - e.start_s for e in events)
    return IterationTimeline(phase, compute, busy, exposed, compute + exposed, events, comm_cpu_s=taken)


def ready_times(backward_s: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for b in backward_s:
        total += b
        out.append(total)
    return out


class CostModel:
    """Prices one iteration that synchronises a set of units, the way the wrapper sends them.

    With a fitted comm model (alpha, beta) the wrapper's coalescing is modelled with the
    wrapper's own bucket plan (``dreamddp.core.buckets``): unit i is bytes
    ``[offset_i, offset_i + nbytes_i)`` of one flat buffer in backward order, as in the
    wrapper's flat storage, so scheduled units adjacent there form one all-reduce (split at
    ``bucket_cap_mb``), which starts when its last unit is ready and costs alpha + beta * its
    bytes — one latency per bucket, not per unit. Without one (a synthetic profile) every
    unit is its own message of its own ``comm_s``: the paper's model.
    """

    def __init__(self, profile: Profile, bucket_cap_mb: float = 25.0) -> None:
        self.profile = profile
        self.ready = ready_times([u.backward_s for u in profile.units])
        self.comm = [u.comm_s for u in profile.units]
        self.nbytes = [u.nbytes for u in profile.units]
        self.end = max(profile.backward_s, self.ready[-1] if self.ready else 0.0)
        self.cap = bucket_cap_mb * 2**20
        self.segments = _profile_segments(self.nbytes)
        # A shaper's burst (``CommModel.burst_s``): every all-reduce is waited for before the
        # step, so the link idles through the step, the forward and backward up to the first
        # launch; the bucket that refills then is spent by the iteration's first messages.
        self.burst = profile.comm.burst_s if profile.comm is not None else 0.0
        self.alpha = profile.comm.alpha_s if profile.comm is not None else 0.0
        self.idle_before = profile.forward_s + profile.optimizer_s

    def buckets(self, units: Sequence[int]) -> list[Bucket]:
        """The wrapper's buckets (in bytes) when it synchronises ``units``, in launch order."""
        return plan_buckets([self.segments[i] for i in sorted(set(units))], self.cap)

    def messages(self, units: Sequence[int]) -> list[tuple[list[int], float, float]]:
        """(units, ready time, duration) of each all-reduce, in launch order."""
        comm = self.profile.comm
        if comm is None:
            return [([i], self.ready[i], self.comm[i]) for i in sorted(units)]
        return [(list(b.units), self.ready[b.units[-1]], comm.predict(b.size)) for b in self.buckets(units)]

    def schedule_events(self, units: Sequence[int]) -> list[tuple[list[int], float, float]]:
        """(units, start, end) of each all-reduce on the serial channel."""
        free, events, tokens = 0.0, [], -1.0
        for members, ready, duration in self.messages(units):
            start = max(ready, free)
            if self.burst > 0:
                if tokens < 0:
                    tokens = min(self.burst, self.idle_before + start)
                duration, tokens = spend_burst(tokens, duration, self.alpha)
            free = start + duration
            events.append((members, start, free))
        return events

    def exposed(self, units: Sequence[int]) -> float:
        if not units:
            return 0.0
        if self.burst > 0:
            return max(0.0, self.schedule_events(units)[-1][2] - self.end)
        free = 0.0
        for _, ready, duration in self.messages(units):
            free = max(ready, free) + duration
        return max(0.0, free - self.end)

    def iteration(self, phase: int, units: Sequence[int]) -> IterationTimeline:
        scheduled = self.schedule_events(units)
        events = tuple(
            CommEvent("+".join(self.profile.units[i].name for i in members), start, end, self.ready[members[-1]])
            for members, start, end in scheduled
        )
        taken = comm_cpu_taken(
            self.profile, [(sum(self.nbytes[i] for i in m), start, end) for m, start, end in scheduled], self.end
        )
        return _backward_iteration(self.profile, phase, events, self.end, taken)

    def phase_messages(self, units: Sequence[int]) -> list[Message]:
        """The all-reduces of one iteration as the forward-overlap engine takes them."""
        return [(members, ready, duration) for members, ready, duration in self.messages(units)]


def _profile_segments(nbytes: Sequence[int]) -> list[Segment]:
    """Units as consecutive byte ranges of one buffer, in the given (backward) order: the wrapper's layout."""
    segments, offset = [], 0
    for i, size in enumerate(nbytes):
        segments.append(Segment(i, 0, offset, offset + size))
        offset += size
    return segments


def forward_windows(profile: Profile) -> list[float]:
    """Per unit, its share of the forward time F, in backward order.

    The measured per-module forward times miss the glue between modules (activations,
    attention scores, the loss), which F includes: they are scaled to add up to F, so that a
    unit's forward is expected to start where its share of the glue puts it. Without any
    per-unit time, F is split equally.
    """
    per_unit = [u.forward_s for u in profile.units]
    total = sum(per_unit)
    if total > 0:
        return [f * profile.forward_s / total for f in per_unit]
    return [profile.forward_s / len(per_unit)] * len(per_unit)


def optimizer_shares(profile: Profile) -> list[float]:
    """Per unit, its share of the optimizer step O (by bytes; equal shares if no bytes are known)."""
    nbytes = [u.nbytes for u in profile.units]
    total = sum(nbytes)
    if total > 0:
        return [profile.optimizer_s * b / total for b in nbytes]
    return [profile.optimizer_s / len(nbytes)] * len(nbytes)


@dataclass
class _Pending:
    """A unit whose all-reduce has been launched and not yet waited for."""

    end: float  # when its bucket finishes, relative to the current period's start
    need: int  # the iteration (counted from the current period's first) whose forward waits for it
    deferred: bool  # its optimizer step waits for the average
    snapshot: _Copies | None  # its bucket's copies, if the bucket holds a delayed unit


@dataclass
class _Copies:
    """A delayed bucket's snapshot and reduction buffer: 2 x its bytes until its last unit lands."""

    taken: float  # absolute time of the bucket's launch
    nbytes: int
    left: int  # units not landed yet


@dataclass(frozen=True)
class ForwardRun:
    period_s: float  # steady-state seconds per period (the mean over the cycle)
    periods: int  # length of the repeating cycle, in periods
    warmup_periods: int
    steady: bool
    iterations: tuple[IterationTimeline, ...] = ()  # with detail only
    peak_snapshot_bytes: int = 0  # with detail only
    # unit -> the latest its bucket ended after its launching iteration's backward, in the
    # steady state; <= 0 means a delay buys it nothing (it would be neither deferred nor waited for)
    overrun: dict[int, float] = field(default_factory=dict)


class ForwardEngine:
    """Forward overlap for one profile: simulates periods until the timeline repeats.

    Built once per profile and reused by the searches, which call ``run`` with different
    per-phase messages and delays; each run costs O(periods simulated x scheduled units).
    """

    MAX_PERIODS = 64

    def __init__(self, profile: Profile, model: CostModel) -> None:
        self.names = profile.names
        self.n = len(profile.units)
        fwd = forward_windows(profile)
        self.before = [0.0] * self.n  # unit j's forward starts this long after the forward begins
        for j in range(self.n - 2, -1, -1):
            self.before[j] = self.before[j + 1] + fwd[j + 1]
        self.forward = profile.forward_s
        self.opt = optimizer_shares(profile)
        self.optimizer = profile.optimizer_s
        # Backward lasts the measured B. Where the per-unit windows (medians) add up to more,
        # readiness moves earlier by the excess: the backward mode's convention too (its
        # exposed time counts from B_end = max(B, R_last) but the iteration charges B), so
        # that a schedule is never predicted slower with forward overlap than without.
        self.shift = model.end - profile.backward_s
        self.ready = [r - self.shift for r in model.ready]
        self.end = profile.backward_s
        self.nbytes = model.nbytes
        scale = profile.forward_s + model.end + profile.optimizer_s + sum(u.comm_s for u in profile.units)
        self.tol = 1e-9 * max(scale, 1e-9)

    def _copies(self, members: Sequence[int], delays: Sequence[int], taken: float) -> _Copies | None:
        """The copies a bucket launched at ``taken`` holds, if any of its units is delayed."""
        if not any(delays[u] for u in members):
            return None
        return _Copies(taken, 2 * sum(self.nbytes[u] for u in members), len(members))

    def run(self, phases: Sequence[Sequence[Message]], delays: Sequence[int], detail: bool = False) -> ForwardRun:
        """The steady state of ``phases`` (per iteration of the period, its all-reduces in launch
        order) with per-unit ``delays`` (each shorter than the gap to the unit's next average)."""
        H = len(phases)
        pending: dict[int, _Pending] = {}
        due: dict[int, list[int]] = {}  # iteration -> units whose forward waits for their average
        free = 0.0  # channel free, relative to the current period's start
        base = 0.0  # absolute start of the current period
        starts: list[float] = []
        lengths: list[float] = []
        states: list[tuple] = []
        records: list[list[IterationTimeline]] = []
        overruns: list[dict[int, float]] = []
        snapshots: list[tuple[float, float, int]] = []
        cycle_from, steady = None, True
        for _ in range(self.MAX_PERIODS):
            starts.append(base)
            now = 0.0
            iterations: list[IterationTimeline] = []
            overrun: dict[int, float] = {}
            overruns.append(overrun)
            for h in range(H):
                start, shift, stalled = now, 0.0, 0.0
                spans: list[ComputeSpan] = []
                stalls: dict[str, float] = {}
                segment = start  # where the current stretch of forward began
                for u in sorted(due.pop(h, ()), reverse=True):  # forward runs the input side first
                    entry = pending.pop(u)
                    at = start + self.before[u] + shift
                    stall = entry.end - at if entry.end > at else 0.0
                    step = self.opt[u] if entry.deferred else 0.0
                    if entry.snapshot is not None:
                        entry.snapshot.left -= 1
                        if not entry.snapshot.left:
                            snapshots.append((entry.snapshot.taken, base + at + stall, entry.snapshot.nbytes))
                    if detail and (stall > 0.0 or step > 0.0):
                        if at > segment:
                            spans.append(ComputeSpan("forward", segment - start, at - segment))
                        if stall > 0.0:
                            spans.append(ComputeSpan("wait", at - start, stall, self.names[u]))
                            stalls[self.names[u]] = stall
                        if step > 0.0:
                            spans.append(ComputeSpan("optimizer", at + stall - start, step, self.names[u]))
                        segment = at + stall + step
                    shift += stall + step
                    stalled += stall
                backward = start + self.forward + shift
                backward_end = backward + self.end
                events: list[CommEvent] = []
                busy, deferred, after = 0.0, 0.0, []
                for members, offset, duration in phases[h]:
                    if offset is None:
                        after.append((members, duration))
                        continue
                    begin = max(backward + offset - self.shift, free)
                    free = begin + duration
                    busy += duration
                    copies = self._copies(members, delays, base + backward + max(self.ready[u] for u in members))
                    for u in members:
                        d = delays[u]
                        overrun[u] = max(overrun.get(u, -math.inf), free - backward_end)
                        late = d == 0 and free > backward_end
                        if late:
                            deferred += self.opt[u]
                        pending[u] = _Pending(free, h + 1 + d, late, copies)
                        due.setdefault(h + 1 + d, []).append(u)
                    if detail:
                        events.append(
                            CommEvent("+".join(self.names[u] for u in members), begin - backward, free - backward)
                        )
                now = backward_end + (self.optimizer - deferred if deferred else self.optimizer)
                for members, duration in after:  # averaged after the step: nothing to defer
                    begin = max(now, free)
                    free = begin + duration
                    busy += duration
                    copies = self._copies(members, delays, base + now)
                    for u in members:
                        pending[u] = _Pending(free, h + 1 + delays[u], False, copies)
                        due.setdefault(h + 1 + delays[u], []).append(u)
                    if detail:
                        events.append(
                            CommEvent("+".join(self.names[u] for u in members), begin - backward, free - backward)
                        )
                if detail:
                    if backward > segment:
                        spans.append(ComputeSpan("forward", segment - start, backward - segment))
                    spans.append(ComputeSpan("backward", backward - start, self.end))
                    if now > backward_end:
                        spans.append(ComputeSpan("optimizer", backward_end - start, now - backward_end))
                    iterations.append(
                        IterationTimeline(
                            h,
                            now - start - stalled,
                            busy,
                            stalled,
                            now - start,
                            tuple(events),
                            tuple(s for s in spans if s.duration_s > 0),
                            backward - start,
                            stalls,
                        )
                    )
            # Rebase on the next period's start, so a repeating state repeats in the numbers too.
            length = now
            lengths.append(length)
            records.append(iterations)
            base += length
            free -= length
            for entry in pending.values():
                entry.end -= length
                entry.need -= H
            due = {k - H: v for k, v in due.items()}
            keys = tuple(sorted((u, e.need, e.deferred) for u, e in pending.items()))
            ends = tuple(max(pending[k[0]].end, 0.0) for k in keys)
            state = (keys, max(free, 0.0), ends)
            for k, seen in enumerate(states):
                if (
                    seen[0] == keys
                    and abs(seen[1] - state[1]) <= self.tol
                    and all(abs(a - b) <= self.tol for a, b in zip(seen[2], ends))
                ):
                    cycle_from = k + 1
                    break
            if cycle_from is not None:
                break
            states.append(state)
        if cycle_from is None:  # no repeat (should not happen): report the last period
            cycle_from, steady = len(lengths) - 1, False
        count = len(lengths) - cycle_from
        period_s = sum(lengths[cycle_from:]) / count
        overrun = {}
        for period_overrun in overruns[cycle_from:]:
            for u, late_by in period_overrun.items():
                overrun[u] = max(overrun.get(u, -math.inf), late_by)
        if not detail:
            return ForwardRun(period_s, count, cycle_from, steady, overrun=overrun)
        window = (starts[cycle_from], base)
        in_flight = {id(e.snapshot): e.snapshot for e in pending.values() if e.snapshot is not None}
        snapshots += [(c.taken, math.inf, c.nbytes) for c in in_flight.values()]
        steady_iterations = tuple(it for its in records[cycle_from:] for it in its)
        return ForwardRun(period_s, count, cycle_from, steady, steady_iterations, _peak(snapshots, *window), overrun)


def _peak(intervals: Sequence[tuple[float, float, int]], lo: float, hi: float) -> int:
    """Most bytes held at once within [lo, hi), each interval holding its bytes over [start, end)."""
    marks = []
    for start, end, nbytes in intervals:
        start, end = max(start, lo), min(end, hi)
        if start < end:
            marks += [(start, 1, nbytes), (end, 0, -nbytes)]  # at a tie, release before taking
    held = peak = 0
    for _, _, change in sorted(marks):
        held += change
        peak = max(peak, held)
    return peak


def _lower_bound(profile: Profile, period: int) -> float:
    """Per period: the compute, or the link time to send every unit once, whichever is more.

    With a comm model the cheapest way to send everything is one message (one latency);
    without one, every unit's own time.
    """
    compute = profile.compute_s
    if profile.comm is not None:
        c = profile.comm
        # One message, or with a burst worth more than a latency, one after every iteration's idle.
        per_message = c.alpha_s - c.burst_s
        comm = c.beta_s_per_byte * sum(u.nbytes for u in profile.units)
        comm = max(0.0, comm + (per_message if per_message >= 0 else period * per_message))
    else:
        comm = sum(u.comm_s for u in profile.units)
    return max(period * compute, comm)


def simulate(
    profile: Profile,
    schedule: Schedule,
    method: str = "schedule",
    bucket_cap_mb: float = 25.0,
    overlap: str | None = None,
) -> Timeline:
    """One period of ``schedule``: its all-reduces launched from backward as the wrapper does.

    ``overlap``: ``"backward"`` (waited for before the step; the paper) or ``"forward"``
    (waited for before each unit's next forward, with the schedule's delays; the steady
    state). None: what the schedule was planned for (``schedule.overlap``).
    """
    overlap = check_overlap(schedule.overlap if overlap is None else overlap)
    schedule.check_units(profile.names)
    index = {name: i for i, name in enumerate(profile.names)}
    model = CostModel(profile, bucket_cap_mb)
    groups = [[index[n] for n in schedule.units_at(h)] for h in range(schedule.period)]
    lower = _lower_bound(profile, schedule.period)
    if overlap == "backward":
        iterations = tuple(model.iteration(h, g) for h, g in enumerate(groups))
        return Timeline(
            method, schedule.period, iterations, lower, profile.forward_s, profile.backward_s, profile.optimizer_s
        )
    phases = [model.phase_messages(g) for g in groups]
    delays = [schedule.delay_of(n) for n in profile.names]
    return _forward_timeline(profile, model, phases, delays, method, lower)


def _forward_timeline(
    profile: Profile,
    model: CostModel,
    phases: Sequence[Sequence[Message]],
    delays: Sequence[int],
    method: str,
    lower: float,
) -> Timeline:
    run = ForwardEngine(profile, model).run(phases, delays, detail=True)
    return Timeline(
        method,
        len(phases),
        run.iterations,
        lower,
        profile.forward_s,
        profile.backward_s,
        profile.optimizer_s,
        "forward",
        run.peak_snapshot_bytes,
        run.periods,
        run.steady,
        run.warmup_periods,
    )


def simulate_method(
    profile: Profile, method: str, period: int, bucket_cap_mb: float = 25.0, overlap: str = "backward"
) -> Timeline:
    """The baselines: ``ssgd`` (torch DDP) and ``local_sgd`` (blocking average after the step).

    With ``overlap="forward"``, what each would cost if it waited like DreamDDP's forward
    mode (what-if figures; the baselines as trained always block): ``ssgd``'s gradient buckets
    are waited for before each unit's next forward, deferring that unit's step until then;
    ``local_sgd``'s average, launched after the step in forward order, is waited for unit by
    unit in the next forward.
    """
    check_overlap(overlap)
    compute = profile.compute_s
    if method == "local_sgd":
        if overlap == "forward":
            order = list(reversed(range(len(profile.units))))  # the input side first: needed first
            after: list[Message] = [(members, None, cost) for members, cost in _buckets(profile, order, bucket_cap_mb)]
            phases: list[list[Message]] = [[] for _ in range(period - 1)] + [after]
            return _forward_timeline(
                profile,
                CostModel(profile, bucket_cap_mb),
                phases,
                [0] * len(profile.units),
                method,
                _lower_bound(profile, period),
            )
        # The average follows H iterations in which the link carried nothing: a full bucket.
        cost = _bucketed_cost(profile, list(range(len(profile.units))), bucket_cap_mb, idle_s=period * compute)
        iterations = tuple(
            IterationTimeline(
                h,
                compute,
                cost if h == period - 1 else 0.0,
                cost if h == period - 1 else 0.0,
                compute + (cost if h == period - 1 else 0.0),
            )
            for h in range(period)
        )
        return Timeline(
            method,
            period,
            iterations,
            _lower_bound(profile, period),
            profile.forward_s,
            profile.backward_s,
            profile.optimizer_s,
        )
    if method == "ssgd":
        ready = ready_times([u.backward_s for u in profile.units])
        free, events = 0.0, []
        buckets = ddp_buckets([u.nbytes for u in profile.units], bucket_cap_mb)
        if overlap == "forward":
            messages = [(m, ready[m[-1]], _bucketed_cost(profile, m, float("inf"))) for m in buckets]
            timeline = _forward_timeline(
                profile, CostModel(profile, bucket_cap_mb), [messages], [0] * len(profile.units), method, 0.0
            )
            busy = sum(it.comm_s for it in timeline.iterations) / timeline.periods
            return dataclasses.replace(timeline, lower_bound_s=max(compute, busy))
        tokens = -1.0
        for members in buckets:
            start = max(ready[members[-1]], free)
            if tokens < 0:  # the link idled since the last iteration's buckets, waited before its step
                tokens = profile.forward_s + profile.optimizer_s + start
            duration, tokens = _spend_burst(profile, _bucketed_cost(profile, members, float("inf")), tokens)
            free = start + duration
            events.append(
                CommEvent("+".join(profile.units[i].name for i in members[:3]), start, free, ready[members[-1]])
            )
        nbytes = [sum(profile.units[i].nbytes for i in members) for members in buckets]
        taken = comm_cpu_taken(profile, [(n, e.start_s, e.end_s) for n, e in zip(nbytes, events)], profile.backward_s)
        it = _backward_iteration(profile, 0, tuple(events), profile.backward_s, taken)
        busy = it.comm_s
        return Timeline(
            method, 1, (it,), max(compute, busy), profile.forward_s, profile.backward_s, profile.optimizer_s
        )
    raise ValueError(f"unknown baseline method {method!r}; choose ssgd or local_sgd")


def _buckets(profile: Profile, order: Sequence[int], bucket_cap_mb: float) -> list[tuple[list[int], float]]:
    """Units in ``order`` packed into flat buckets of at most the cap: (members, all-reduce time).

    Without a fitted comm model every unit is its own message of its own time.
    """
    comm = profile.comm
    if comm is None:
        return [([i], profile.units[i].comm_s) for i in order]
    sizes = [profile.units[i].nbytes for i in order]
    out: list[tuple[list[int], float]] = []
    for bucket in pack_in_order(sizes, bucket_cap_mb * 2**20):
        out.append(([order[k] for k in bucket], comm.predict(sum(sizes[k] for k in bucket))))
    return out


def _bucketed_cost(profile: Profile, members: list[int], bucket_cap_mb: float, idle_s: float = 0.0) -> float:
    """Time to all-reduce these units coalesced into buckets (alpha once per bucket), back to
    back after ``idle_s`` of silence on the link (whose burst the first buckets spend).

    Without a fitted comm model the units' own times are summed (latency paid per unit).
    """
    total, tokens = 0.0, idle_s
    for _, cost in _buckets(profile, members, bucket_cap_mb):
        cost, tokens = _spend_burst(profile, cost, tokens)
        total += cost
    return total


def _spend_burst(profile: Profile, duration: float, tokens: float) -> tuple[float, float]:
    """(duration less what the shaper's burst saves, tokens left) for one all-reduce.

    ``tokens``: seconds of silence the link has had (capped at the burst here). The burst
    passes at line rate, so it shortens the transfer, never the latency.
    """
    comm = profile.comm
    if comm is None or comm.burst_s <= 0:
        return duration, tokens
    return spend_burst(min(tokens, comm.burst_s), duration, comm.alpha_s)


def spend_burst(tokens: float, duration: float, alpha: float) -> tuple[float, float]:
    """(duration, tokens left) of one all-reduce of ``duration`` that finds ``tokens`` seconds of
    burst: the burst shortens the transfer (``duration - alpha``), never the latency. The one
    rule every channel here spends the burst by, so that their prices agree bit for bit."""
    saved = min(tokens, duration - alpha)
    return duration - saved, tokens - saved


def ddp_buckets(nbytes: Sequence[int], bucket_cap_mb: float) -> list[list[int]]:
    """torch DDP's gradient buckets (units in backward order) once its reducer has rebuilt them.

    Measured on torch 2.13 with a comm hook: given an explicit ``bucket_cap_mb`` (as every
    strategy here passes), DDP's first bucket has the same cap as the rest (its 1 MiB first
    bucket is only for the default), and the rebuilt buckets fill in gradient-ready order
    until they *reach* the cap, so a bucket holds the tensor that crosses it. The tiny GPT's
    3.3 MB of gradients are one all-reduce launched at the end of backward, not 1 MiB + rest.
    """
    cap = bucket_cap_mb * 2**20
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i, b in enumerate(nbytes):
        current.append(i)
        size += b
        if size >= cap:
            buckets.append(current)
            current, size = [], 0
    if current:
        buckets.append(current)
    return buckets

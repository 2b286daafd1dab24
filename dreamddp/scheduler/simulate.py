"""The timeline cost model: one model for every algorithm.

Units in backward order i = 0..L-1 have backward windows b_i (so unit i's gradients are ready
at R_i = b_0 + ... + b_i after backward starts) and all-reduce times c_i. One serial channel:
a synchronised unit's all-reduce starts at max(R_i, channel free). An iteration's exposed time
is max(0, end of its last all-reduce - end of backward B); its time is F + B + exposed + O.

With a fitted comm model the simulator sends what the wrapper sends: scheduled units adjacent
in backward order coalesced into one all-reduce, one latency per bucket (``CostModel``).
Without one (synthetic profiles) each unit is its own message, as in the paper.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from profiler import Profile

from ..schedule import Schedule

__all__ = ["CommEvent", "CostModel", "IterationTimeline", "Timeline", "simulate", "simulate_method"]


@dataclass(frozen=True)
class CommEvent:
    unit: str
    start_s: float  # since the start of backward
    end_s: float


@dataclass(frozen=True)
class IterationTimeline:
    phase: int
    compute_s: float  # F + B + O
    comm_s: float  # channel busy time
    exposed_s: float
    iteration_s: float
    events: tuple[CommEvent, ...] = ()


@dataclass(frozen=True)
class Timeline:
    """One period of an algorithm under the cost model."""

    method: str
    period: int
    iterations: tuple[IterationTimeline, ...]
    lower_bound_s: float  # per period: max(H (F + B + O), sum of c_i)
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0

    @property
    def period_s(self) -> float:
        return sum(it.iteration_s for it in self.iterations)

    @property
    def exposed_s(self) -> float:
        return sum(it.exposed_s for it in self.iterations)

    @property
    def iteration_s(self) -> float:
        """Mean time per iteration."""
        return self.period_s / self.period

    def to_chrome_trace(self) -> dict:
        """Chrome/Perfetto trace: a compute lane and a comm lane, iterations back to back."""
        events = []
        t = 0.0
        for it in self.iterations:
            f, b, o = self.forward_s, self.backward_s, self.optimizer_s
            for name, start, dur in (("forward", t, f), ("backward", t + f, b),
                                     ("wait", t + f + b, it.exposed_s), ("optimizer", t + f + b + it.exposed_s, o)):
                if dur > 0:
                    events.append({"name": name, "ph": "X", "pid": 0, "tid": 0, "ts": start * 1e6, "dur": dur * 1e6,
                                   "args": {"phase": it.phase}})
            for e in it.events:
                events.append({"name": e.unit, "ph": "X", "pid": 0, "tid": 1, "ts": (t + f + e.start_s) * 1e6,
                               "dur": (e.end_s - e.start_s) * 1e6, "args": {"phase": it.phase}})
            t += it.iteration_s
        meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}}
                for tid, name in ((0, "compute"), (1, "comm"))]
        return {"traceEvents": meta + events, "displayTimeUnit": "ms", "metadata": {"method": self.method}}

    def write_chrome_trace(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_chrome_trace(), f)


def ready_times(backward_s: Sequence[float]) -> list[float]:
    out, total = [], 0.0
    for b in backward_s:
        total += b
        out.append(total)
    return out


class CostModel:
    """Prices one iteration that synchronises a set of units, the way the wrapper sends them.

    With a fitted comm model (alpha, beta) the wrapper's coalescing is modelled: scheduled
    units adjacent in backward order form one all-reduce (split at ``bucket_cap_mb``), which
    starts when its last unit is ready and costs alpha + beta * its bytes — one latency per
    bucket, not per unit. Without one (a synthetic profile) every unit is its own message of
    its own ``comm_s``: the paper's model.
    """

    def __init__(self, profile: Profile, bucket_cap_mb: float = 25.0) -> None:
        self.profile = profile
        self.ready = ready_times([u.backward_s for u in profile.units])
        self.comm = [u.comm_s for u in profile.units]
        self.nbytes = [u.nbytes for u in profile.units]
        self.end = max(profile.backward_s, self.ready[-1] if self.ready else 0.0)
        self.coalesce = profile.comm is not None
        self.cap = bucket_cap_mb * 2**20

    def messages(self, units: Sequence[int]) -> list[tuple[list[int], float, float]]:
        """(units, ready time, duration) of each all-reduce, in launch order."""
        ordered = sorted(units)
        if not self.coalesce:
            return [([i], self.ready[i], self.comm[i]) for i in ordered]
        runs: list[list[int]] = []
        size = 0
        for i in ordered:
            if runs and runs[-1][-1] == i - 1 and size + self.nbytes[i] <= self.cap:
                runs[-1].append(i)
                size += self.nbytes[i]
            else:
                runs.append([i])
                size = self.nbytes[i]
        comm = self.profile.comm
        return [(run, self.ready[run[-1]], comm.predict(sum(self.nbytes[i] for i in run))) for run in runs]

    def schedule_events(self, units: Sequence[int]) -> list[tuple[list[int], float, float]]:
        """(units, start, end) of each all-reduce on the serial channel."""
        free, events = 0.0, []
        for members, ready, duration in self.messages(units):
            start = max(ready, free)
            free = start + duration
            events.append((members, start, free))
        return events

    def exposed(self, units: Sequence[int]) -> float:
        free = 0.0
        for _, ready, duration in self.messages(units):
            free = max(ready, free) + duration
        return max(0.0, free - self.end) if units else 0.0

    def iteration(self, phase: int, units: Sequence[int]) -> IterationTimeline:
        events = tuple(
            CommEvent("+".join(self.profile.units[i].name for i in members), start, end)
            for members, start, end in self.schedule_events(units)
        )
        exposed = max(0.0, events[-1].end_s - self.end) if events else 0.0
        compute = self.profile.forward_s + self.profile.backward_s + self.profile.optimizer_s
        busy = sum(e.end_s - e.start_s for e in events)
        return IterationTimeline(phase, compute, busy, exposed, compute + exposed, events)


def _lower_bound(profile: Profile, period: int) -> float:
    """Per period: the compute, or the link time to send every unit once, whichever is more.

    With a comm model the cheapest way to send everything is one message (one latency);
    without one, every unit's own time.
    """
    compute = profile.forward_s + profile.backward_s + profile.optimizer_s
    if profile.comm is not None:
        comm = profile.comm.predict(sum(u.nbytes for u in profile.units))
    else:
        comm = sum(u.comm_s for u in profile.units)
    return max(period * compute, comm)


def simulate(profile: Profile, schedule: Schedule, method: str = "schedule", bucket_cap_mb: float = 25.0) -> Timeline:
    """One period of ``schedule`` (averaging before the step, overlapped with backward)."""
    schedule.check_units(profile.names)
    index = {name: i for i, name in enumerate(profile.names)}
    model = CostModel(profile, bucket_cap_mb)
    iterations = tuple(model.iteration(h, [index[n] for n in schedule.units_at(h)]) for h in range(schedule.period))
    return Timeline(method, schedule.period, iterations, _lower_bound(profile, schedule.period),
                    profile.forward_s, profile.backward_s, profile.optimizer_s)


def simulate_method(profile: Profile, method: str, period: int, bucket_cap_mb: float = 25.0) -> Timeline:
    """The baselines: ``ssgd`` (torch DDP) and ``local_sgd`` (blocking average after the step)."""
    compute = profile.forward_s + profile.backward_s + profile.optimizer_s
    if method == "local_sgd":
        cost = _bucketed_cost(profile, list(range(len(profile.units))), bucket_cap_mb)
        iterations = tuple(
            IterationTimeline(h, compute, cost if h == period - 1 else 0.0, cost if h == period - 1 else 0.0,
                              compute + (cost if h == period - 1 else 0.0))
            for h in range(period)
        )
        return Timeline(method, period, iterations, _lower_bound(profile, period),
                        profile.forward_s, profile.backward_s, profile.optimizer_s)
    if method == "ssgd":
        # DDP: gradient buckets in backward order (1 MiB first, then bucket_cap_mb), each
        # all-reduced once all its gradients are ready; every iteration.
        ready = ready_times([u.backward_s for u in profile.units])
        free, cap, size, members, events = 0.0, 1 * 2**20, 0, [], []
        buckets: list[list[int]] = []
        for i, u in enumerate(profile.units):
            if members and size + u.nbytes > cap:
                buckets.append(members)
                members, size, cap = [], 0, int(bucket_cap_mb * 2**20)
            members.append(i)
            size += u.nbytes
        if members:
            buckets.append(members)
        for members in buckets:
            start = max(ready[members[-1]], free)
            free = start + _bucketed_cost(profile, members, float("inf"))
            events.append(CommEvent("+".join(profile.units[i].name for i in members[:3]), start, free))
        exposed = max(0.0, free - profile.backward_s)
        busy = sum(e.end_s - e.start_s for e in events)
        it = IterationTimeline(0, compute, busy, exposed, compute + exposed, tuple(events))
        return Timeline(method, 1, (it,), max(compute, busy), profile.forward_s, profile.backward_s, profile.optimizer_s)
    raise ValueError(f"unknown baseline method {method!r}; choose ssgd or local_sgd")


def _bucketed_cost(profile: Profile, members: list[int], bucket_cap_mb: float) -> float:
    """Time to all-reduce these units coalesced into buckets (alpha once per bucket).

    Without a fitted comm model the units' own times are summed (latency paid per unit).
    """
    if profile.comm is None:
        return sum(profile.units[i].comm_s for i in members)
    cap = bucket_cap_mb * 2**20
    total, size, count = 0.0, 0, 0
    for i in members:
        nbytes = profile.units[i].nbytes
        if count and size + nbytes > cap:
            total += profile.comm.predict(size)
            size, count = 0, 0
        size += nbytes
        count += 1
    if count:
        total += profile.comm.predict(size)
    return total

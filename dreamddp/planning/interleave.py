"""The backward-mode search at real-model scale: interleaved runs, and a certified lower bound.

Why another search: the exact subset DP stops at ~10 units and the contiguous optimum leaves
time on the table (its last block holds the units ready last, whose all-reduces cannot hide).
A real model has 100-2,000 units, and a search that stops at a wall-clock budget gives a
different schedule on every run. This one is deterministic and bounded by arithmetic alone.

The cost of one iteration's group is a serial channel with release times: each all-reduce
(bucket) starts when its last unit is ready and when the previous one is done, and the group's
exposed time is how far the last one ends past the end of backward. Written backwards from
the last bucket, that is ``max(0, max_b (sum of durations from b on) - slack_b)``, with
``slack_b`` the time from bucket b's release to the end of backward. So a greedy that walks
the units from the last ready to the first knows every group's exposed time exactly as it goes
(up to where the bucket cap splits a run), and every choice it makes is priced right away.

``interleaved_runs``: walking backwards, each unit extends the run its successor opened
(adjacent in the flat buffer, so the same all-reduce: no new latency) while that keeps its
iteration within a budget of exposed time; otherwise it opens a run in the least loaded
iteration where it fits the budget, and where it fits nowhere, in the one it costs least. A
small budget spreads every iteration's channel over the whole backward (balance, at one latency
per run); a large one keeps runs long (few latencies). ``search`` tries a fixed ladder of
budgets, refines it around the best rung, polishes the best result and the best seed (the
contiguous optimum, passed in by ``search.best``) with moves at run boundaries, and keeps the
better: never worse than the contiguous optimum, and the same result on every run.

``exposure_lower_bound``: for any unit k, the bytes of units ready at or after k can only be
sent after ready(k), one latency at least per group that holds any of them, so
``sum_h exposed_h >= beta * bytes(>= k) + m * (alpha - slack_k)`` with m the number of such
groups (1 when alpha >= slack_k, else at most min(H, units from k on)). The maximum over k is
a bound no schedule beats; the search reports its gap to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from dreamddp.planning.simulate import CostModel, spend_burst

__all__ = ["exposure_lower_bound", "interleaved_runs", "search"]

# Exposed-time budgets per group tried, as multiples of the mean channel time per iteration.
BUDGET_FACTORS = (0.0, *(2.0**-j for j in range(12, -2, -1)))


class _Priced(Protocol):
    """What the search needs of an instance: its cost model, period and the exact group cost."""

    model: CostModel
    period: int
    n: int

    def cost(self, units: Sequence[int]) -> float: ...


def _durations(model: CostModel) -> tuple[float, float, list[float]]:
    """(alpha, beta, per-unit bandwidth time): the per-unit model has alpha 0 and its own times."""
    comm = model.profile.comm
    if comm is None:
        return 0.0, 0.0, list(model.comm)
    return comm.alpha_s, comm.beta_s_per_byte, [comm.beta_s_per_byte * b for b in model.nbytes]


def exposure_lower_bound(model: CostModel, period: int) -> float:
    """Total exposed seconds per period that no schedule (each unit once) can go below."""
    n = len(model.nbytes)
    if n == 0:
        return 0.0
    alpha, _, own = _durations(model)
    alpha -= model.burst  # a group's messages save at most one burst between them
    per_unit = model.profile.comm is None
    ready = np.asarray(model.ready, dtype=float)
    slack = model.end - ready
    tail = np.cumsum(np.asarray(own, dtype=float)[::-1])[::-1]  # bandwidth time of units k..n-1
    groups_max = np.minimum(period, n - np.arange(n))
    if per_unit:  # each unit its own message: no latency term, m groups at most
        bound = tail - slack * groups_max
    else:
        m = np.where(alpha >= slack, 1, groups_max)
        bound = tail + m * (alpha - slack)
    return float(max(0.0, bound.max()))


def interleaved_runs(model: CostModel, period: int, budget_s: float) -> list[list[int]]:
    """Units -> at most ``period`` groups, by the backward greedy with this exposed-time budget per group."""
    n, H = len(model.nbytes), period
    alpha, _, own = _durations(model)
    coalesce = model.profile.comm is not None
    slack = [model.end - r for r in model.ready]
    load = np.zeros(H)  # channel time of the group's buckets so far (all later than the unit at hand)
    closed = np.full(H, -np.inf)  # max over the group's closed buckets of (time from it on - its slack)
    open_slack = np.zeros(H)  # the open bucket's slack (its last unit's)
    open_bytes = np.zeros(H)
    has_open = np.zeros(H, dtype=bool)
    lowest = np.full(H, -1)  # the group's lowest unit so far: adjacency for coalescing
    exposed = np.zeros(H)
    index = np.arange(H)
    owner = [0] * n
    for k in range(n - 1, -1, -1):
        d_new = alpha + own[k]
        # Every group: open a new bucket holding k (closing its open one).
        closed_new = np.where(has_open, np.maximum(closed, load - open_slack), closed)
        load_new = load + d_new
        exposed_new = np.maximum(np.maximum(closed_new, load_new - slack[k]), 0.0)
        delta = exposed_new - exposed
        successor = owner[k + 1] if k + 1 < n else -1
        extend = (
            coalesce
            and successor >= 0
            and lowest[successor] == k + 1
            and open_bytes[successor] + model.nbytes[k] <= model.cap
        )
        if extend:
            g = successor
            ext_load = load[g] + own[k]
            ext_exposed = max(0.0, closed[g], ext_load - open_slack[g])
            delta[g] = ext_exposed - exposed[g]
        within = np.maximum(exposed, budget_s)
        if extend and delta[successor] <= within[successor] - exposed[successor] + 1e-15:
            h = successor  # the run goes on: no new latency, and it stays within the group's budget
        else:
            fits = index[exposed_new <= within + 1e-15]
            if extend:
                fits = fits[fits != successor]
            if len(fits):  # a new run where it stays within budget: the least loaded such group
                h = int(fits[np.argmin(load[fits])])
            else:  # over budget everywhere: the least added exposure, then the least load
                best = float(delta.min())
                ties = index[delta <= best + 1e-15]
                h = successor if extend and successor in ties else int(ties[np.argmin(load[ties])])
        if extend and h == successor:
            load[h] += own[k]
            open_bytes[h] += model.nbytes[k]
            exposed[h] = max(0.0, closed[h], load[h] - open_slack[h])
        else:
            closed[h], load[h], exposed[h] = closed_new[h], load_new[h], exposed_new[h]
            open_slack[h], open_bytes[h], has_open[h] = slack[k], model.nbytes[k], True
        lowest[h] = k
        owner[k] = h
    groups: list[list[int]] = [[] for _ in range(H)]
    for unit, h in enumerate(owner):
        groups[h].append(unit)
    return groups


class FastCost:
    """The exact exposed time of a group (``CostModel.exposed``), in one loop over plain floats.

    The local search prices thousands of moves; building ``Segment``/``Bucket`` objects for each
    made that the bottleneck. The packing rule is ``plan_buckets``' (adjacent in the flat buffer
    and within the cap: one bucket), and a test holds the two equal.
    """

    def __init__(self, model: CostModel) -> None:
        self.model = model
        comm = model.profile.comm
        self.per_unit = comm is None
        self.alpha = comm.alpha_s if comm is not None else 0.0
        self.beta = comm.beta_s_per_byte if comm is not None else 0.0
        self.starts, offset = [], 0
        for size in model.nbytes:
            self.starts.append(offset)
            offset += size
        self.nbytes = list(model.nbytes)
        self.ready = list(model.ready)
        self.comm = list(model.comm)
        self.cap = model.cap
        self.end = model.end
        self.burst = model.burst
        self.idle_before = model.idle_before

    def __call__(self, units: Sequence[int]) -> float:
        """``units`` ascending."""
        if not units:
            return 0.0
        ready = self.ready
        free = 0.0
        if self.per_unit:
            comm = self.comm
            for k in units:
                r = ready[k]
                free = (r if r > free else free) + comm[k]
            return max(0.0, free - self.end)
        starts, nbytes, cap, alpha, beta = self.starts, self.nbytes, self.cap, self.alpha, self.beta
        burst, tokens = self.burst, -1.0  # tokens < 0: the iteration's first bucket has not started
        first = units[0]
        b_start, b_end, last = starts[first], starts[first] + nbytes[first], first
        for nxt in itertools.chain(units[1:], (None,)):  # None closes the last bucket
            if nxt is not None:
                s, e = starts[nxt], starts[nxt] + nbytes[nxt]
                if s == b_end and e - b_start <= cap:
                    b_end, last = e, nxt
                    continue
            r = ready[last]
            start = r if r > free else free
            duration = alpha + beta * (b_end - b_start)
            if burst > 0:  # the first buckets spend what the link's idle time refilled
                if tokens < 0:
                    tokens = min(burst, self.idle_before + start)
                duration, tokens = spend_burst(tokens, duration, alpha)
            free = start + duration
            if nxt is not None:
                b_start, b_end, last = s, e, nxt
        return max(0.0, free - self.end)


def polish(cost: FastCost, groups: list[list[int]], period: int, max_passes: int = 20) -> list[list[int]]:
    """Moves at run boundaries while they lower the total, first improvement, at most ``max_passes``.

    A run is a maximal stretch of units (in backward order) in one group. Moving a run's edge
    unit to the neighbouring run's group, or a whole run to its neighbour's group (one latency
    less), keeps the schedule made of runs; anything else would add latencies the greedy avoided.
    Deterministic: the result depends on the groups given, not on time.
    """
    n = sum(len(g) for g in groups)
    owner = [0] * n
    for h, g in enumerate(groups):
        for u in g:
            owner[u] = h
    members = [sorted(g) for g in groups]
    costs = [cost(g) for g in members]

    def moved(group: list[int], out: Sequence[int], into: Sequence[int]) -> list[int]:
        drop = set(out)
        return sorted([u for u in group if u not in drop] + list(into))

    for _ in range(max_passes):
        improved = False
        k = 0
        while k < n - 1:
            a, b = owner[k], owner[k + 1]
            if a == b:
                k += 1
                continue
            # The boundary between k (group a) and k + 1 (group b): the runs on either side.
            lo = k
            while lo > 0 and owner[lo - 1] == a:
                lo -= 1
            hi = k + 1
            while hi < n - 1 and owner[hi + 1] == b:
                hi += 1
            trials = [([k], a, b), ([k + 1], b, a), (list(range(lo, k + 1)), a, b), (list(range(k + 1, hi + 1)), b, a)]
            for units, src, dst in trials:
                new_src = moved(members[src], units, ())
                new_dst = moved(members[dst], (), units)
                c_src, c_dst = cost(new_src), cost(new_dst)
                if c_src + c_dst < costs[src] + costs[dst] - 1e-12:
                    members[src], members[dst], costs[src], costs[dst] = new_src, new_dst, c_src, c_dst
                    for u in units:
                        owner[u] = dst
                    improved = True
                    break
            k += 1
        if not improved:
            break
    return members


def search(inst: _Priced, seeds: Sequence[Sequence[Sequence[int]]] = ()) -> tuple[list[list[int]], float]:
    """The greedy over a ladder of budgets (refined around the best rung), and ``seeds``; the best
    greedy result and the best seed are polished, and the better one returned: (groups, exposed s)."""
    alpha, _, own = _durations(inst.model)
    mean = (sum(own) + alpha * inst.n) / inst.period
    fast = FastCost(inst.model)

    def total(groups: Sequence[Sequence[int]]) -> float:
        return sum(fast(g) for g in groups if g)

    def greedy(factor: float) -> tuple[float, list[list[int]]]:
        groups = interleaved_runs(inst.model, inst.period, factor * mean)
        return total(groups), groups

    tried = {factor: greedy(factor) for factor in BUDGET_FACTORS}
    for step in (2.0**-0.5, 2.0**-0.25):  # halve the ladder's spacing twice around the best rung
        centre = min(tried, key=lambda f: (tried[f][0], f))
        for factor in (centre * step, centre / step):
            if factor > 0 and factor not in tried:
                tried[factor] = greedy(factor)
    contenders = [min(tried.values(), key=lambda item: item[0])]
    contenders += (
        [min(((total(seed), [list(g) for g in seed]) for seed in seeds), key=lambda item: item[0])] if seeds else []
    )
    best_value, best_groups = float("inf"), []
    for value, groups in contenders:
        if value > 1e-12:
            groups = polish(fast, groups, inst.period)
            value = total(groups)
        if value < best_value - 1e-12:
            best_value, best_groups = value, groups
    return best_groups, sum(inst.cost(g) for g in best_groups if g)

"""Which units to average in which iteration: searches over the timeline cost model.

Objective: total exposed time per period, sum over h of exposed(S_h), each unit in exactly
one S_h (before fill-in). All iterations have the same compute, so iterations are
interchangeable: a schedule is a partition of the units into at most H groups.

- ``paper_dfs``: the paper's include-or-defer depth-first search over contiguous blocks
  (memoised on (iteration, first unit), which changes its speed, not its answer);
- ``contiguous_optimal``: the best partition into contiguous blocks in backward order, by
  dynamic programming, O(H L^2) with numpy;
- ``brute_force``: the best partition of any shape, exactly, by dynamic programming over
  subsets, O(H 3^L) — ground truth for small L;
- ``best``: what ``plan`` uses — exact (the subset DP) while L is small, otherwise local
  search (moves and swaps) seeded with the contiguous optimum, within a time budget. Never
  worse than ``contiguous_optimal``.
- ``fill_in``: extra syncs of units already covered, in iterations where they cost nothing.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import numpy as np

from profiler import Profile

from ..schedule import Schedule
from .simulate import CostModel

__all__ = ["EXACT_MAX_UNITS", "best", "brute_force", "contiguous_optimal", "equal_bytes", "fill_in", "paper_dfs", "total_exposed"]

EXACT_MAX_UNITS = 10  # subset DP up to here (H * 3^10 ~ 0.2 M steps); local search beyond
_EPS = 1e-12


class _Instance:
    """The numbers every search needs, in backward order."""

    def __init__(self, profile: Profile, period: int, bucket_cap_mb: float = 25.0) -> None:
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        self.profile = profile
        self.period = period
        self.names = profile.names
        self.n = len(self.names)
        self.model = CostModel(profile, bucket_cap_mb)
        self.cost = self.model.exposed

    def schedule(self, groups: Sequence[Sequence[int]], method: str) -> Schedule:
        """Groups (any order) -> iterations: non-empty groups first, by their first unit."""
        ordered = sorted((sorted(g) for g in groups if g), key=lambda g: g[0])
        assignment = {name: [] for name in self.names}
        for h, group in enumerate(ordered):
            for i in group:
                assignment[self.names[i]].append(h)
        exposed = sum(self.cost(g) for g in ordered)
        return Schedule(self.period, assignment, metadata={"method": method, "predicted_exposed_s": exposed})


def total_exposed(profile: Profile, schedule: Schedule) -> float:
    """The objective for any schedule (fill-in included): sum over h of exposed(S_h)."""
    inst = _Instance(profile, schedule.period)
    index = {n: i for i, n in enumerate(inst.names)}
    return sum(inst.cost([index[n] for n in schedule.units_at(h)]) for h in range(schedule.period))


def _cost_matrix(inst: _Instance) -> np.ndarray:
    """cost[i, j] = exposed time of syncing the contiguous block [i, j) alone (inf below i)."""
    n = inst.n
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n + 1):
        cost[i, i] = 0.0
        if inst.model.coalesce:
            # Coalesced: a block is one run of buckets. Extending it grows the open bucket
            # (which then starts when its new last unit is ready) or, past the cap, opens one.
            model, comm = inst.model, inst.profile.comm
            free_before, size = 0.0, 0
            for j in range(i, n):
                if j > i and size + model.nbytes[j] > model.cap:
                    free_before = max(model.ready[j - 1], free_before) + comm.predict(size)
                    size = 0
                size += model.nbytes[j]
                end = max(model.ready[j], free_before) + comm.predict(size)
                cost[i, j + 1] = max(0.0, end - model.end)
            continue
        free = 0.0  # per-unit messages: extend the block one unit at a time
        for j in range(i, n):
            free = max(inst.model.ready[j], free) + inst.model.comm[j]
            cost[i, j + 1] = max(0.0, free - inst.model.end)
    return cost


def contiguous_optimal(profile: Profile, period: int) -> Schedule:
    """Best schedule whose groups are contiguous blocks in backward order (the paper's space)."""
    inst = _Instance(profile, period)
    cost = _cost_matrix(inst)
    n = inst.n
    best = cost[0].copy()  # one block: [0, j)
    choice = [np.zeros(n + 1, dtype=np.int64)]
    for _ in range(1, period):
        candidates = best[:, None] + cost  # [i, j]: best with i units, then block [i, j)
        arg = np.argmin(candidates, axis=0)
        best = candidates[arg, np.arange(n + 1)]
        choice.append(arg)
    groups, j = [], n
    for k in range(period - 1, 0, -1):
        i = int(choice[k][j])
        groups.append(list(range(i, j)))
        j = i
    groups.append(list(range(0, j)))
    return inst.schedule(groups, "contiguous_optimal")


def paper_dfs(profile: Profile, period: int) -> Schedule:
    """The paper's search: pack while comm fits, branch on the first unit that overflows."""
    inst = _Instance(profile, period)
    cost = _cost_matrix(inst)
    n = inst.n

    @functools.lru_cache(maxsize=None)
    def dfs(h: int, start: int) -> tuple[float, tuple[int, ...]]:
        """(cost, block ends) for units [start, n) over iterations h..H-1."""
        if start == n:
            return 0.0, ()
        if h == period - 1:
            return float(cost[start, n]), (n,)
        j = start
        while j < n and cost[start, j + 1] <= _EPS:
            j += 1
        if j == n:
            return 0.0, (n,)
        take_cost, take_ends = dfs(h + 1, j + 1)
        options = [(float(cost[start, j + 1]) + take_cost, (j + 1,) + take_ends)]
        if j > start:  # defer the overflowing unit to the next iteration
            defer_cost, defer_ends = dfs(h + 1, j)
            options.append((defer_cost, (j,) + defer_ends))
        else:  # nothing fits here at all: this iteration may also stay empty
            skip_cost, skip_ends = dfs(h + 1, start)
            options.append((skip_cost, (start,) + skip_ends))
        return min(options)

    _, ends = dfs(0, 0)
    groups, begin = [], 0
    for end in ends:
        groups.append(list(range(begin, end)))
        begin = end
    return inst.schedule(groups, "paper_dfs")


def brute_force(profile: Profile, period: int, max_units: int = 14) -> Schedule:
    """The best schedule of any shape, exactly (dynamic programming over subsets)."""
    inst = _Instance(profile, period)
    if inst.n > max_units:
        raise ValueError(f"brute_force is exponential: {inst.n} units is more than max_units={max_units}")
    return inst.schedule(_subset_dp(inst), "brute_force")


def _subset_dp(inst: _Instance) -> list[list[int]]:
    n, full = inst.n, (1 << inst.n) - 1
    cost = [inst.cost([i for i in range(n) if mask >> i & 1]) for mask in range(full + 1)]
    best = list(cost)  # at most one group: the whole mask
    picks: list[list[int | None]] = [list(range(full + 1))]
    for _ in range(1, min(inst.period, n)):
        # At most one more group: keep the previous best (pick None) or split off the group
        # that holds the mask's lowest unit.
        new_best, pick = list(best), [None] * (full + 1)
        for mask in range(full + 1):
            # The group holding the lowest unit of `mask` is `sub`; the rest are earlier groups.
            low = mask & -mask
            rest = mask ^ low
            sub = rest
            while True:
                group = sub | low
                value = best[mask ^ group] + cost[group]
                if value < new_best[mask] - _EPS:
                    new_best[mask], pick[mask] = value, group
                if sub == 0:
                    break
                sub = (sub - 1) & rest
        best = new_best
        picks.append(pick)
    groups, mask, level = [], full, len(picks) - 1
    while mask:
        group = picks[level][mask]
        level -= 1
        if group is None:
            continue
        groups.append([i for i in range(n) if group >> i & 1])
        mask ^= group
    return groups


def best(profile: Profile, period: int, time_budget_s: float = 0.5) -> Schedule:
    """Exact for small models; local search from the contiguous optimum otherwise."""
    inst = _Instance(profile, period)
    if inst.n <= EXACT_MAX_UNITS:
        return inst.schedule(_subset_dp(inst), "dreamddp")
    seed = contiguous_optimal(profile, period)
    index = {n: i for i, n in enumerate(inst.names)}
    groups = [[index[n] for n in seed.units_at(h)] for h in range(period)]
    return inst.schedule(_local_search(inst, groups, time.perf_counter() + time_budget_s), "dreamddp")


def _local_search(inst: _Instance, groups: list[list[int]], deadline: float) -> list[list[int]]:
    """First-improvement moves (one unit to another iteration) and swaps, until none helps."""
    groups = [sorted(g) for g in groups]
    costs = [inst.cost(g) for g in groups]
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        # Units from the most exposed iterations first: that is where moves pay.
        for h in sorted(range(inst.period), key=lambda k: -costs[k]):
            if costs[h] <= _EPS:
                continue
            for i in list(groups[h]):
                if time.perf_counter() >= deadline:
                    return groups
                without = [u for u in groups[h] if u != i]
                cost_without = inst.cost(without)
                for k in range(inst.period):
                    if k == h:
                        continue
                    with_i = sorted(groups[k] + [i])
                    cost_with = inst.cost(with_i)
                    if cost_without + cost_with < costs[h] + costs[k] - _EPS:
                        groups[h], groups[k] = without, with_i
                        costs[h], costs[k] = cost_without, cost_with
                        improved = True
                        break
                    for j in groups[k]:  # swap i and j
                        h_new = sorted(without + [j])
                        k_new = sorted([u for u in groups[k] if u != j] + [i])
                        ch, ck = inst.cost(h_new), inst.cost(k_new)
                        if ch + ck < costs[h] + costs[k] - _EPS:
                            groups[h], groups[k], costs[h], costs[k] = h_new, k_new, ch, ck
                            improved = True
                            break
                    if improved:
                        break
                if improved:
                    break
            if improved:
                break
    return groups


def fill_in(schedule: Schedule, profile: Profile) -> Schedule:
    """Add extra syncs of units where they raise no iteration's exposed time.

    For each iteration, units not yet synchronised there are tried in backward order and
    kept when the iteration's exposed time does not grow: the link was idle anyway.
    """
    inst = _Instance(profile, schedule.period)
    schedule.check_units(inst.names)
    index = {n: i for i, n in enumerate(inst.names)}
    assignment = {n: list(schedule.iterations_of(n)) for n in inst.names}
    for h in range(schedule.period):
        members = sorted(index[n] for n in schedule.units_at(h))
        base = inst.cost(members)
        for i in range(inst.n):
            if i in members:
                continue
            trial = sorted(members + [i])
            if inst.cost(trial) <= base + _EPS:
                members = trial
                assignment[inst.names[i]].append(h)
    metadata = {**schedule.metadata, "fill_in": True,
                "extra_syncs": sum(map(len, assignment.values())) - schedule.syncs_per_period()}
    return Schedule(schedule.period, assignment, metadata=metadata)


def equal_bytes(profile: Profile, period: int) -> Schedule:
    """PLSGD from a profile: contiguous groups of about equal bytes, in backward order."""
    from ..schedule import split_equal_bytes

    inst = _Instance(profile, period)
    return inst.schedule(split_equal_bytes([u.nbytes for u in profile.units], period), "plsgd")

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
- ``best``: what ``plan`` uses — exact (the subset DP) while L is small, otherwise the
  interleaved-runs search (``dreamddp.planning.interleave``: a backward greedy at a ladder of
  budgets, polished by run-boundary moves) seeded with the contiguous optimum. Deterministic,
  never worse than ``contiguous_optimal``, with a certified lower bound in its metadata.
- ``fill_in``: extra syncs of units already covered, in iterations where they cost nothing
  (``dreamddp.planning.fill``: one sweep per iteration).

Forward overlap (``simulate(..., overlap="forward")``) breaks the independence of iterations:
an all-reduce may spill into the next iteration's channel time and forward, so the order of
the groups matters and the objective is the steady-state time of the whole period, found by
simulating it (``ForwardEngine``). For that model:

- ``best_forward``: each unit to one iteration, minimising the steady-state period time —
  exhaustive (up to rotating the period, which changes nothing in the steady state) while
  H^(L-1) <= ``EXACT_FORWARD_EVALS``, otherwise the best of the backward-mode schedules
  (best, contiguous, equal bytes) under every order of their groups (a sample when H > 6),
  then first-improvement moves and swaps, for at most ``forward_simulations`` simulations. With ``max_delay`` > 0 every
  unit gets the longest delay allowed (time never grows with a delay) and then each delay is
  cut back, biggest units first, as far as it costs no time: only delays that buy time keep
  their snapshot memory;
- ``brute_force_forward``: every assignment and every delay, for tests;
- ``with_delays``: the same delay choice for any schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence

import numpy as np

from dreamddp.core.schedule import Schedule
from dreamddp.planning import interleave
from dreamddp.planning.fill import fill_groups
from dreamddp.planning.interleave import exposure_lower_bound
from dreamddp.planning.profile import Profile
from dreamddp.planning.simulate import CostModel, ForwardEngine, ForwardRun, Message, _lower_bound, check_overlap
from dreamddp.validation import non_negative_int, positive_int, require

__all__ = [
    "EXACT_FORWARD_EVALS",
    "EXACT_MAX_UNITS",
    "best",
    "best_forward",
    "brute_force",
    "brute_force_forward",
    "contiguous_optimal",
    "equal_bytes",
    "fill_in",
    "forward_simulations",
    "interleaved",
    "paper_dfs",
    "total_exposed",
    "with_delays",
]

EXACT_MAX_UNITS = 10  # subset DP up to here (H * 3^10 ~ 0.2 M steps); local search beyond
MAX_PLAN_PERIOD = 256  # longest period the searches plan (the paper DFS recurses two frames per iteration of H)
EXACT_FORWARD_EVALS = 2048  # exhaustive forward search up to this many simulations (~0.1-0.3 s)
FORWARD_WORK = 500_000  # forward searches: simulations x units x period allowed (~0.5 s here)
MIN_FORWARD_SIMULATIONS = 50


def forward_simulations(units: int, period: int) -> int:
    """How many simulations a forward-overlap search may run: a fixed amount of work, so that a
    plan takes about as long on a big model as on a small one and never depends on the clock."""
    return max(MIN_FORWARD_SIMULATIONS, FORWARD_WORK // max(1, units * period))


_EPS = 1e-12


class _Problem:
    """A profile and a period, validated, with the cost model both overlap modes price with."""

    def __init__(self, profile: Profile, period: int, bucket_cap_mb: float = 25.0) -> None:
        positive_int("period", period)
        # The paper's DFS recurses once per iteration of the period, and every search's cost grows with H.
        require(period <= MAX_PLAN_PERIOD, "period", f"at most {MAX_PLAN_PERIOD} to plan a schedule", period)
        self.profile = profile
        self.period = period
        self.names = profile.names
        self.n = len(self.names)
        self.model = CostModel(profile, bucket_cap_mb)


class _Instance(_Problem):
    """The numbers every search of the paper's (backward) mode needs, in backward order."""

    def __init__(self, profile: Profile, period: int, bucket_cap_mb: float = 25.0) -> None:
        super().__init__(profile, period, bucket_cap_mb)
        self.cost = self.model.exposed

    def schedule(self, groups: Sequence[Sequence[int]], method: str) -> Schedule:
        """Groups (any order) -> iterations: non-empty groups first, by their first unit."""
        ordered = sorted((sorted(g) for g in groups if g), key=lambda g: g[0])
        assignment: dict[str, list[int]] = {name: [] for name in self.names}
        for h, group in enumerate(ordered):
            for i in group:
                assignment[self.names[i]].append(h)
        exposed = sum(self.cost(g) for g in ordered)
        iterations = {name: tuple(hs) for name, hs in assignment.items()}
        return Schedule(self.period, iterations, metadata={"method": method, "predicted_exposed_s": exposed})


def total_exposed(profile: Profile, schedule: Schedule) -> float:
    """The objective for any schedule (fill-in included): sum over h of exposed(S_h)."""
    inst = _Instance(profile, schedule.period)
    index = {n: i for i, n in enumerate(inst.names)}
    return sum(inst.cost([index[n] for n in schedule.units_at(h)]) for h in range(schedule.period))


class _BlockCosts:
    """Exposed time of syncing each contiguous block [i, j) alone, one column j at a time.

    All blocks ending at j are priced together (numpy over the start i), carrying each start's
    channel state from column to column: O(L) vector steps instead of O(L^2) Python ones.
    Coalesced: a block is one run of buckets; extending it grows the open bucket (which then
    starts when its new last unit is ready) or, past the cap, opens one. The packing rule is
    plan_buckets' (dreamddp.core.buckets); tests/test_buckets.py checks the two agree.
    """

    def __init__(self, inst: _Instance) -> None:
        self.model = inst.model
        self.comm = inst.profile.comm
        n = inst.n
        self.free = np.zeros(n)  # per start i: the channel's free time before the open bucket
        self.size = np.zeros(n)  # per start i: the open bucket's bytes

    def column(self, j: int) -> np.ndarray:
        """cost[0..j, j + 1]: the blocks [i, j + 1) for every start i <= j (call for j = 0, 1, ...)."""
        model, rows = self.model, slice(0, j + 1)
        free, size = self.free[rows], self.size[rows]  # views; start j begins empty
        free[j] = size[j] = 0.0
        if self.comm is None:  # per-unit messages
            free[:] = np.maximum(model.ready[j], free) + model.comm[j]
            return np.maximum(0.0, free - model.end)
        alpha, beta = self.comm.alpha_s, self.comm.beta_s_per_byte
        overflow = size + model.nbytes[j] > model.cap
        overflow[j] = False  # a block's first unit opens its first bucket
        if overflow.any():
            free[overflow] = np.maximum(model.ready[j - 1], free[overflow]) + (alpha + beta * size[overflow])
            size[overflow] = 0.0
        size += model.nbytes[j]
        return np.maximum(0.0, np.maximum(model.ready[j], free) + (alpha + beta * size) - model.end)


def _cost_matrix(inst: _Instance) -> np.ndarray:
    """cost[i, j] = exposed time of syncing the contiguous block [i, j) alone (inf below i)."""
    n = inst.n
    cost = np.full((n + 1, n + 1), np.inf)
    np.fill_diagonal(cost, 0.0)
    blocks = _BlockCosts(inst)
    for j in range(n):
        cost[: j + 1, j + 1] = blocks.column(j)
    return cost


_DP_CHUNK = 256  # columns of block costs held at once: memory O(L * chunk), not O(L^2)


def contiguous_optimal(profile: Profile, period: int) -> Schedule:
    """Best schedule whose groups are contiguous blocks in backward order (the paper's space).

    Dynamic programming over (blocks used, units covered), O(H L^2) with numpy, column chunk by
    column chunk; each layer keeps its argmin for the way back.
    """
    inst = _Instance(profile, period)
    n, layers = inst.n, min(period, max(inst.n, 1))
    best = np.full((layers, n + 1), np.inf)  # best[k, j]: units [0, j) in at most k + 1 blocks
    best[:, 0] = 0.0
    choice = np.zeros((layers, n + 1), dtype=np.int64)
    blocks = _BlockCosts(inst)
    for j0 in range(0, n, _DP_CHUNK):
        j1 = min(n, j0 + _DP_CHUNK)
        chunk = np.full((j1 - j0, j1 + 1), np.inf)  # chunk[c, i] = cost of block [i, j0 + c + 1)
        for c, j in enumerate(range(j0, j1)):
            chunk[c, : j + 1] = blocks.column(j)
            chunk[c, j + 1] = 0.0  # an empty last block: fewer blocks than layers
        best[0, j0 + 1 : j1 + 1] = chunk[:, 0]
        rows = np.arange(j1 - j0)
        for k in range(1, layers):
            # Ends j0+1..j1 need starts up to j1 of the previous layer, which its pass over this
            # chunk has just filled in; starts past an end cost inf.
            candidates = chunk + best[k - 1, : j1 + 1]
            arg = np.argmin(candidates, axis=1)
            best[k, j0 + 1 : j1 + 1] = candidates[rows, arg]
            choice[k, j0 + 1 : j1 + 1] = arg
    groups, j = [], n
    for k in range(layers - 1, 0, -1):
        i = int(choice[k, j])
        groups.append(list(range(i, j)))
        j = i
    groups.append(list(range(0, j)))
    return inst.schedule(groups, "contiguous_optimal")


def paper_dfs(profile: Profile, period: int) -> Schedule:
    """The paper's search: pack while comm fits, branch on the first unit that overflows."""
    inst = _Instance(profile, period)
    cost = _cost_matrix(inst)
    n = inst.n

    @functools.cache
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
        new_best = list(best)
        pick: list[int | None] = [None] * (full + 1)
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
        chosen = picks[level][mask]
        level -= 1
        if chosen is None:
            continue
        groups.append([i for i in range(n) if chosen >> i & 1])
        mask ^= chosen
    return groups


def best(profile: Profile, period: int) -> Schedule:
    """Exact for small models; otherwise the interleaved-runs search, seeded with the contiguous optimum.

    Deterministic (no time budget: the same profile gives the same schedule), never worse than
    ``contiguous_optimal``; the metadata carries the certified lower bound on the exposed time.
    """
    inst = _Instance(profile, period)
    if inst.n <= EXACT_MAX_UNITS:
        schedule = inst.schedule(_subset_dp(inst), "dreamddp")
        return _with_bound(schedule, exposure_lower_bound(inst.model, period), "exact")
    return interleaved(profile, period)


def interleaved(profile: Profile, period: int) -> Schedule:
    """The search ``best`` uses beyond ``EXACT_MAX_UNITS`` units (any size; tests run it on small ones)."""
    inst = _Instance(profile, period)
    seed = _phases_of(contiguous_optimal(profile, period), inst.names)
    groups, _ = interleave.search(inst, seeds=[seed])
    return _with_bound(inst.schedule(groups, "dreamddp"), exposure_lower_bound(inst.model, period), "interleaved")


def _with_bound(schedule: Schedule, bound: float, search: str) -> Schedule:
    metadata = {**schedule.metadata, "search": search, "lower_bound_exposed_s": bound}
    return dataclasses.replace(schedule, metadata=metadata)


def fill_in(
    schedule: Schedule, profile: Profile, overlap: str | None = None, simulations: int | None = None
) -> Schedule:
    """Add extra syncs of units where they cost no time: the link was idle anyway.

    Backward overlap: for each iteration, units not yet synchronised there are tried in
    backward order and kept when that iteration's exposed time does not grow. Forward overlap
    (the schedule's own mode by default): kept when the steady-state period time does not
    grow; a delayed unit gets an extra sync only where its delay stays shorter than its gaps.
    Each forward trial is a simulation, so that pass stops after ``simulations`` of them
    (default: ``forward_simulations``).
    """
    overlap = check_overlap(schedule.overlap if overlap is None else overlap)
    schedule.check_units(profile.names)
    if overlap == "forward":
        return _fill_in_forward(schedule, profile, simulations)
    if schedule.delays:
        raise ValueError(
            "fill_in: this schedule has delays, which only forward overlap can price; fill it in with overlap='forward'"
        )
    inst = _Instance(profile, schedule.period)
    original = _phases_of(schedule, inst.names)
    filled = fill_groups(interleave.FastCost(inst.model), original, inst.n)
    if profile.comm_cpu_s_per_byte > 0:  # extra bytes in flight take compute: keep only what stays free
        filled = [
            group
            if inst.model.iteration(h, group).iteration_s <= inst.model.iteration(h, before).iteration_s
            else before
            for h, (group, before) in enumerate(zip(filled, map(list, original)))
        ]
    assignment: dict[str, list[int]] = {n: [] for n in inst.names}
    for h, group in enumerate(filled):
        for i in group:
            assignment[inst.names[i]].append(h)
    return _filled(schedule, assignment)


def _filled(schedule: Schedule, assignment: dict[str, list[int]]) -> Schedule:
    extra = sum(map(len, assignment.values())) - schedule.syncs_per_period()
    metadata = {**schedule.metadata, "fill_in": True, "extra_syncs": extra}
    return dataclasses.replace(schedule, assignment={n: tuple(its) for n, its in assignment.items()}, metadata=metadata)


def equal_bytes(profile: Profile, period: int) -> Schedule:
    """PLSGD from a profile: contiguous groups of about equal bytes, in backward order."""
    from dreamddp.core.schedule import split_equal_bytes

    inst = _Instance(profile, period)
    return inst.schedule(split_equal_bytes([u.nbytes for u in profile.units], period), "plsgd")


# --------------------------------------------------------------------------- forward overlap


class _ForwardInstance(_Problem):
    """One profile and period under forward overlap: the steady-state time of any assignment."""

    def __init__(self, profile: Profile, period: int, bucket_cap_mb: float = 25.0) -> None:
        super().__init__(profile, period, bucket_cap_mb)
        self.engine = ForwardEngine(profile, self.model)
        self.lower = _lower_bound(profile, period)
        self.tol = self.engine.tol
        self._messages: dict[tuple[int, ...], list[Message]] = {}
        self.evaluations = 0

    def groups_of(self, phase_of: Sequence[int]) -> list[tuple[int, ...]]:
        groups: list[list[int]] = [[] for _ in range(self.period)]
        for u, h in enumerate(phase_of):
            groups[h].append(u)
        return [tuple(g) for g in groups]

    def run(self, groups: Sequence[tuple[int, ...]], delays: Sequence[int]) -> ForwardRun:
        """The steady state; ``groups[h]``: the units averaged at h, ascending."""
        phases = []
        for g in groups:
            messages = self._messages.get(g)
            if messages is None:
                messages = self._messages[g] = self.model.phase_messages(g)
            phases.append(messages)
        self.evaluations += 1
        return self.engine.run(phases, delays)

    def time(self, groups: Sequence[tuple[int, ...]], delays: Sequence[int]) -> float:
        """Steady-state seconds per period."""
        return self.run(groups, delays).period_s

    def schedule(
        self, groups: Sequence[Sequence[int]], delays: Sequence[int], method: str, metadata: dict | None = None
    ) -> Schedule:
        assignment: dict[str, list[int]] = {name: [] for name in self.names}
        for h, group in enumerate(groups):
            for u in group:
                assignment[self.names[u]].append(h)
        seconds = self.time([tuple(sorted(g)) for g in groups], delays)
        compute = self.period * self.profile.compute_s
        meta = {
            **(metadata or {}),
            "method": method,
            "overlap": "forward",
            "predicted_period_s": seconds,
            "predicted_exposed_s": max(0.0, seconds - compute),
            "lower_bound_s": self.lower,
        }
        return Schedule(
            self.period,
            {name: tuple(its) for name, its in assignment.items()},
            metadata=meta,
            overlap="forward",
            delays={self.names[u]: d for u, d in enumerate(delays) if d},
        )


def _max_delays(schedule_groups: Sequence[Sequence[int]], n: int, period: int, max_delay: int) -> list[int]:
    """Per unit, the longest delay allowed: below its shortest gap between averages, and max_delay."""
    its: list[list[int]] = [[] for _ in range(n)]
    for h, group in enumerate(schedule_groups):
        for u in group:
            its[u].append(h)
    out = []
    for hs in its:
        gap = min(b - a for a, b in zip(hs, hs[1:] + [hs[0] + period])) if hs else period
        out.append(min(max_delay, gap - 1))
    return out


def _prune_delays(
    inst: _ForwardInstance, groups: Sequence[tuple[int, ...]], delays: list[int], limit: float = float("inf")
) -> list[int]:
    """Cut each delay back (biggest units first) as far as the period time stays the same.

    A unit whose bucket ends by the end of its backward needs no delay at all (dropping it
    changes nothing in the timeline): those go first, with no simulation. For the others the
    shortest delay that keeps the time is found by bisection, since time never grows with a
    delay. Once ``inst`` has run ``limit`` simulations the remaining delays stay as they are:
    time-optimal, more memory.
    """
    run = inst.run(groups, delays)
    target = run.period_s
    delays = [0 if run.overrun.get(u, 0.0) <= 0.0 else d for u, d in enumerate(delays)]
    for u in sorted((k for k in range(inst.n) if delays[k]), key=lambda k: (-inst.model.nbytes[k], k)):
        if inst.evaluations >= limit:
            break
        lo, hi = 0, delays[u]  # hi keeps the time; find the least such delay in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if inst.time(groups, delays[:u] + [mid] + delays[u + 1 :]) <= target + inst.tol:
                hi = mid
            else:
                lo = mid + 1
        delays = delays[:u] + [hi] + delays[u + 1 :]
    return delays


def _check_max_delay(max_delay: int) -> None:
    non_negative_int("max_delay", max_delay)


def best_forward(
    profile: Profile, period: int, max_delay: int = 0, simulations: int | None = None, bucket_cap_mb: float = 25.0
) -> Schedule:
    """The schedule (each unit once per period) with the least steady-state time under forward
    overlap; delays up to ``max_delay`` iterations where they save time.

    At most ``simulations`` simulations (default: ``forward_simulations``): a count, not a
    clock, so the same profile always gives the same schedule."""
    _check_max_delay(max_delay)
    inst = _ForwardInstance(profile, period, bucket_cap_mb)
    limit = forward_simulations(inst.n, period) if simulations is None else positive_int("simulations", simulations)
    search_limit = int((0.7 if max_delay else 1.0) * limit)  # with delays, 30% is kept for choosing them
    n, H = inst.n, period
    delays = [min(max_delay, H - 1)] * n
    if H ** (n - 1) <= EXACT_FORWARD_EVALS:
        search = "exhaustive"
        best_value, best_phases = float("inf"), [0] * n
        for rest in itertools.product(range(H), repeat=n - 1):
            phases = (0, *rest)  # unit 0 at iteration 0: a rotated period has the same steady state
            value = inst.time(inst.groups_of(phases), delays)
            if value < best_value - inst.tol:
                best_value, best_phases = value, list(phases)
    else:
        search = "local"
        best_phases, best_value = _forward_seed(inst, delays, search_limit)
        best_phases, best_value = _forward_local_search(inst, best_phases, delays, best_value, search_limit)
    if max_delay:
        delays = _prune_delays(inst, inst.groups_of(best_phases), delays, limit)
        best_phases, delays = _fewer_snapshots(inst, best_phases, delays, best_value, limit)
    return inst.schedule(
        inst.groups_of(best_phases), delays, "dreamddp", {"search": search, "simulations": inst.evaluations}
    )


def _fewer_snapshots(
    inst: _ForwardInstance, phases: list[int], delays: list[int], target: float, limit: int
) -> tuple[list[int], list[int]]:
    """Give delayed units (biggest first) a shorter delay, in any iteration, where that costs no time.

    The time search leaves every unit of a delayed bucket delayed; moving a small neighbour
    out of it often lets the neighbour go undelayed, saving its snapshot.
    """
    improved = True
    while improved:
        improved = False
        for u in sorted((k for k in range(inst.n) if delays[k]), key=lambda k: (-inst.model.nbytes[k], k)):
            for h in [phases[u]] + [k for k in range(inst.period) if k != phases[u]]:
                if inst.evaluations >= limit:
                    return phases, delays
                trial_phases = phases[:u] + [h] + phases[u + 1 :]
                groups = inst.groups_of(trial_phases)
                found = next(
                    (
                        d
                        for d in range(delays[u])
                        if inst.time(groups, delays[:u] + [d] + delays[u + 1 :]) <= target + inst.tol
                    ),
                    None,
                )
                if found is not None:
                    phases, delays, improved = trial_phases, delays[:u] + [found] + delays[u + 1 :], True
                    break
    return phases, delays


def _phases_of(schedule: Schedule, names: Sequence[str]) -> list[list[int]]:
    index = {name: i for i, name in enumerate(names)}
    return [[index[n] for n in schedule.units_at(h)] for h in range(schedule.period)]


def _forward_seed(inst: _ForwardInstance, delays: Sequence[int], limit: int) -> tuple[list[int], float]:
    """The best backward-mode partitions, each under the orders of its groups that matter here."""
    seeds = [
        best(inst.profile, inst.period),
        contiguous_optimal(inst.profile, inst.period),
        equal_bytes(inst.profile, inst.period),
    ]
    best_value, best_phases = float("inf"), [0] * inst.n
    for seed in seeds:
        groups = [g for g in _phases_of(seed, inst.names) if g]
        first, rest = groups[0], groups[1:]
        if len(rest) <= 5:
            orders = list(itertools.permutations(rest))  # the rotation that puts `first` first is free
        else:
            orders = [tuple(rest), tuple(reversed(rest))]
        for order in orders:
            phases = [0] * inst.n
            for h, group in enumerate((first, *order)):
                for u in group:
                    phases[u] = h
            value = inst.time(inst.groups_of(phases), delays)
            if value < best_value - inst.tol:
                best_value, best_phases = value, phases
            if inst.evaluations >= limit:
                return best_phases, best_value
    return best_phases, best_value


def _forward_local_search(
    inst: _ForwardInstance, phases: list[int], delays: Sequence[int], value: float, limit: int
) -> tuple[list[int], float]:
    """First-improvement moves (a unit to another iteration) and swaps until none helps."""
    n, H = inst.n, inst.period
    improved = True
    while improved and value > inst.lower + inst.tol:
        improved = False
        for u in range(n):
            for h in range(H):
                if h == phases[u]:
                    continue
                if inst.evaluations >= limit:
                    return phases, value
                trial = phases[:u] + [h] + phases[u + 1 :]
                t = inst.time(inst.groups_of(trial), delays)
                if t < value - inst.tol:
                    phases, value, improved = trial, t, True
        for u in range(n):
            for v in range(u + 1, n):
                if phases[u] == phases[v]:
                    continue
                if inst.evaluations >= limit:
                    return phases, value
                trial = list(phases)
                trial[u], trial[v] = phases[v], phases[u]
                t = inst.time(inst.groups_of(trial), delays)
                if t < value - inst.tol:
                    phases, value, improved = trial, t, True
    return phases, value


def brute_force_forward(profile: Profile, period: int, max_delay: int = 0, max_evaluations: int = 200_000) -> Schedule:
    """The best single-sync schedule and delays under forward overlap, by trying all of them."""
    _check_max_delay(max_delay)
    inst = _ForwardInstance(profile, period)
    dmax = min(max_delay, period - 1)
    count = (period * (dmax + 1)) ** inst.n
    if count > max_evaluations:
        raise ValueError(
            f"brute_force_forward is exponential: {count} simulations is more than max_evaluations={max_evaluations}"
        )
    best_value, best_choice = float("inf"), None
    for phases in itertools.product(range(period), repeat=inst.n):
        groups = inst.groups_of(phases)
        for delays in itertools.product(range(dmax + 1), repeat=inst.n):
            value = inst.time(groups, delays)
            if value < best_value - inst.tol:
                best_value, best_choice = value, (groups, list(delays))
    assert best_choice is not None  # at least one assignment was tried
    return inst.schedule(best_choice[0], best_choice[1], "brute_force")


def with_delays(
    schedule: Schedule, profile: Profile, max_delay: int, bucket_cap_mb: float = 25.0, simulations: int | None = None
) -> Schedule:
    """``schedule`` under forward overlap, with the delays (up to ``max_delay``) that save time.

    Each unit first gets the longest delay it may have (shorter than its gaps and ``max_delay``),
    then delays are cut back where they cost no time, biggest units first.
    """
    _check_max_delay(max_delay)
    schedule.check_units(profile.names)
    inst = _ForwardInstance(profile, schedule.period, bucket_cap_mb)
    groups = [tuple(g) for g in _phases_of(schedule, inst.names)]
    delays = _max_delays(groups, inst.n, schedule.period, max_delay)
    if max_delay:
        limit = forward_simulations(inst.n, schedule.period) if simulations is None else simulations
        delays = _prune_delays(inst, groups, delays, limit)
    return inst.schedule(groups, delays, str(schedule.metadata.get("method", "schedule")), dict(schedule.metadata))


def _fill_in_forward(schedule: Schedule, profile: Profile, simulations: int | None) -> Schedule:
    inst = _ForwardInstance(profile, schedule.period)
    limit = forward_simulations(inst.n, schedule.period) if simulations is None else simulations
    groups = [set(g) for g in _phases_of(schedule, inst.names)]
    delays = [schedule.delay_of(n) for n in inst.names]

    def frozen() -> list[tuple[int, ...]]:
        return [tuple(sorted(g)) for g in groups]

    base = inst.time(frozen(), delays)
    for h in range(schedule.period):
        for u in range(inst.n):
            if u in groups[h]:
                continue
            if inst.evaluations >= limit:
                break
            groups[h].add(u)
            allowed = _max_delays(frozen(), inst.n, schedule.period, delays[u])[u] >= delays[u]
            if allowed and inst.time(frozen(), delays) <= base + inst.tol:
                continue
            groups[h].discard(u)
    assignment: dict[str, list[int]] = {name: [] for name in inst.names}
    for h, group in enumerate(groups):
        for u in group:
            assignment[inst.names[u]].append(h)
    return _filled(schedule, assignment)

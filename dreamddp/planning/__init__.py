"""Plan a schedule from a profile, and predict its timeline."""

from __future__ import annotations

from dreamddp.core.schedule import OVERLAPS, Schedule
from dreamddp.planning.profile import Profile
from dreamddp.planning.search import (
    best,
    best_forward,
    brute_force,
    brute_force_forward,
    contiguous_optimal,
    equal_bytes,
    fill_in,
    paper_dfs,
    total_exposed,
    with_delays,
)
from dreamddp.planning.simulate import Timeline, check_overlap, simulate, simulate_method
from dreamddp.validation import non_negative_int, positive_int

__all__ = [
    "AUTO_LIMIT",
    "METHODS",
    "OVERLAPS",
    "Timeline",
    "auto_period",
    "best",
    "best_forward",
    "brute_force",
    "brute_force_forward",
    "contiguous_optimal",
    "fill_in",
    "paper_dfs",
    "plan",
    "simulate",
    "simulate_method",
    "total_exposed",
    "with_delays",
]

METHODS = ("dreamddp", "contiguous", "paper", "plsgd", "local_sgd")
AUTO_LIMIT = 64  # the longest period `auto_period` considers
AUTO_WITHIN = 1.05  # ... and how close to the lower bound it must predict
# With an outer optimizer (sync="delta", momentum) quality holds at longer periods (DiLoCo), so
# "auto" may take a longer H that hides more of the link: the smallest within 1% of the bound.
AUTO_WITHIN_OUTER = 1.01


def plan(
    profile: Profile,
    period: int,
    method: str = "dreamddp",
    fill: bool = True,
    simulations: int | None = None,
    overlap: str = "backward",
    max_delay: int = 0,
) -> Schedule:
    """A schedule for ``profile`` with period ``period``, for the wrapper's ``overlap`` mode.

    ``dreamddp``: the unrestricted search (exact for small models), then fill-in;
    ``contiguous``: the best contiguous schedule; ``paper``: the paper's DFS; ``plsgd``: equal
    bytes; ``local_sgd``: everything at the last iteration. A period longer than the number of
    units is allowed: some iterations then average nothing.

    ``overlap="forward"``: ``dreamddp`` searches under the forward-overlap model
    (``best_forward``); the other methods keep their schedules, which are then simulated and
    filled in under that model. ``max_delay`` (forward only) lets units' averages land up to
    that many iterations later where that saves time, at the cost of a parameter snapshot.
    ``simulations`` caps the forward-overlap searches (default: a fixed amount of work,
    ``forward_simulations``). Every search is deterministic: the same profile, the same schedule.
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"plan() needs a profiler.Profile, got {type(profile).__name__}")
    check_overlap(overlap)
    non_negative_int("max_delay", max_delay)
    if simulations is not None:
        positive_int("simulations", simulations)
    if max_delay and overlap != "forward":
        raise ValueError(
            f"max_delay={max_delay} needs overlap='forward': with backward overlap every average "
            "is waited for before the step"
        )
    if overlap == "forward" and method == "dreamddp":
        schedule = best_forward(profile, period, max_delay, simulations)
        return fill_in(schedule, profile, simulations=simulations) if fill else schedule
    if method == "dreamddp":
        schedule = best(profile, period)
    elif method == "contiguous":
        schedule = contiguous_optimal(profile, period)
    elif method == "paper":
        schedule = paper_dfs(profile, period)
    elif method == "plsgd":
        schedule = equal_bytes(profile, period)
    elif method == "local_sgd":
        schedule = Schedule.local_sgd(profile.names, period)  # validates the period
    else:
        raise ValueError(f"unknown planning method {method!r}; choose one of: {', '.join(METHODS)}")
    if overlap == "forward":
        schedule = with_delays(schedule, profile, max_delay, simulations=simulations)
    if fill and method in ("dreamddp", "contiguous", "paper"):
        schedule = fill_in(schedule, profile)
    return schedule


def auto_period(profile: Profile, overlap: str = "backward", max_delay: int = 0, within: float = AUTO_WITHIN) -> int:
    """The smallest H (up to ``AUTO_LIMIT``) whose planned schedule is predicted within ``within``
    (5%) of the lower bound: the shortest period (the most frequent averaging) that hides the link."""
    for period in range(1, AUTO_LIMIT + 1):
        t = simulate(profile, plan(profile, period, fill=False, overlap=overlap, max_delay=max_delay))
        if t.iteration_s <= within * t.lower_bound_s / period:
            return period
    return AUTO_LIMIT

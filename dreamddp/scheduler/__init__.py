"""Plan a schedule from a profile, and predict its timeline."""

from __future__ import annotations

from profiler import Profile

from ..schedule import Schedule
from .search import best, brute_force, contiguous_optimal, equal_bytes, fill_in, paper_dfs, total_exposed
from .simulate import Timeline, simulate, simulate_method

__all__ = [
    "METHODS", "Timeline", "best", "brute_force", "contiguous_optimal", "fill_in", "paper_dfs", "plan",
    "simulate", "simulate_method", "total_exposed",
]

METHODS = ("dreamddp", "contiguous", "paper", "plsgd", "local_sgd")


def plan(profile: Profile, period: int, method: str = "dreamddp", fill: bool = True, time_budget_s: float = 0.5) -> Schedule:
    """A schedule for ``profile`` with period ``period``.

    ``dreamddp``: the unrestricted search (exact for small models), then fill-in;
    ``contiguous``: the best contiguous schedule; ``paper``: the paper's DFS; ``plsgd``: equal
    bytes; ``local_sgd``: everything at the last iteration. A period longer than the number of
    units is allowed: some iterations then average nothing.
    """
    if not isinstance(profile, Profile):
        raise TypeError(f"plan() needs a profiler.Profile, got {type(profile).__name__}")
    if method == "dreamddp":
        schedule = best(profile, period, time_budget_s)
    elif method == "contiguous":
        schedule = contiguous_optimal(profile, period)
    elif method == "paper":
        schedule = paper_dfs(profile, period)
    elif method == "plsgd":
        schedule = equal_bytes(profile, period)
    elif method == "local_sgd":
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period must be an integer >= 1, got {period!r}")
        schedule = Schedule.local_sgd(profile.names, period)
    else:
        raise ValueError(f"unknown planning method {method!r}; choose one of: {', '.join(METHODS)}")
    if fill and method in ("dreamddp", "contiguous", "paper"):
        schedule = fill_in(schedule, profile)
    return schedule

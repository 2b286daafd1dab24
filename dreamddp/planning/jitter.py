"""What a schedule costs when every rank's compute varies from iteration to iteration.

The cost model (``simulate``) prices one rank whose forward, backward and step always take
their profiled medians. Real ranks do not: on this project's 2-core machine an iteration's
compute ranges over ±10-20% between its 10th and 90th percentiles, and the ranks vary
independently. Every all-reduce needs every rank's contribution, so it starts when the
*slowest* rank launches it, and a rank that waits at the end of backward waits for the slowest
rank's bucket: a synchronising algorithm pays the expected maximum over the ranks at each of
its sync points, not the median. Measured on the emulated cluster at 100 Mbit/s (gpt-tiny, 2
ranks): the median model put DreamDDP 26 ms/iteration above compute-only; the runs measured
28-100 ms. S-SGD pays it every iteration, Local SGD once per period, a compute-only run never
(its ranks never wait for each other, so it pays only the mean's distance from the median).

``expected_iteration_s`` replays a backward-overlap timeline (its buckets' ready times and
durations, its blocking waits) for ``world_size`` ranks whose forward, backward and step are
drawn from the profile's measured spreads (``Profile.spreads``: median, p10, p90, as a split
normal), over many iterations, with a fixed seed (the same inputs give the same figure), and
returns the mean time per iteration. With no spread it reproduces the timeline exactly. The
planner's search keeps the deterministic model: the sampled figure is what a prediction
reports. Forward-overlap timelines (waits spread over the next forward) get only the
compute's mean-over-median shift; their coupling is not modelled.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from dreamddp.planning.profile import Profile, Spread
from dreamddp.planning.simulate import Timeline
from dreamddp.validation import positive_int

__all__ = ["SyncedIteration", "expected_iteration_s", "jittered_iterations"]

_Z90 = 1.2815515655446004  # the standard normal's 90th percentile
WARMUP_PERIODS = 8  # periods replayed before measuring: the ranks' skew settles
DEFAULT_ITERATIONS = 3000  # measured iterations (rounded up to whole periods)


@dataclass(frozen=True)
class SyncedIteration:
    """One iteration as the replay takes it: bucket launch points and what blocks.

    ``buckets``: (ready as a fraction of backward, channel time) per all-reduce, in launch
    order, each waited for before the step. ``after_step_s``: a blocking all-reduce after the
    step (Local SGD's average), 0 for none. ``comm_cpu_s``: compute the transfers take from
    backward on the same cores (``simulate.comm_cpu_taken``), added to every rank's backward.
    """

    buckets: tuple[tuple[float, float], ...] = ()
    after_step_s: float = 0.0
    comm_cpu_s: float = 0.0


def jittered_iterations(timeline: Timeline) -> list[SyncedIteration]:
    """A backward-overlap timeline's iterations as sync points for the replay.

    An iteration without buckets whose compute lane still waited (``exposed_s`` > 0) is a
    blocking all-reduce after the step: how ``simulate_method`` prices Local SGD.
    """
    backward = timeline.backward_s
    out = []
    for it in timeline.iterations:
        buckets = tuple(
            (
                (e.ready_s if e.ready_s is not None else e.start_s) / backward if backward > 0 else 0.0,
                e.end_s - e.start_s,
            )
            for e in it.events
        )
        out.append(SyncedIteration(buckets, it.exposed_s if not buckets else 0.0, it.comm_cpu_s))
    return out


def _mean_shift(sampler: tuple[float, float, float]) -> float:
    """The split normal's mean minus its median."""
    _, low, high = sampler
    return (high - low) / math.sqrt(2.0 * math.pi)


def expected_iteration_s(
    profile: Profile,
    timeline: Timeline | None,
    world_size: int,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
) -> float:
    """Mean s/iteration of ``timeline`` when ``world_size`` ranks' compute varies as profiled.

    ``timeline`` None: compute only (no rank ever waits for another), as the slowest rank
    reports it.
    """
    positive_int("world_size", world_size)
    positive_int("iterations", iterations)
    spreads = [profile.spreads.get(k) for k in ("forward_s", "backward_s", "optimizer_s")]
    medians = (profile.forward_s, profile.backward_s, profile.optimizer_s)
    samplers = [_sampler(s, m) for s, m in zip(spreads, medians)]
    if timeline is not None and timeline.overlap != "backward":
        return timeline.iteration_s + sum(_mean_shift(s) for s in samplers)
    phases = jittered_iterations(timeline) if timeline is not None else [SyncedIteration()]
    return _replay(phases, samplers, world_size, iterations, seed)


def _sampler(spread: Spread | None, median: float) -> tuple[float, float, float]:
    """(median, sigma below, sigma above) of a split normal through the spread's p10 and p90.

    The profile's totals carry their own medians; the spread only gives the shape, so a
    profile whose totals were rescaled keeps a consistent width (``with_spreads_scaled``).
    """
    if spread is None or spread.median <= 0:
        return (median, 0.0, 0.0)
    scale = median / spread.median
    return (median, (spread.median - spread.p10) / _Z90 * scale, (spread.p90 - spread.median) / _Z90 * scale)


def _draw(rng: random.Random, sampler: tuple[float, float, float]) -> float:
    median, low, high = sampler
    if low == 0.0 and high == 0.0:
        return median
    z = rng.gauss(0.0, 1.0)
    return max(0.0, median + z * (low if z < 0 else high))


def _replay(
    phases: Sequence[SyncedIteration],
    samplers: Sequence[tuple[float, float, float]],
    ranks: int,
    iterations: int,
    seed: int,
) -> float:
    """Max-plus replay: each rank runs its own clock; an all-reduce starts when the channel is
    free and the last rank has launched it; a rank blocks until its iteration's buckets are done."""
    rng = random.Random(seed)
    period = len(phases)
    warmup = WARMUP_PERIODS * period
    total = warmup + -(-iterations // period) * period
    clocks = [0.0] * ranks
    free = 0.0
    started = 0.0
    for k in range(total):
        if k == warmup:
            started = max(clocks)
        phase = phases[k % period]
        forward, backward, step = ([_draw(rng, s) for _ in range(ranks)] for s in samplers)
        backward_start = [clocks[r] + forward[r] for r in range(ranks)]
        for fraction, duration in phase.buckets:
            launched = max(backward_start[r] + fraction * backward[r] for r in range(ranks))
            free = max(launched, free) + duration
        for r in range(ranks):  # a rank waits for its iteration's buckets before its step
            clocks[r] = backward_start[r] + backward[r] + phase.comm_cpu_s
            if phase.buckets:
                clocks[r] = max(clocks[r], free)
            clocks[r] += step[r]
        if phase.after_step_s > 0:
            free = max(clocks) + phase.after_step_s
            clocks = [free] * ranks
    return (max(clocks) - started) / (total - warmup)  # the slowest rank, as runs report

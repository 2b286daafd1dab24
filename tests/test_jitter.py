"""The jittered replay: ranks whose compute varies pay the slowest rank at every sync point."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dreamddp.core.schedule import Schedule
from dreamddp.planning import simulate, simulate_method
from dreamddp.planning.jitter import SyncedIteration, expected_iteration_s, jittered_iterations
from profiler import CommModel, Profile, Spread


def _profile(backward_sigma: float = 0.0, burst: float = 0.0) -> Profile:
    profile = Profile.synthetic([0.1, 0.1], [0.0, 0.0], forward_s=0.1, optimizer_s=0.01, nbytes=[100_000, 100_000])
    profile = profile.with_comm(CommModel(0.01, 1e-6, burst_s=burst))
    half = backward_sigma * 1.2815515655446004
    return dataclasses.replace(
        profile,
        spreads={
            "forward_s": Spread.exact(0.1),
            "backward_s": Spread(0.2, 0.2 - half, 0.2 + half),
            "optimizer_s": Spread.exact(0.01),
        },
    )


SCHEDULE = Schedule(2, {"u1": [0], "u0": [1]})


@pytest.mark.parametrize("burst", [0.0, 0.05])
def test_without_spread_the_replay_is_the_cost_model(burst):
    profile = _profile(0.0, burst)
    timelines = [
        simulate(profile, SCHEDULE),
        simulate_method(profile, "ssgd", 1),
        simulate_method(profile, "local_sgd", 4),
    ]
    for timeline in timelines:
        assert expected_iteration_s(profile, timeline, 2) == pytest.approx(timeline.iteration_s, rel=1e-12)
    assert expected_iteration_s(profile, None, 2) == pytest.approx(profile.compute_s, rel=1e-12)


def test_a_bucket_at_the_end_of_backward_waits_for_the_slowest_of_two_ranks():
    sigma = 0.01
    profile = _profile(sigma)
    # S-SGD's one bucket is launched when backward ends: every iteration is F + max(B1, B2) + O
    # plus the transfer; the maximum of two normals is sigma / sqrt(pi) above their mean.
    ssgd = simulate_method(profile, "ssgd", 1)
    extra = expected_iteration_s(profile, ssgd, 2) - ssgd.iteration_s
    assert extra == pytest.approx(sigma / math.sqrt(math.pi), abs=0.1 * sigma)
    # One rank never waits for another; more ranks wait for a later straggler.
    assert expected_iteration_s(profile, ssgd, 1) == pytest.approx(ssgd.iteration_s, abs=0.05 * sigma)
    assert expected_iteration_s(profile, ssgd, 8) > expected_iteration_s(profile, ssgd, 2) + 0.5 * sigma


def test_rarer_syncs_pay_less_jitter_and_compute_only_pays_none():
    sigma = 0.01
    profile = _profile(sigma)
    every = simulate_method(profile, "ssgd", 1)
    local = simulate_method(profile, "local_sgd", 8)
    paid_every = expected_iteration_s(profile, every, 2) - every.iteration_s
    paid_local = expected_iteration_s(profile, local, 2) - local.iteration_s
    # Local SGD meets the other rank once per 8 iterations: sqrt(8) sigma of drift, over 8 iterations.
    assert paid_local == pytest.approx(paid_every / math.sqrt(8), rel=0.35)
    assert expected_iteration_s(profile, None, 2) == pytest.approx(profile.compute_s, abs=0.1 * sigma)


def test_same_inputs_same_figure_and_another_seed_close_by():
    profile = _profile(0.02)
    timeline = simulate(profile, SCHEDULE)
    first = expected_iteration_s(profile, timeline, 2)
    assert expected_iteration_s(profile, timeline, 2) == first
    assert expected_iteration_s(profile, timeline, 2, seed=1) == pytest.approx(first, rel=0.01)


def test_skewed_spread_shifts_the_mean_and_forward_overlap_gets_only_that():
    profile = dataclasses.replace(_profile(0.0), spreads={"backward_s": Spread(0.2, 0.19, 0.24)})
    forward = simulate(profile, dataclasses.replace(SCHEDULE, overlap="forward"))
    shift = (0.04 - 0.01) / 1.2815515655446004 / math.sqrt(2 * math.pi)
    assert expected_iteration_s(profile, forward, 2) == pytest.approx(forward.iteration_s + shift)
    assert expected_iteration_s(profile, None, 2) == pytest.approx(profile.compute_s + shift, rel=0.01)


def test_sync_points_come_from_the_timeline():
    timeline = simulate(_profile(), SCHEDULE)
    phases = jittered_iterations(timeline)
    # Iteration 0: unit 1 (ready when backward ends, 0.2 of 0.2); iteration 1: unit 0 (ready at 0.1).
    assert [[round(f, 6) for f, _ in p.buckets] for p in phases] == [[1.0], [0.5]]
    assert all(p.after_step_s == 0 for p in phases)
    local = jittered_iterations(simulate_method(_profile(), "local_sgd", 3))
    assert [p.after_step_s > 0 for p in local] == [False, False, True]
    assert SyncedIteration().buckets == ()


def test_bad_rank_count_is_one_line():
    with pytest.raises(ValueError, match="world_size"):
        expected_iteration_s(_profile(), None, 0)

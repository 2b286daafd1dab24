"""The planner at real-model scale: deterministic, never worse than the contiguous optimum,
above a lower bound it certifies, and its fast pricing equal to the cost model it stands for."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamddp import plan
from dreamddp.planning import brute_force, contiguous_optimal, fill_in, total_exposed
from dreamddp.planning.fill import _fill_slow, fill_groups
from dreamddp.planning.interleave import FastCost, exposure_lower_bound
from dreamddp.planning.search import _Instance, best, interleaved
from profiler import CommModel, Profile


def random_profile(n: int, seed: int, rate_bps: float = 100e6, alpha: float = 0.02) -> Profile:
    rng = random.Random(seed)
    nbytes = [rng.randint(1_000, 400_000) for _ in range(n)]
    backward = [rng.random() / n for _ in range(n)]
    return Profile.synthetic(backward, [0.0] * n, nbytes=nbytes).with_comm(CommModel(alpha, 8 / rate_bps))


@st.composite
def small_instances(draw, max_units=8):
    """Per-unit messages (the paper's model) or coalesced buckets, a period of 1-4, a cap that splits or not."""
    n = draw(st.integers(1, max_units))
    backward = draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    if draw(st.booleans()):
        profile = Profile.synthetic(backward, draw(st.lists(st.floats(0.0, 1.5), min_size=n, max_size=n)))
    else:
        nbytes = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n))
        burst = draw(st.one_of(st.just(0.0), st.floats(0.0, 0.8)))  # a shaper's burst after idle, or none
        comm = CommModel(draw(st.floats(0.0, 0.5)), draw(st.floats(0.0, 5e-4)), burst_s=burst)
        profile = Profile.synthetic(backward, [0.0] * n, nbytes=nbytes).with_comm(comm)
    return profile, draw(st.integers(1, 4)), draw(st.sampled_from([25.0, 0.002]))


@settings(max_examples=150, deadline=None)
@given(small_instances())
def test_interleaved_search_is_bounded_by_contiguous_and_the_certified_bound(instance):
    profile, period, _ = instance
    found = total_exposed(profile, interleaved(profile, period))  # the large-model path, on small cases
    optimum = total_exposed(profile, brute_force(profile, period))
    bound = exposure_lower_bound(_Instance(profile, period).model, period)
    assert bound <= optimum + 1e-9
    assert optimum - 1e-9 <= found <= total_exposed(profile, contiguous_optimal(profile, period)) + 1e-9


@settings(max_examples=200, deadline=None)
@given(small_instances(max_units=12), st.randoms(use_true_random=False))
def test_fast_group_cost_equals_the_cost_model(instance, rng):
    profile, period, cap = instance
    inst = _Instance(profile, period, cap)
    fast = FastCost(inst.model)
    for _ in range(5):
        group = sorted(rng.sample(range(inst.n), rng.randint(0, inst.n)))
        assert fast(group) == inst.cost(group)  # the same arithmetic, bit for bit


@settings(max_examples=200, deadline=None)
@given(small_instances(max_units=12), st.randoms(use_true_random=False))
def test_one_sweep_fill_in_keeps_exactly_what_pricing_every_trial_keeps(instance, rng):
    profile, period, cap = instance
    inst = _Instance(profile, period, cap)
    fast = FastCost(inst.model)
    groups = [[] for _ in range(period)]
    for unit in range(inst.n):
        groups[rng.randrange(period)].append(unit)
    filled = fill_groups(fast, groups, inst.n)
    if fast.burst == 0:
        assert filled == [_fill_slow(fast, g, inst.n) for g in groups]
    for group, more in zip(groups, filled):  # with a burst: another fill, never a costlier group
        assert set(group) <= set(more) and fast(more) <= fast(sorted(group)) + 1e-12


def test_the_same_profile_gives_the_same_schedule():
    profile = random_profile(400, seed=3)
    for overlap in ("backward", "forward"):
        first, second = (plan(profile, 16, overlap=overlap) for _ in range(2))
        assert first.assignment == second.assignment and first.delays == second.delays
        assert first.metadata == second.metadata


@pytest.mark.parametrize("rate_bps", [1e9, 100e6, 20e6])
def test_real_sized_instance_beats_contiguous_and_reports_its_bound(rate_bps):
    profile = random_profile(600, seed=1, rate_bps=rate_bps)
    schedule = best(profile, 16)
    found, contiguous = total_exposed(profile, schedule), total_exposed(profile, contiguous_optimal(profile, 16))
    bound = schedule.metadata["lower_bound_exposed_s"]
    assert bound <= found <= contiguous + 1e-9
    assert schedule.metadata["search"] == "interleaved"
    if rate_bps == 100e6:  # the regime where interleaving pays: every iteration's channel starts early
        assert found < 0.8 * contiguous


def test_fill_in_at_scale_never_raises_an_iterations_exposed_time():
    profile = random_profile(300, seed=2, rate_bps=1e9)
    base = best(profile, 8)
    filled = fill_in(base, profile)
    inst = _Instance(profile, 8)
    index = {n: i for i, n in enumerate(profile.names)}
    for h in range(8):
        before = inst.cost(sorted(index[n] for n in base.units_at(h)))
        after = inst.cost(sorted(index[n] for n in filled.units_at(h)))
        assert after <= before + 1e-12
    assert filled.metadata["extra_syncs"] > 0


def test_plan_cli_table_prices_the_schedule_it_writes(tmp_path, capsys, monkeypatch):
    from dreamddp.core.schedule import Schedule
    from dreamddp.planning import cli, simulate

    profile = random_profile(40, seed=4, rate_bps=200e6)
    src, out = tmp_path / "p.json", tmp_path / "s.json"
    profile.to_json(src)
    searches = []
    real_plan = cli.plan

    def counting_plan(*args, **kwargs):
        searches.append(
            (args[2] if len(args) > 2 else kwargs.get("method", "dreamddp"), kwargs.get("overlap", "backward"))
        )
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(cli, "plan", counting_plan)
    assert cli.main(["--profile", str(src), "--period", "4", "--out", str(out)]) == 0
    assert searches.count(("dreamddp", "backward")) == 1  # the table did not plan the written schedule again
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dreamddp + fill-in"))
    printed = float(row.split()[3])
    assert printed == pytest.approx(simulate(profile, Schedule.from_json(out)).iteration_s, abs=5e-5)

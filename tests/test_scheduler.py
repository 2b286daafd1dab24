"""The scheduler against brute force, and the simulator against hand-computed timelines."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamddp import Schedule, plan, simulate
from dreamddp.planning import brute_force, contiguous_optimal, fill_in, paper_dfs, simulate_method, total_exposed
from profiler import Profile

times = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


@st.composite
def instances(draw, max_units=7):
    n = draw(st.integers(1, max_units))
    backward = draw(st.lists(times, min_size=n, max_size=n))
    comm = draw(st.lists(st.floats(0.0, 1.5), min_size=n, max_size=n))
    return Profile.synthetic(backward, comm), draw(st.integers(1, 4))


def best_contiguous_by_enumeration(profile: Profile, period: int) -> float:
    n, best = len(profile.units), math.inf
    for cuts in itertools.combinations_with_replacement(range(n + 1), period - 1):
        bounds = (0, *cuts, n)
        groups = [list(range(bounds[k], bounds[k + 1])) for k in range(period)]
        assignment = {u.name: [] for u in profile.units}
        for h, g in enumerate(groups):
            for i in g:
                assignment[profile.units[i].name].append(h)
        if all(assignment.values()):
            best = min(best, total_exposed(profile, Schedule(period, assignment)))
    return best


def covers_once(schedule: Schedule, profile: Profile) -> bool:
    return set(schedule.unit_names) == set(profile.names) and all(schedule.iterations_of(n) for n in profile.names)


@settings(max_examples=150, deadline=None)
@given(instances())
def test_searches_are_ordered_and_exact(instance):
    profile, period = instance
    contiguous = total_exposed(profile, contiguous_optimal(profile, period))
    assert contiguous <= total_exposed(profile, paper_dfs(profile, period)) + 1e-9
    assert contiguous == pytest.approx(best_contiguous_by_enumeration(profile, period), abs=1e-9)
    planned = plan(profile, period, fill=False)
    assert total_exposed(profile, planned) <= contiguous + 1e-9
    assert total_exposed(profile, planned) == pytest.approx(
        total_exposed(profile, brute_force(profile, period)), abs=1e-9
    )
    for s in (planned, contiguous_optimal(profile, period), paper_dfs(profile, period)):
        assert covers_once(s, profile)


@settings(max_examples=100, deadline=None)
@given(instances(max_units=8))
def test_fill_in_never_raises_any_iterations_exposed_time(instance):
    profile, period = instance
    base = plan(profile, period, fill=False)
    filled = fill_in(base, profile)
    before, after = simulate(profile, base), simulate(profile, filled)
    for a, b in zip(before.iterations, after.iterations):
        assert b.exposed_s <= a.exposed_s + 1e-9
    assert all(set(base.iterations_of(n)) <= set(filled.iterations_of(n)) for n in profile.names)


def test_non_contiguous_beats_contiguous_on_a_known_case():
    # Unit 0 has a long window but big comm; units 1, 2 are cheap. Best: {0, 2} and {1}.
    profile = Profile.synthetic([1.0, 0.1, 0.1], [1.1, 0.05, 0.05])
    contiguous = total_exposed(profile, contiguous_optimal(profile, 2))
    best = total_exposed(profile, plan(profile, 2, fill=False))
    assert best < contiguous


def test_simulator_sanity_and_hand_computed_timelines():
    # Zero comm: iteration = compute.
    p = Profile.synthetic([0.1, 0.2], [0.0, 0.0], forward_s=0.05, optimizer_s=0.01)
    t = simulate(p, Schedule.every_step(p.names))
    assert t.iteration_s == pytest.approx(0.36) and t.exposed_s == 0
    # Long backward after the first unit: its comm is hidden entirely.
    p = Profile.synthetic([0.01, 100.0], [5.0, 0.0])
    assert simulate(p, Schedule.every_step(p.names)).exposed_s == 0
    # Local SGD: sum of comm once per period, nothing hidden.
    p = Profile.synthetic([0.1, 0.1, 0.1], [0.2, 0.3, 0.4])
    local = simulate_method(p, "local_sgd", period=4)
    assert local.exposed_s == pytest.approx(0.9) and local.iterations[3].exposed_s == pytest.approx(0.9)
    # Hand computed: ready 0.1, 0.3, 0.6; comm 0.25, 0.1, 0.05; B = 0.6.
    p = Profile.synthetic([0.1, 0.2, 0.3], [0.25, 0.1, 0.05])
    t = simulate(p, Schedule(1, {"u0": [0], "u1": [0], "u2": [0]}))
    events = [(e.start_s, e.end_s) for e in t.iterations[0].events]
    assert events == [pytest.approx((0.1, 0.35)), pytest.approx((0.35, 0.45)), pytest.approx((0.6, 0.65))]
    assert t.exposed_s == pytest.approx(0.05)
    t = simulate(p, Schedule(2, {"u0": [1], "u1": [0], "u2": [0]}))
    assert [it.exposed_s for it in t.iterations] == [pytest.approx(0.05), 0.0]
    assert t.lower_bound_s == pytest.approx(max(2 * 0.6, 0.4))


def test_trace_export(tmp_path):
    p = Profile.synthetic([0.1, 0.2], [0.3, 0.1], forward_s=0.05)
    path = tmp_path / "trace.json"
    simulate(p, plan(p, 2)).write_chrome_trace(path)
    import json

    events = json.loads(path.read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == {"compute", "comm"}
    assert any(e.get("tid") == 1 and e["ph"] == "X" for e in events)


@pytest.mark.parametrize("period", [0, -2, 1.5])
def test_bad_period(period):
    p = Profile.synthetic([0.1], [0.1])
    with pytest.raises(ValueError, match="period must be an integer >= 1"):
        plan(p, period)


def test_period_longer_than_units_leaves_iterations_empty():
    p = Profile.synthetic([0.1, 0.1], [0.05, 0.3])
    s = plan(p, 5, fill=False)
    assert covers_once(s, p) and sum(1 for h in range(5) if not s.units_at(h)) >= 3


def test_bad_profile_times():
    with pytest.raises(ValueError, match="unit 'u1' backward_s must be a finite number >= 0, got nan"):
        Profile.synthetic([0.1, math.nan], [0.1, 0.1])
    with pytest.raises(ValueError, match="unit 'u0' comm_s must be a finite number >= 0, got -1.0"):
        Profile.synthetic([0.1], [-1.0])
    with pytest.raises(ValueError, match="unknown planning method 'magic'"):
        plan(Profile.synthetic([0.1], [0.1]), 2, method="magic")


def test_plan_cli_writes_a_schedule_and_reprices(tmp_path):
    import subprocess
    import sys

    profile = Profile.synthetic([0.01] * 6, [0.002] * 6, forward_s=0.02, nbytes=[100_000] * 6)
    profile = Profile(profile.units, profile.forward_s, profile.backward_s, metadata={"world_size": 2})
    src = tmp_path / "p.json"
    profile.to_json(src)
    out = tmp_path / "s.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamddp.cli",
            "plan",
            "--profile",
            str(src),
            "--period",
            "3",
            "--link",
            "10mbit,20ms",
            "--out",
            str(out),
            "--trace",
            str(tmp_path / "t.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "lower bound" in proc.stdout and "dreamddp + fill-in" in proc.stdout
    schedule = Schedule.from_json(out)
    assert schedule.period == 3 and covers_once(schedule, profile)
    bad = subprocess.run(
        [sys.executable, "-m", "dreamddp.cli", "plan", "--profile", str(src), "--period", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "dreamddp plan: error: period must be an integer >= 1, got 0"


@st.composite
def coalescing_instances(draw, max_units=7):
    """Profiles with a fitted comm model: the wrapper's coalescing is priced (one alpha per bucket)."""
    from profiler import CommModel

    n = draw(st.integers(1, max_units))
    backward = draw(st.lists(times, min_size=n, max_size=n))
    nbytes = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n))
    comm = CommModel(draw(st.floats(0.0, 0.5)), draw(st.floats(0.0, 5e-4)))
    base = Profile.synthetic(backward, [0.0] * n, nbytes=nbytes)
    return base.with_comm(comm), draw(st.integers(1, 4)), draw(st.sampled_from([25.0, 0.002]))


@settings(max_examples=150, deadline=None)
@given(coalescing_instances())
def test_coalesced_cost_model_searches_are_exact(instance):
    from dreamddp.planning.search import _cost_matrix, _Instance

    profile, period, cap = instance
    inst = _Instance(profile, period, cap)
    matrix = _cost_matrix(inst)  # the incremental block costs equal direct simulation
    for i in range(inst.n + 1):
        for j in range(i, inst.n + 1):
            assert matrix[i, j] == pytest.approx(inst.cost(range(i, j)), abs=1e-9)
    contiguous = total_exposed(profile, contiguous_optimal(profile, period))
    assert contiguous <= total_exposed(profile, paper_dfs(profile, period)) + 1e-9
    assert total_exposed(profile, plan(profile, period, fill=False)) == pytest.approx(
        total_exposed(profile, brute_force(profile, period)), abs=1e-9
    )


def test_coalescing_pays_one_latency_per_bucket():
    from profiler import CommModel

    p = Profile.synthetic([0.1, 0.1, 0.1], [0.0] * 3, nbytes=[1000] * 3).with_comm(CommModel(0.05, 1e-4))
    t = simulate(p, Schedule.every_step(p.names))
    [event] = t.iterations[0].events  # three adjacent units, one all-reduce, launched at the last ready
    assert (event.start_s, event.end_s) == (pytest.approx(0.3), pytest.approx(0.3 + 0.05 + 0.3))
    t = simulate(p, Schedule(2, {"u0": [0], "u1": [1], "u2": [0]}))
    assert len(t.iterations[0].events) == 2  # not adjacent: two all-reduces

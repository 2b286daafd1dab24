"""Forward overlap: the cost model against hand-computed timelines, its ordering against the
paper's mode and the lower bound, the search against brute force, and delays in schedules."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamddp import Schedule, plan, simulate
from dreamddp.planning import (
    best_forward,
    brute_force_forward,
    fill_in,
    simulate_method,
    with_delays,
)
from dreamddp.planning.cli import main as plan_main
from profiler import CommModel, Profile

times = st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False)


def two_units(comm: tuple[float, float]) -> Profile:
    """u0 is the output side (ready at 0.1 of a 0.2 s backward, run last in forward), u1 the input
    side; forward 0.05 s each, optimizer 0.02 s (0.01 per unit: equal bytes)."""
    return Profile.synthetic([0.1, 0.1], list(comm), forward_s=[0.05, 0.05], optimizer_s=0.02, nbytes=[100, 100])


def spans(it) -> list[tuple]:
    return [(s.name, pytest.approx(s.start_s), pytest.approx(s.duration_s), s.unit) for s in it.spans]


# ----------------------------------------------------------------------- hand-computed timelines


def test_stall_before_the_input_side_units_forward():
    # Every step, both units. Backward starts at b: u0 sends [b+0.1, b+0.25], u1 queues behind it,
    # [b+0.25, b+0.35]; backward ends at b+0.2 with both pending, so both steps are deferred.
    # Next iteration: u1's forward comes first, at once: it stalls 0.15 (0.35 - 0.2), steps (0.01)
    # and runs; u0's bucket ended long before its forward, so it only steps.
    p = two_units((0.15, 0.1))
    s = Schedule.every_step(p.names)
    t = simulate(p, s, overlap="forward")
    [it] = t.iterations
    assert t.overlap == "forward" and t.steady and t.periods == 1
    assert it.iteration_s == pytest.approx(0.47) and it.exposed_s == pytest.approx(0.15)
    assert t.stall_by_unit == {"u1": pytest.approx(0.15)}
    assert spans(it) == [
        ("wait", 0.0, 0.15, "u1"),
        ("optimizer", 0.15, 0.01, "u1"),
        ("forward", 0.16, 0.05, ""),
        ("optimizer", 0.21, 0.01, "u0"),
        ("forward", 0.22, 0.05, ""),
        ("backward", 0.27, 0.2, ""),
    ]
    assert [(e.unit, e.start_s, e.end_s) for e in it.events] == [
        ("u0", pytest.approx(0.1), pytest.approx(0.25)),
        ("u1", pytest.approx(0.25), pytest.approx(0.35)),
    ]
    # u1's all-reduce ends 0.27 + 0.35 = 0.62 s into an iteration of 0.47 s: it spills over.
    assert it.backward_start_s + it.events[-1].end_s > it.iteration_s
    # The input side has no window in either mode: the same time as the paper's mode here.
    assert simulate(p, s).period_s == pytest.approx(0.47)


def test_comm_spills_into_the_next_iteration_and_a_delay_hides_it():
    # H = 2: u1 (input side, 0.5 s of comm) at h=0 with delay 1, u0 (0.1 s) at h=1.
    # Steady state, period start = 0:
    #   h=0: u1's average from the last period (ends 0.17) and u0's (ends 0.27, step deferred)
    #        are waited for: u1 stalls 0.17 at 0; u0's forward at 0.22 stalls 0.05, steps 0.01.
    #        Backward [0.33, 0.53]; u1 sent [0.53, 1.03] (a snapshot: it steps at once); opt 0.02.
    #   h=1: [0.55, 0.86]: backward from 0.65, u0 ready at 0.75 but the channel is u1's until
    #        1.03: sent [1.03, 1.13], past backward's end (0.85): its step is deferred to the
    #        next period, whose h=0 starts at 0.86 and finds both as above.
    p = two_units((0.1, 0.5))
    s = Schedule(2, {"u0": [1], "u1": [0]}, delays={"u1": 1}, overlap="forward")
    t = simulate(p, s)  # the schedule's own overlap
    assert t.overlap == "forward" and t.steady and t.periods == 1 and t.warmup_periods == 1
    h0, h1 = t.iterations
    assert (h0.iteration_s, h1.iteration_s) == (pytest.approx(0.55), pytest.approx(0.31))
    assert t.period_s == pytest.approx(0.86) and t.exposed_s == pytest.approx(0.22)
    assert t.stall_by_unit == {"u1": pytest.approx(0.17), "u0": pytest.approx(0.05)}
    assert spans(h0) == [
        ("wait", 0.0, 0.17, "u1"),
        ("forward", 0.17, 0.05, ""),
        ("wait", 0.22, 0.05, "u0"),
        ("optimizer", 0.27, 0.01, "u0"),
        ("forward", 0.28, 0.05, ""),
        ("backward", 0.33, 0.2, ""),
        ("optimizer", 0.53, 0.02, ""),
    ]
    assert spans(h1) == [("forward", 0.0, 0.1, ""), ("backward", 0.1, 0.2, ""), ("optimizer", 0.3, 0.01, "")]
    [(unit, start, end)] = [(e.unit, e.start_s, e.end_s) for e in h1.events]
    assert unit == "u0" and (start, end) == (pytest.approx(0.38), pytest.approx(0.48))  # queued behind u1
    assert t.peak_snapshot_bytes == 200  # u1's bucket: snapshot + reduction buffer; never two at once
    assert t.period_s >= t.lower_bound_s == pytest.approx(max(2 * 0.32, 0.6))
    assert simulate(p, s, overlap="backward").period_s == pytest.approx(0.82 + 0.32)  # u1 exposed 0.5

    trace = t.to_chrome_trace(repeat=2)
    lanes = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert lanes == {"compute", "comm"} and trace["metadata"] == {"method": "schedule", "overlap": "forward"}
    compute = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 0]
    assert {e["name"] for e in compute} == {"forward", "backward", "wait", "optimizer"}
    waits = [(e["ts"], e["args"]["unit"]) for e in compute if e["name"] == "wait"]
    assert waits[:2] == [(pytest.approx(0.0), "u1"), (pytest.approx(0.22e6), "u0")]
    comm = [
        (e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
        for e in trace["traceEvents"]
        if e["ph"] == "X" and e["tid"] == 1
    ]
    assert comm[:2] == [
        ("u1", pytest.approx(0.53), pytest.approx(1.03)),
        ("u0", pytest.approx(1.03), pytest.approx(1.13)),
    ]


def test_a_unit_is_usable_when_its_whole_bucket_is_done():
    # Coalesced: u0 and u1 adjacent, one 2000-byte all-reduce (0.05 + 0.2 s) launched when u1 is
    # ready (end of backward): u0, though ready at 0.1, lands with it. Next iteration u1 stalls
    # the whole 0.25 s at once (O = 0: nothing to defer), u0 is then usable too.
    p = Profile.synthetic([0.1, 0.1], [0.0, 0.0], forward_s=[0.05, 0.05], nbytes=[1000, 1000]).with_comm(
        CommModel(0.05, 1e-4)
    )
    t = simulate(p, Schedule.every_step(p.names), overlap="forward")
    [it] = t.iterations
    assert [(e.unit, e.start_s, e.end_s) for e in it.events] == [("u0+u1", pytest.approx(0.2), pytest.approx(0.45))]
    assert t.stall_by_unit == {"u1": pytest.approx(0.25)} and it.iteration_s == pytest.approx(0.55)


def test_units_not_averaged_never_wait_and_local_sgd_what_if():
    p = two_units((0.3, 0.3))
    s = Schedule(3, {"u0": [0], "u1": [0]}, overlap="forward")
    t = simulate(p, s)
    assert [bool(it.stalls) for it in t.iterations] == [False, True, False]  # only the iteration after
    local_b = simulate_method(p, "local_sgd", 3)
    local_f = simulate_method(p, "local_sgd", 3, overlap="forward")
    assert local_f.period_s <= local_b.period_s + 1e-12 and local_f.overlap == "forward"
    ssgd_f = simulate_method(p, "ssgd", 1, overlap="forward")
    assert ssgd_f.period_s <= simulate_method(p, "ssgd", 1).period_s + 1e-12
    with pytest.raises(ValueError, match="overlap must be 'backward' or 'forward', got 'sideways'"):
        simulate(p, s, overlap="sideways")


# ------------------------------------------------------------------------------ properties


@st.composite
def forward_instances(draw, max_units=6, max_period=4):
    """A synthetic profile (per-unit comm, or a comm model with coalescing) and a schedule with
    one or more syncs per unit and random valid delays."""
    n = draw(st.integers(1, max_units))
    period = draw(st.integers(1, max_period))
    backward = draw(st.lists(times, min_size=n, max_size=n))
    forward = draw(st.lists(times, min_size=n, max_size=n))
    nbytes = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n))
    optimizer = draw(st.floats(0.0, 0.5))
    if draw(st.booleans()):
        p = Profile.synthetic(
            backward, draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n)), forward, optimizer, nbytes
        )
    else:
        p = Profile.synthetic(backward, [0.0] * n, forward, optimizer, nbytes).with_comm(
            CommModel(draw(st.floats(0.0, 0.5)), draw(st.floats(0.0, 5e-4)))
        )
    its = st.lists(st.integers(0, period - 1), min_size=1, max_size=2)
    assignment = {name: draw(its) for name in p.names}
    plain = Schedule(period, assignment, overlap="forward")
    delays = {name: draw(st.integers(0, plain.gap_of(name) - 1)) for name in p.names}
    return p, plain, Schedule(period, assignment, delays=delays, overlap="forward")


@settings(max_examples=300, deadline=None)
@given(forward_instances())
def test_forward_is_never_slower_than_backward_and_delays_never_cost_time(instance):
    p, plain, delayed = instance
    backward = simulate(p, plain, overlap="backward")
    forward = simulate(p, plain)
    with_delay = simulate(p, delayed)
    assert forward.steady and with_delay.steady
    assert with_delay.period_s <= forward.period_s + 1e-9
    assert forward.period_s <= backward.period_s + 1e-9
    assert with_delay.period_s >= with_delay.lower_bound_s - 1e-9
    compute = p.forward_s + p.backward_s + p.optimizer_s
    assert forward.period_s == pytest.approx(plain.period * compute + forward.exposed_s, abs=1e-9)
    # Two copies (snapshot + reduction buffer) per bucket in flight. A bucket's copies live until its
    # last unit lands, so an undelayed unit in it may already be in flight again in another bucket:
    # at most one copy pair per unit per iteration of the period.
    bound = 2 * plain.period * sum(u.nbytes for u in p.units)
    assert forward.peak_snapshot_bytes == 0 and with_delay.peak_snapshot_bytes <= bound


@settings(max_examples=120, deadline=None)
@given(forward_instances(max_units=4, max_period=3), st.integers(0, 2))
def test_forward_search_is_exact_on_small_profiles(instance, max_delay):
    p, _, _ = instance
    period = len(p.units) % 3 + 1  # periods 1-3 without another draw
    found = best_forward(p, period, max_delay)
    truth = brute_force_forward(p, period, max_delay)
    assert simulate(p, found).period_s == pytest.approx(simulate(p, truth).period_s, abs=1e-9)
    assert found.overlap == "forward" and all(len(found.iterations_of(n)) == 1 for n in p.names)
    assert all(d <= min(max_delay, period - 1) for d in found.delays.values())


@settings(max_examples=60, deadline=None)
@given(forward_instances(max_units=6))
def test_forward_plan_beats_the_paper_modes_schedules_and_fill_in_costs_nothing(instance):
    p, plain, _ = instance
    period = plain.period
    planned = plan(p, period, fill=False, overlap="forward")
    value = simulate(p, planned).period_s
    # Ties within float noise are ties (hypothesis found 3.0000000015 against 3.0).
    for other in (plan(p, period, fill=False), plan(p, period, "contiguous", fill=False), plan(p, period, "plsgd")):
        assert value <= simulate(p, other, overlap="forward").period_s * (1 + 1e-8) + 1e-9
    filled = fill_in(planned, p)
    assert filled.overlap == "forward" and simulate(p, filled).period_s <= value * (1 + 1e-8) + 1e-9
    assert all(set(planned.iterations_of(n)) <= set(filled.iterations_of(n)) for n in p.names)


def test_local_search_path_against_brute_force(monkeypatch):
    import random

    from dreamddp.planning import search

    monkeypatch.setattr(search, "EXACT_FORWARD_EVALS", 0)  # force seeds + local search
    rng = random.Random(7)
    worse = 0
    for _ in range(30):
        n, period = rng.randint(3, 5), rng.randint(2, 3)
        p = Profile.synthetic(
            [rng.random() for _ in range(n)],
            [rng.random() * 1.5 for _ in range(n)],
            [rng.random() for _ in range(n)],
            rng.random() * 0.3,
            [rng.randint(1, 100) for _ in range(n)],
        )
        found = simulate(p, best_forward(p, period)).period_s
        truth = simulate(p, brute_force_forward(p, period)).period_s
        assert found >= truth - 1e-9
        worse += found > truth + 1e-9
    assert worse <= 2


def test_delays_buy_time_only_where_needed():
    # H = 3, both units at h=0. The input side's 0.5 s goes out at the end of backward and cannot
    # hide in one iteration (its window is O and nothing else), but in three it can; u0's 0.1 s
    # is done by the end of backward, so it gets no delay and costs no snapshot.
    p = two_units((0.1, 0.5))
    no_delay = simulate(p, plan(p, 3, fill=False, overlap="forward")).period_s
    planned = plan(p, 3, fill=False, overlap="forward", max_delay=2)
    assert planned.delays == {"u1": 2}
    t = simulate(p, planned)
    assert no_delay == pytest.approx(1.45) and t.period_s == pytest.approx(t.lower_bound_s) == pytest.approx(0.96)
    assert t.peak_snapshot_bytes == 200 and not t.stall_by_unit  # u1's bucket alone, two copies
    assert with_delays(Schedule(3, {"u0": [0], "u1": [0]}), p, 2).delays == {"u1": 2}
    assert with_delays(Schedule(3, {"u0": [0], "u1": [0]}), p, 5).delays == {"u1": 2}  # at most H - 1


# ------------------------------------------------------------------------ schedule and JSON


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"delays": {"ghost": 1}}, r"delay 1 given for unit 'ghost', which the schedule does not average"),
        ({"delays": {"a": -1}}, r"unit 'a' has delay -1; a delay must be an integer >= 0"),
        ({"delays": {"a": 1.5}}, r"unit 'a' has delay 1.5; a delay must be an integer >= 0"),
        ({"delays": {"a": True}}, r"unit 'a' has delay True; a delay must be an integer >= 0"),
        (
            {"delays": {"a": 4}},
            r"unit 'a' has delay 4, but it is averaged again 4 iteration\(s\) later; its delay must be < 4",
        ),
        (
            {"delays": {"b": 2}},
            r"unit 'b' has delay 2, but it is averaged again 2 iteration\(s\) later; its delay must be < 2",
        ),
        ({"delays": {"a": 1}, "overlap": "backward"}, r"unit 'a' has delay 1, but delays need overlap='forward'"),
        ({"delays": ["a"]}, r"schedule delays must map unit names to iterations, got list"),
        ({"overlap": "both"}, r"schedule overlap must be 'backward' or 'forward', got 'both'"),
    ],
)
def test_bad_delays_are_one_line_errors_naming_the_unit_and_value(kwargs, message):
    kwargs = {"overlap": "forward", **kwargs}
    with pytest.raises(ValueError, match=message) as err:
        Schedule(4, {"a": [0], "b": [1, 3]}, **kwargs)
    assert "\n" not in str(err.value)


def test_delays_and_overlap_round_trip_and_old_files_load(tmp_path):
    s = Schedule(4, {"a": [0], "b": [1, 3]}, metadata={"method": "x"}, delays={"a": 3, "b": 1}, overlap="forward")
    assert s.delay_of("a") == 3 and s.delay_of("b") == 1 and s.gap_of("b") == 2
    path = tmp_path / "s.json"
    s.to_json(path)
    data = json.loads(path.read_text())
    assert data["overlap"] == "forward" and data["delays"] == {"a": 3, "b": 1}
    assert Schedule.from_json(path) == s
    old = {"format": "dreamddp.schedule/1", "period": 2, "assignment": {"a": [0], "b": [1]}, "metadata": {}}
    path.write_text(json.dumps(old))
    loaded = Schedule.from_json(path)
    assert loaded.overlap == "backward" and loaded.delays == {} and loaded.delay_of("a") == 0
    assert loaded == Schedule(2, {"a": [0], "b": [1]}, delays={"a": 0})  # zero delays are no delays
    old["delays"], old["overlap"] = {"a": 2}, "forward"
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"s\.json'.*unit 'a' has delay 2, but it is averaged again 2"):
        Schedule.from_json(path)


def test_plan_arguments_are_checked():
    p = two_units((0.1, 0.1))
    with pytest.raises(ValueError, match="max_delay=1 needs overlap='forward'"):
        plan(p, 2, max_delay=1)
    with pytest.raises(ValueError, match="max_delay must be an integer >= 0, got -1"):
        plan(p, 2, overlap="forward", max_delay=-1)
    with pytest.raises(ValueError, match="overlap must be 'backward' or 'forward', got 'fwd'"):
        plan(p, 2, overlap="fwd")
    for method in ("paper", "contiguous", "plsgd", "local_sgd"):
        s = plan(p, 2, method, overlap="forward", max_delay=1)
        assert s.overlap == "forward" and s.metadata["method"] in (method, "paper_dfs", "contiguous_optimal")


def test_plan_cli_prints_both_modes_and_writes_the_forward_schedule(tmp_path, capsys):
    profile = Profile.synthetic([0.01] * 6, [0.0] * 6, forward_s=0.02, optimizer_s=0.002, nbytes=[100_000] * 6)
    profile = Profile(
        profile.units, profile.forward_s, profile.backward_s, profile.optimizer_s, metadata={"world_size": 2}
    )
    src, out, trace = tmp_path / "p.json", tmp_path / "s.json", tmp_path / "t.json"
    profile.to_json(src)
    args = ["--profile", str(src), "--period", "3", "--link", "10mbit,20ms", "--out", str(out)]
    assert plan_main([*args, "--overlap", "forward", "--max-delay", "2", "--trace", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "backward overlap (paper)" in text and "forward overlap" in text and "dreamddp, delays <= 2" in text
    assert "the lower bound" in text and any(line.startswith("lower bound") for line in text.splitlines())
    schedule = Schedule.from_json(out)
    assert schedule.overlap == "forward" and schedule.period == 3
    assert json.loads(trace.read_text())["metadata"]["overlap"] == "forward"
    assert plan_main([*args, "--max-delay", "1"]) == 2
    assert "--max-delay needs --overlap forward" in capsys.readouterr().err

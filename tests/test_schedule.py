"""Schedule: validation, baseline constructors, JSON round trip."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dreamddp import Schedule, sync_units
from dreamddp.core.schedule import split_equal_bytes

from .nets import MLP, TiedLM


def test_sync_units_names_tied_once_and_skips_parameter_free_modules():
    lm = TiedLM()
    units = sync_units(lm)
    assert [u.name for u in units] == ["embed", "mix"]  # `out` owns only the tied weight
    assert sum(1 for u in units for p in u.params if p is lm.embed.weight) == 1
    mlp_units = {u.name: u for u in sync_units(MLP())}
    assert list(mlp_units) == ["fc1", "bn", "fc2", "head"]
    assert mlp_units["bn"].buffer_names == ("bn.running_mean", "bn.running_var")  # no int counter
    assert mlp_units["fc1"].nbytes == (8 * 16 + 16) * 4


@pytest.mark.parametrize("period", [0, -1, 1.5, True, "4"])
def test_bad_period_names_the_value(period):
    with pytest.raises(ValueError, match=f"period must be an integer >= 1, got {period!r}"):
        Schedule.local_sgd(["a"], period)
    with pytest.raises(ValueError, match="period"):
        Schedule(period=period, assignment={"a": [0]})


def test_bad_assignments_name_the_unit():
    with pytest.raises(ValueError, match=r"unit 'b' has iteration 4 outside \[0, 4\)"):
        Schedule(period=4, assignment={"a": [0], "b": [4]})
    with pytest.raises(ValueError, match=r"unit 'a' is never averaged"):
        Schedule(period=2, assignment={"a": []})
    s = Schedule(period=2, assignment={"a": [1], "ghost": [0]})
    with pytest.raises(ValueError, match=r"schedule names unit 'ghost', which the model does not have"):
        s.check_units(["a"])
    with pytest.raises(ValueError, match=r"schedule misses unit 'c'"):
        s.check_units(["a", "ghost", "c"])


def test_constructors_and_queries():
    names = ["a", "b", "c"]
    assert Schedule.every_step(names).period == 1
    local = Schedule.local_sgd(names, 4)
    assert local.units_at(3) == names and local.units_at(0) == []
    s = Schedule(period=4, assignment={"a": [2, 0, 2], "b": 1, "c": [3]})
    assert s.iterations_of("a") == [0, 2] and s.iterations_of("b") == [1]
    assert s.syncs_per_period() == 4


def test_json_round_trip_and_malformed_files(tmp_path):
    s = Schedule(period=3, assignment={"x": [0, 2], "y": [1]}, metadata={"method": "test"})
    path = tmp_path / "s.json"
    s.to_json(path)
    assert json.loads(path.read_text())["format"] == "dreamddp.schedule/1"
    assert Schedule.from_json(path) == s
    path.write_text('{"format": "other/1", "period": 2, "assignment": {}}')
    with pytest.raises(ValueError, match=r"format 'other/1' is not 'dreamddp.schedule/1'"):
        Schedule.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        Schedule.from_json(path)
    with pytest.raises(ValueError, match="does not exist"):
        Schedule.from_json(tmp_path / "missing.json")
    path.write_text('{"format": "dreamddp.schedule/1", "period": 2, "assignment": {"x": [5]}}')
    with pytest.raises(ValueError, match=r"unit 'x' has iteration 5"):
        Schedule.from_json(path)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 10_000), min_size=1, max_size=30), groups=st.integers(1, 12))
def test_split_equal_bytes_is_contiguous_complete_and_balanced(sizes, groups):
    parts = split_equal_bytes(sizes, groups)
    assert len(parts) == groups
    assert [i for p in parts for i in p] == list(range(len(sizes)))  # contiguous, in order, complete
    if len(sizes) >= groups:
        assert all(parts)  # nobody idle while there are units to share
    total, biggest = sum(sizes), max(sizes)
    for p in parts:  # each group within one unit of its share
        assert sum(sizes[i] for i in p) <= total / groups + biggest + 1e-9


@settings(max_examples=50, deadline=None)
@given(widths=st.lists(st.integers(1, 8), min_size=1, max_size=8), period=st.integers(1, 6))
def test_plsgd_covers_every_unit_once_in_backward_order(widths, period):
    model = nn.Sequential(*[nn.Linear(w, w) for w in widths])
    units = sync_units(model)
    s = Schedule.plsgd(units, period)
    s.check_units([u.name for u in units])
    its = [s.iterations_of(u.name) for u in reversed(units)]
    assert all(len(i) == 1 for i in its)
    flat = [i[0] for i in its]
    assert flat == sorted(flat) and flat[0] == 0  # output side first, contiguous groups

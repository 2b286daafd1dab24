"""train.replan_every: the schedule is re-planned from the job's own timings while it runs.

Real torchrun jobs on 2 gloo ranks. The job starts from a poor schedule (every unit averaged at
every iteration of the period) and a profile of the tiny GPT's real units; it re-plans at every
period boundary. Every rank must switch to the same schedule (their checkpoints record it), the
log names each re-plan, and a job resumed from a checkpoint taken after a switch continues with
the switched schedule bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dreamddp.core.schedule import Schedule
from dreamddp.core.units import sync_units
from dreamddp.planning.profile import CommModel, Profile, UnitProfile
from dreamddp.training.config import load_config
from dreamddp.training.models import build_model

from .test_resume import REPO, TINY_GPT, _assert_same, _final_state, _losses, _torchrun

STEPS = ["train.steps=12", "train.checkpoint_every=4", "train.checkpoint_keep=3"]
# A simulated slow link, so that the observed transfers (and hence the refreshed profile) make
# the starting schedule's extra latencies clearly slower than a plan, on any machine.
SLOW_LINK = ['train.link="20mbit,20ms"']


def _profile_and_poor_schedule(tmp: Path, comm: CommModel | None = None) -> list[str]:
    cfg = load_config(REPO / "configs" / "gpt-tiny.toml", TINY_GPT)
    units = sync_units(build_model(cfg.model_name, cfg.model_options))
    names = [u.name for u in units]
    profile = Profile(
        tuple(UnitProfile(u.name, u.nbytes, 1e-3, 1e-3) for u in units), 0.01, 1e-3 * len(units), 1e-3
    ).with_comm(comm or CommModel(0.02, 8 / 100e6))  # priced for a slow link; the job then observes loopback
    profile.to_json(tmp / "profile.json")
    # Every unit at every iteration: four latencies per period where one would do.
    Schedule(4, {name: (0, 1, 2, 3) for name in names}).to_json(tmp / "schedule.json")
    return [
        'train.algorithm="dreamddp"',
        f'train.schedule="{tmp / "schedule.json"}"',
        f'train.profile="{tmp / "profile.json"}"',
        "train.replan_every=1",
    ]


@pytest.mark.slow  # 16 s: the fast tier's budget
@pytest.mark.timeout(300)
def test_replanned_schedule_is_the_same_on_every_rank_and_survives_a_resume(tmp_path):
    setup = _profile_and_poor_schedule(tmp_path)
    first = _torchrun(tmp_path, "first", setup + STEPS + SLOW_LINK)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "first.jsonl").read_text().splitlines()]
    replans = [r for r in records if r.get("event") == "replan"]
    assert [r["step"] for r in replans] == [4, 8]  # every period boundary but the last
    assert all(r["observed_iterations"] == 4 for r in replans)
    assert replans[0]["switched"]  # the starting schedule was predicted slower than the plan

    # Both ranks run the same, re-planned schedule (not the one they started with).
    saved = [_final_state(tmp_path / "first", rank)["schedule"] for rank in (0, 1)]
    assert saved[0] == saved[1]
    initial = Schedule.from_json(tmp_path / "schedule.json")
    assert saved[0]["assignment"] != {n: list(its) for n, its in initial.assignment.items()}

    # Resume a copy of the checkpoint taken right after the switch at 8: the same last 4 iterations.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "first" / "step-00000008", resumed_dir / "step-00000008")
    (resumed_dir / "latest").write_text("step-00000008")
    second = _torchrun(tmp_path, "resumed", setup + STEPS + SLOW_LINK)
    assert second.returncode == 0, second.stderr[-3000:]
    first_losses, second_losses = _losses(tmp_path / "first.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert {s: first_losses[s] for s in range(8, 12)} == second_losses
    for rank in (0, 1):
        a, b = _final_state(tmp_path / "first", rank), _final_state(resumed_dir, rank)
        for key in ("model", "optimizer", "schedule"):
            _assert_same(a[key], b[key], f"rank {rank} {key}")


def test_replanning_needs_a_profile_and_dreamddp():
    from dreamddp.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"train.replan_every=2 needs train.algorithm='dreamddp' and train.profile"):
        TrainConfig(replan_every=2)
    with pytest.raises(ValueError, match="got algorithm 'plsgd'"):
        TrainConfig(algorithm="plsgd", replan_every=2, profile="p.json")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_period_auto_is_chosen_from_the_profile_and_chosen_again_when_replanning(tmp_path):
    from dreamddp.planning import auto_period

    setup = _profile_and_poor_schedule(tmp_path, CommModel(0.001, 8 / 100e6))
    chosen = auto_period(Profile.from_json(tmp_path / "profile.json"))
    assert chosen == 3  # the profile is built for a short period, so the test sees several re-plans
    overrides = [item for item in setup if not item.startswith("train.schedule")]  # no file: the planner decides
    run = _torchrun(tmp_path, "auto", overrides + ['train.period="auto"', "train.steps=9"])
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "auto.jsonl").read_text().splitlines()]
    assert records[0]["note"] == f"train.period='auto': H={chosen}, planned from {str(tmp_path / 'profile.json')!r}"
    replans = [r for r in records if r.get("event") == "replan"]
    assert replans
    in_force, last = chosen, 0
    for record in replans:  # each a period of the H in force after the one before
        assert record["step"] - last == in_force
        in_force, last = (record["period"] if record["switched"] else in_force), record["step"]
    saved = [_final_state(tmp_path / "auto", rank)["schedule"] for rank in (0, 1)]
    assert saved[0] == saved[1] and saved[0]["period"] == in_force


def test_a_failed_replan_keeps_the_schedule_and_says_why(tmp_path):
    """Rank 0 cannot plan (no timings observed): the record says so and nothing switches or hangs."""
    from types import SimpleNamespace

    from dreamddp.core.sync_options import SyncOptions
    from dreamddp.training.replanning import Replanner

    _profile_and_poor_schedule(tmp_path)
    schedule = Schedule.from_json(tmp_path / "schedule.json")
    switched = []
    cfg = load_config(REPO / "configs" / "gpt-tiny.toml", TINY_GPT)
    strategy = SimpleNamespace(
        raw_model=build_model(cfg.model_name, cfg.model_options),
        schedule=schedule,
        period=4,
        cfg=SimpleNamespace(period=4),
        ddp=SimpleNamespace(iteration=4, period_origin=0, overlap="backward", sync=SyncOptions()),
        observed_timings=lambda: [],
        switch_schedule=switched.append,
    )
    record = Replanner(strategy, str(tmp_path / "profile.json"), every=1).maybe_replan(4)
    assert record is not None and record["switched"] is False and not switched
    assert "no observed iterations" in record["error"]

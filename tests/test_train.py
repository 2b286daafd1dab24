"""The real trainer under real torchrun: every algorithm, every model family, bad configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dreamddp.tools.runner import run_torchrun

REPO = Path(__file__).parents[1]
TINY_GPT = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.block_size=16",
    "data.batch_size=4",
    "data.seq_len=16",
    "data.max_bytes=200000",
    "train.steps=8",
    "train.period=4",
    "train.timing_warmup=1",
    "train.progress=false",
]


def torchrun(tmp_path: Path, config: str, overrides: list[str], nproc: int = 2) -> dict:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    summary = run_torchrun(
        REPO / "configs" / config, overrides, tmp_path / "log.jsonl", nproc=nproc, timeout=180, cwd=tmp_path
    )
    steps = [r["step"] for r in summary["records"] if "loss" in r]
    assert steps == list(range(len(steps))) and steps
    return summary


def model_bytes(config_overrides: list[str]) -> int:
    from dreamddp.training.config import load_config
    from dreamddp.training.models import build_model

    cfg = load_config(REPO / "configs" / "gpt-tiny.toml", config_overrides)
    return sum(p.numel() * 4 for p in build_model(cfg.model_name, cfg.model_options).parameters())


@pytest.mark.parametrize(
    "algorithm",
    [
        *(pytest.param(a, marks=pytest.mark.slow) for a in ("none", "local_sgd", "post_local_sgd", "plsgd", "ssgd")),
        "dreamddp",
    ],
)
def test_every_algorithm_trains_under_torchrun(tmp_path, algorithm):
    summary = torchrun(tmp_path, "gpt-tiny.toml", TINY_GPT + [f"train.algorithm={algorithm}", "train.link=1gbit,1ms"])
    nbytes = model_bytes(TINY_GPT)
    expected = {
        "none": 0,
        "ssgd": nbytes,
        "local_sgd": nbytes / 4,
        "post_local_sgd": nbytes / 4,
        "plsgd": nbytes / 4,
        "dreamddp": nbytes / 4,
    }[algorithm]
    assert summary["algorithm"] == algorithm and summary["world_size"] == 2
    assert summary["bytes_per_iter"] == pytest.approx(expected)
    assert 0 < summary["val_loss"] < 6.0  # ln(256) = 5.55 at random init
    assert summary["iter_s"] > 0 and summary["peak_rss_mb"] > 0
    if algorithm != "none":
        assert summary["channel_busy_s_per_iter"] > 0


@pytest.mark.parametrize(
    "config,overrides",
    [
        pytest.param(  # slow tier: the HF Llama tests exercise a Llama-style model in the fast one
            "llama-tiny.toml",
            [
                "model.n_layer=1",
                "model.d_model=32",
                "data.batch_size=4",
                "data.seq_len=16",
                "data.max_bytes=200000",
                "train.steps=4",
            ],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "resnet18-digits.toml", ["model.width=4", "data.batch_size=8", "train.steps=4"], marks=pytest.mark.slow
        ),
    ],
)
def test_other_model_families_train_with_dreamddp(tmp_path, config, overrides):
    summary = torchrun(
        tmp_path, config, overrides + ["train.progress=false", "train.timing_warmup=0", "train.period=2"]
    )
    assert summary["bytes_per_iter"] > 0 and summary["val_loss"] > 0


@pytest.mark.slow  # the period test below trains from a schedule file in the fast tier
def test_schedule_file_is_used(tmp_path):
    from dreamddp import Schedule, sync_units
    from dreamddp.training.config import load_config
    from dreamddp.training.models import build_model

    cfg = load_config(REPO / "configs" / "gpt-tiny.toml", TINY_GPT)
    names = [u.name for u in sync_units(build_model(cfg.model_name, cfg.model_options))]
    path = tmp_path / "every.json"
    Schedule.every_step(names).to_json(path)
    summary = torchrun(tmp_path, "gpt-tiny.toml", TINY_GPT + ["train.algorithm=dreamddp", f"train.schedule={path}"])
    assert summary["bytes_per_iter"] == pytest.approx(model_bytes(TINY_GPT))
    assert "period 1" in summary["note"]


@pytest.mark.slow
def test_schedule_files_period_is_the_period_reported_and_traced(tmp_path):
    """train.period=4, but the schedule file's H is 2: the run follows the file, and so must its
    summary and the phases in its trace (they used to say 4)."""
    from dreamddp import Schedule, sync_units
    from dreamddp.training.config import load_config
    from dreamddp.training.models import build_model

    cfg = load_config(REPO / "configs" / "gpt-tiny.toml", TINY_GPT)
    path = tmp_path / "h2.json"
    Schedule.plsgd(sync_units(build_model(cfg.model_name, cfg.model_options)), 2).to_json(path)
    trace = tmp_path / "trace.json"
    summary = torchrun(
        tmp_path,
        "gpt-tiny.toml",
        TINY_GPT
        + ["train.algorithm=dreamddp", f"train.schedule={path}", f"train.trace={json.dumps(str(trace))}"]
        + ["train.trace_steps=4"],
    )
    assert summary["period"] == 2 and "period 2" in summary["note"]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X" and "step" in e["args"]]
    assert {e["args"]["step"] for e in events} == {1, 2, 3, 4}
    assert all(e["args"]["phase"] == e["args"]["step"] % 2 for e in events), events[:4]


def test_single_process_without_torchrun(tmp_path):
    log = tmp_path / "solo.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dreamddp.train",
            "--config",
            str(REPO / "configs" / "gpt-tiny.toml"),
            *[x for o in TINY_GPT + ["train.steps=2", f"train.log={log}"] for x in ("--set", o)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, GLOO_SOCKET_IFNAME="lo"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(log.read_text().splitlines()[-1])["summary"]["world_size"] == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.period=0", "train.period must be an integer >= 1 or 'auto', got 0"),
        ("train.link=fast", "malformed link 'fast'"),
    ],
)
def test_bad_config_is_one_line_error_before_any_process_group(override, message):
    proc = subprocess.run(
        [sys.executable, "-m", "dreamddp.train", "--set", override], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"dreamddp train: error: {proc.stderr.split('error: ', 1)[1].strip()}"]
    assert message in proc.stderr


@pytest.mark.slow
def test_evaluation_leaves_a_delayed_forward_overlap_run_unchanged(tmp_path):
    """Mid-run evaluation must not land (and then lose) a delayed average's correction.

    Delayed units launched at iteration 1 (not 0: the ranks still agree then, and the
    correction is zero) are due at the forward of iteration 4; evaluating after iteration 3
    runs a forward in between. Every loss must be that of the same run
    without evaluation (and the trainer must run overlap='forward').
    """
    from dreamddp import Schedule, sync_units
    from dreamddp.training.config import load_config
    from dreamddp.training.models import build_model

    cfg = load_config(REPO / "configs" / "gpt-tiny.toml", TINY_GPT)
    names = [u.name for u in sync_units(build_model(cfg.model_name, cfg.model_options))]
    assignment = {name: [i % 4] for i, name in enumerate(names)}
    delays = {name: 2 for name, phases in assignment.items() if phases == [1]}
    path = tmp_path / "delayed.json"
    Schedule(period=4, assignment=assignment, delays=delays, overlap="forward").to_json(path)
    runs = {}
    for eval_every in (0, 4):
        run_dir = tmp_path / f"eval{eval_every}"
        run_dir.mkdir()
        summary = torchrun(
            run_dir,
            "gpt-tiny.toml",
            TINY_GPT
            + [
                "train.algorithm=dreamddp",
                f"train.schedule={path}",
                f"train.eval_every={eval_every}",
                "train.link=20mbit,2ms",
            ],
        )
        assert f"overlap='forward', {len(delays)} units delayed" in summary["note"]
        runs[eval_every] = [r["loss"] for r in summary["records"] if "loss" in r]
        assert any("val_loss" in r for r in summary["records"]) == bool(eval_every)
    assert runs[0] == runs[4]

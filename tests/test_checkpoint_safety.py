"""Checkpoints that are verified before they are trusted, and resumes that say what changed.

A damaged latest checkpoint is skipped for the newest one that verifies (one warning line);
``dreamddp checkpoint verify`` reports the same; a full disk during a save is one line with no
temporary files left; and a resume refuses the settings that define the run while applying
(and announcing) the hyperparameters a user may change.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamddp.ops.checkpoint import file_digest, verify_checkpoint
from dreamddp.training.config import DataConfig, ExperimentConfig, TrainConfig
from dreamddp.training.resume_policy import TRAIN_KEYS, apply_hyperparameters, compare_configs
from dreamddp.training.strategies import build_lr_scheduler
from tests.test_bad_inputs import _run, _tiny


def _train(cwd: Path, *overrides: str, timeout: float = 90) -> subprocess.CompletedProcess:
    args = ["--config", "tiny.toml", "--checkpoint-dir", "ckpt"]
    for item in overrides:
        args += ["--set", item]
    return _run("train", args, cwd, {}, timeout=timeout)


def _flip_tensor_bytes(path: Path) -> None:
    """Change 16 bytes in the middle of the file (tensor data, not the zip directory): torch still loads it."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def _verify(directory: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dreamddp.cli", "checkpoint", "verify", str(directory)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.mark.slow  # kept out of the fast tier's 6 minutes; the in-process checkpoint checks stay there
@pytest.mark.timeout(180)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    _tiny(tmp_path)
    first = _train(tmp_path, "train.steps=4", "train.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = tmp_path / "ckpt"
    assert verify_checkpoint(ckpt / "step-00000004").problems == []
    _flip_tensor_bytes(ckpt / "step-00000004" / "rank-00000.pt")
    torch.load(ckpt / "step-00000004" / "rank-00000.pt", weights_only=True)  # still loads: only a checksum sees it

    report = _verify(ckpt)
    assert report.returncode == 1, report.stdout + report.stderr
    assert "step-00000004: DAMAGED: rank-00000.pt does not match its SHA-256" in report.stdout
    assert "step-00000002: ok" in report.stdout and "a resume starts from step-00000002" in report.stdout

    resumed = _train(tmp_path, "train.steps=6", "train.checkpoint_every=2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Traceback" not in resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if "failed verification" in line]
    assert warnings == [
        "dreamddp train: checkpoint step-00000004 (rank 0: rank-00000.pt does not match its SHA-256 (its bytes "
        "changed after it was written)) failed verification; resuming from step-00000002 instead"
    ], resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "resume"] == [2]
    assert _verify(ckpt).returncode == 0  # the damaged one was replaced by a new step 4, then pruned


def test_verify_reports_a_directory_without_checkpoints(tmp_path):
    report = _verify(tmp_path)
    assert report.returncode == 2 and "holds no checkpoints" in report.stderr


def test_the_digest_is_taken_as_the_file_is_written(tmp_path):
    from dreamddp.ops.checkpoint import save_atomic

    digest = save_atomic({"w": torch.arange(1000.0)}, tmp_path / "f.pt")
    assert digest == file_digest(tmp_path / "f.pt")


# ------------------------------------------------------------------------------- full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 700 kB tmpfs: room for two checkpoints of the tiny model, not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_full_disk_is_one_line_and_leaves_the_previous_checkpoint(small_disk):
    _tiny(small_disk)
    proc = _train(small_disk, "train.steps=6", "train.checkpoint_every=2")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dreamddp train: error: the checkpoint at iteration"), lines[0]
    assert "No space left on device" in lines[0] and "are intact" in lines[0], lines[0]
    ckpt = small_disk / "ckpt"
    assert not list(ckpt.rglob("*.tmp.*")), list(ckpt.rglob("*"))
    committed = sorted(p.name for p in ckpt.glob("step-*"))
    assert committed and all(verify_checkpoint(ckpt / name).problems == [] for name in committed), committed
    assert (ckpt / "latest").read_text().strip() == committed[-1]


# --------------------------------------------------------------------------- resume policy
def test_every_config_key_has_one_resume_rule():
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    classified = [key for keys in TRAIN_KEYS.values() for key in keys]
    assert sorted(classified) == sorted(train_fields), set(classified) ^ train_fields


@pytest.mark.parametrize(
    "section,key,old,new",
    [
        ("model", "d_model", 32, 48),
        ("data", "batch_size", 8, 16),
        ("train", "optimizer", "sgd", "adamw"),
        ("train", "overlap", "backward", "forward"),
        ("train", "algorithm", "dreamddp", "plsgd"),
        ("train", "period", 4, 8),
    ],
)
def test_settings_that_define_the_run_are_refused(section, key, old, new):
    saved, current = ExperimentConfig().to_dict(), ExperimentConfig().to_dict()
    saved[section][key], current[section][key] = old, new
    changes = compare_configs(saved, current)
    assert changes.refused == [f"{section}.{key} {old!r} → {new!r}"] and not changes.accepted


def test_model_options_left_at_their_default_are_not_a_change():
    saved = ExperimentConfig().to_dict()
    current = ExperimentConfig().to_dict()
    current["model"] = {"name": "gpt", "d_model": 64}  # the gpt default, written out
    assert compare_configs(saved, current).refused == []


def test_hyperparameters_and_operational_settings_are_accepted_and_named():
    saved, current = ExperimentConfig().to_dict(), ExperimentConfig().to_dict()
    current["train"].update(lr=0.5, weight_decay=0.1, steps=500, eval_every=7, link="100mbit,5ms")
    current["train"]["schedule"] = "moved/schedule.json"  # compared by content, not by path
    changes = compare_configs(saved, current)
    assert changes.refused == []
    assert changes.applied_keys == {"lr", "weight_decay", "steps"}
    assert "train.lr 0.001 → 0.5" in changes.accepted and len(changes.accepted) == 5


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_changed_lr_is_written_over_the_restored_optimizer(schedule):
    model = torch.nn.Linear(2, 2)
    old_cfg = TrainConfig(lr=0.1, lr_schedule=schedule, steps=10, optimizer="sgd")
    old_opt = torch.optim.SGD(model.parameters(), lr=old_cfg.lr)
    old_sched = build_lr_scheduler(old_cfg, old_opt)
    for _ in range(3):
        old_opt.step()
        if old_sched is not None:
            old_sched.step()
    new_cfg = dataclasses.replace(old_cfg, lr=0.5, weight_decay=0.25)
    opt = torch.optim.SGD(model.parameters(), lr=new_cfg.lr)
    sched = build_lr_scheduler(new_cfg, opt)
    opt.load_state_dict(old_opt.state_dict())
    if sched is not None and old_sched is not None:
        sched.load_state_dict(old_sched.state_dict())
    assert opt.param_groups[0]["lr"] < 0.5  # what the checkpoint restores: the old run's LR
    apply_hyperparameters({"lr", "weight_decay"}, new_cfg, opt, sched)
    factor = 1.0 if sched is None else sched.lr_lambdas[0](3)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * factor)
    assert opt.param_groups[0]["weight_decay"] == 0.25
    if sched is not None:
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * sched.lr_lambdas[0](4))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_resume_applies_a_new_lr_and_refuses_a_new_optimizer(tmp_path):
    _tiny(tmp_path)
    (tmp_path / "tiny.toml").write_text(
        (tmp_path / "tiny.toml").read_text().replace('algorithm = "dreamddp"', 'algorithm = "ssgd"'), encoding="utf-8"
    )
    first = _train(tmp_path, "train.steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    before = torch.load(tmp_path / "ckpt" / "step-00000002" / "rank-00000.pt", weights_only=True)["model"]

    refused = _train(tmp_path, "train.steps=4", 'train.optimizer="sgd"', "data.batch_size=2")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "dreamddp train: error: cannot resume from the checkpoint at iteration 2 in 'ckpt': settings that define "
        "the run it continues were changed (data.batch_size 4 → 2, train.optimizer 'adamw' → 'sgd'); resume with "
        "the checkpoint's values, or use another checkpoint directory"
    ]

    applied = _train(tmp_path, "train.steps=4", "train.lr=1e-30")
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert "dreamddp train: resuming at iteration 2 with train.lr 0.001 → 1e-30 (changed since the checkpoint)" in (
        applied.stderr
    )
    assert "train.steps 2 → 4" in applied.stderr
    after = torch.load(tmp_path / "ckpt" / "step-00000004" / "rank-00000.pt", weights_only=True)["model"]
    # lr 1e-30 from the resume on (no weight decay): each AdamW update is below a float32 ulp, so every weight stays.
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


def test_data_keys_are_all_refused():
    for key, value in dataclasses.asdict(DataConfig()).items():
        saved, current = ExperimentConfig().to_dict(), ExperimentConfig().to_dict()
        current["data"][key] = value * 2 if not isinstance(value, str) else value + "x"
        assert compare_configs(saved, current).refused, key


def test_a_checkpoint_directory_copy_keeps_verifying(tmp_path):
    """Checksums cover content only: a copied (or moved) checkpoint directory still verifies."""
    src = tmp_path / "a"
    src.mkdir()
    from dreamddp.ops.checkpoint import save_atomic

    digest = save_atomic({"x": torch.ones(3)}, src / "rank-00000.pt")
    (src / "meta.json").write_text(json.dumps({"step": 1, "world_size": 1, "files": {"rank-00000.pt": digest}}))
    shutil.copytree(src, tmp_path / "b")
    assert verify_checkpoint(tmp_path / "b").problems == []


def test_a_changed_steps_moves_the_cosine_lr_at_once():
    """train.steps sets where the cosine reaches 0: the resumed iteration's LR follows the new one."""
    model = torch.nn.Linear(2, 2)
    old_cfg = TrainConfig(lr=0.1, lr_schedule="cosine", steps=10, optimizer="sgd")
    old_opt = torch.optim.SGD(model.parameters(), lr=old_cfg.lr)
    old_sched = build_lr_scheduler(old_cfg, old_opt)
    assert old_sched is not None
    for _ in range(5):
        old_opt.step()
        old_sched.step()
    new_cfg = dataclasses.replace(old_cfg, steps=100)
    opt = torch.optim.SGD(model.parameters(), lr=new_cfg.lr)
    sched = build_lr_scheduler(new_cfg, opt)
    assert sched is not None
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old_sched.state_dict())
    apply_hyperparameters({"steps"}, new_cfg, opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * sched.lr_lambdas[0](5))
    assert opt.param_groups[0]["lr"] > 0.09  # iteration 5 of 100, not of 10 (where it would be 0.05)

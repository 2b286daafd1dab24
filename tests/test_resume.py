"""Kill a rank mid-period under ``torchrun --max-restarts``: the job resumes bit for bit.

For every algorithm, a reference run trains N iterations without interruption. A second run
checkpoints every 3 iterations, and rank 1 SIGKILLs itself at iteration 7 (mid-period, H=4,
one iteration after the checkpoint at 6). torchrun stops the survivor, which must say which
rank stopped and at which iteration, relaunches both, and they resume from iteration 6. The
losses after the restart and every rank's final parameters and optimizer state must equal
the reference run's exactly (CPU, gloo: deterministic).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).parents[1]
TINY_GPT = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.block_size=16",
    "model.dropout=0.1",
    "data.batch_size=4",
    "data.seq_len=16",
    "data.max_bytes=200000",
    "train.steps=10",
    "train.period=4",
    "train.timing_warmup=1",
    "train.progress=false",
    'train.lr_schedule="cosine"',
    "train.lr_warmup=2",
    'train.optimizer="sgd"',
    "train.momentum=0.9",
    "train.lr=0.05",
]


def _torchrun(
    tmp: Path, name: str, overrides: list[str], *, max_restarts: int = 0, fault: str = "", nproc: int = 2
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.2",
        "-m",
        "dreamddp.train",
        "--config",
        str(REPO / "configs" / "gpt-tiny.toml"),
        "--set",
        f"train.log={tmp / name}.jsonl",
        "--checkpoint-dir",
        str(tmp / name),
    ]
    for item in TINY_GPT + overrides:
        cmd += ["--set", item]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "GLOO_SOCKET_IFNAME": "lo",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "DREAMDDP_FAULT": fault,
    }
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp)


def _losses(path: Path) -> dict[int, float]:
    """step -> loss; a resumed run logs the re-run steps again, the last value wins."""
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _final_state(directory: Path, rank: int) -> dict:
    step_dir = directory / (directory / "latest").read_text().strip()
    return torch.load(step_dir / f"rank-{rank:05d}.pt", weights_only=True)


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow  # about 30 s each: in-process resume tests keep bit-exact resume in the fast tier
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "algorithm",
    ["dreamddp", "local_sgd", "post_local_sgd", "ssgd", "dreamddp-delta", "dreamddp-two-level", "hier_local_sgd"],
)
def test_killed_rank_resumes_bitwise(tmp_path, algorithm):
    extra = [f'train.algorithm="{algorithm}"']
    nproc = 2
    if algorithm == "dreamddp-delta":  # anchors, outer momentum and int8 residuals resume too
        extra = ['train.algorithm="dreamddp"', 'train.sync="delta"', 'train.outer="nesterov"', 'train.compress="int8"']
    if algorithm in ("dreamddp-two-level", "hier_local_sgd"):  # 2 sites x 2 ranks
        nproc = 4
        extra = [f'train.algorithm="{algorithm.removesuffix("-two-level")}"', "train.ranks_per_site=2"]
        extra.append('train.hierarchy="hierarchical"')
    if algorithm == "post_local_sgd":
        extra.append("train.post_local_warmup=2")
    reference = _torchrun(tmp_path, "reference", extra, nproc=nproc)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = _torchrun(
        tmp_path,
        "killed",
        extra + ["train.checkpoint_every=3", "train.checkpoint_average=true"],
        max_restarts=1,
        fault="kill@1:7",
        nproc=nproc,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The survivor said, in one line, who stopped and where; no Python traceback from the trainer.
    lines = [ln for ln in run.stderr.splitlines() if ln.startswith("dreamddp train: error:")]
    assert lines, run.stderr[-3000:]
    # A survivor stops at the first collective after rank 1's death: at 7, or where local SGD next syncs.
    assert re.search(r"rank [023] stopped at iteration [78]\b.*rank 1 ", lines[0]), lines[0]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    records = [json.loads(ln) for ln in (tmp_path / "killed.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [6] and resumes[0]["attempt"] == 1

    ref_losses, run_losses = _losses(tmp_path / "reference.jsonl"), _losses(tmp_path / "killed.jsonl")
    assert ref_losses == run_losses  # exact float equality, every iteration
    for rank in range(nproc):
        ref, got = _final_state(tmp_path / "reference", rank), _final_state(tmp_path / "killed", rank)
        assert ref["step"] == got["step"] == 10
        for key in ("model", "optimizer", "lr_scheduler", "strategy"):
            _assert_same(ref[key], got[key], f"rank {rank} {key}")
    _check_averaged_export(tmp_path / "killed", nproc)


def _check_averaged_export(directory: Path, nproc: int = 2) -> None:
    """train.checkpoint_average: rank 0 also wrote the ranks' mean model, beside their own states."""
    step_dir = directory / (directory / "latest").read_text().strip()
    averaged = torch.load(step_dir / "averaged.pt", weights_only=True)
    ranks = [
        {k.removeprefix("module."): v for k, v in _final_state(directory, r)["model"].items()} for r in range(nproc)
    ]
    floats = [k for k, v in averaged.items() if v.is_floating_point()]
    assert floats and all(k in ranks[0] for k in averaged), sorted(set(averaged) - set(ranks[0]))
    for k in floats:
        torch.testing.assert_close(averaged[k], sum(r[k] for r in ranks) / nproc, msg=k)
    committed = [d for d in directory.glob("step-*") if (d / "meta.json").exists()]
    assert committed and all((d / "averaged.pt").exists() for d in committed), "every checkpoint has its export"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_truncated_latest_checkpoint_falls_back_on_every_rank(tmp_path):
    """Rank 1's file of the latest checkpoint is cut short: both ranks resume from the one before."""
    first = _torchrun(tmp_path, "run", ["train.steps=6", "train.checkpoint_every=3"])
    assert first.returncode == 0, first.stderr[-3000:]
    rank1 = tmp_path / "run" / "step-00000006" / "rank-00001.pt"
    rank1.write_bytes(rank1.read_bytes()[:1000])
    resumed = _torchrun(tmp_path, "run", ["train.steps=8", "train.checkpoint_every=3"], max_restarts=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    notices = [line for line in resumed.stderr.splitlines() if "failed verification" in line]
    assert len(notices) == 1, resumed.stderr[-3000:]  # said once, by rank 0, for the whole job
    assert "step-00000006 (rank 1: rank-00001.pt has 1000 bytes" in notices[0]
    assert "resuming from step-00000003 instead" in notices[0]
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [(r["step"], r["attempt"]) for r in resumes] == [(3, 0)]  # the first attempt, no restart needed


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_survivor_of_a_killed_peer_in_forward_mode_says_one_line(tmp_path):
    """Averages still in flight when the peer died are dropped on the way out, not waited on into a traceback."""
    run = _torchrun(tmp_path, "fwd", ['train.overlap="forward"', "train.checkpoint_every=3"], fault="kill@1:7")
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.splitlines() if "dreamddp train: error:" in ln]
    assert len(lines) == 1 and re.search(r"rank 0 stopped at iteration [78]\b.*rank 1 ", lines[0]), run.stderr[-3000:]
    worker_tracebacks = [c for c in run.stderr.split("Traceback")[1:] if re.search(r'File "[^"]*/dreamddp/', c)]
    assert worker_tracebacks == [], run.stderr[-3000:]

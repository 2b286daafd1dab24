"""Stopping a torchrun job from outside: each rank says where a rerun starts, in one line.

SIGINT (Ctrl-C reaches the whole process group) and SIGTERM to torchrun stop every rank with
one line and no traceback from the trainer; a SIGKILLed torchrun leaves orphaned workers,
which must notice, stop within a few seconds and commit no checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "model.block_size=16",
    "data.batch_size=2",
    "data.seq_len=16",
    "data.max_bytes=200000",
    "train.steps=100000",
    "train.progress=false",
]


def _start(tmp: Path) -> subprocess.Popen:
    """A long 2-rank run in its own session, checkpointing every 5 iterations; returns once one exists."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dreamddp.train"]
    cmd += ["--config", str(REPO / "configs" / "gpt-tiny.toml"), "--checkpoint-dir", str(tmp / "ckpt")]
    cmd += ["--checkpoint-every", "5", "--set", f"train.log={tmp / 'log.jsonl'}"]
    for item in TINY:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 90
    while not (tmp / "ckpt" / "latest").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never checkpointed: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return proc


def _trainer_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dreamddp train:")]


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)], ids=["int", "term"]
)
def test_a_stopped_job_says_where_a_rerun_starts(tmp_path, sig):
    proc = _start(tmp_path)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # what Ctrl-C in the terminal does
    else:
        os.kill(proc.pid, sig)  # a scheduler stopping the launcher
    _, stderr = proc.communicate(timeout=60)
    lines = _trainer_lines(stderr)
    assert len(lines) == 2, stderr[-3000:]  # one per rank
    for line in lines:
        assert f"({sig.name}); a rerun resumes from iteration " in line, line
        assert f"(the checkpoint in '{tmp_path / 'ckpt'}')" in line, line
    # torchrun prints its own SignalException traceback; none may come from the workers.
    worker_tracebacks = [c for c in stderr.split("Traceback")[1:] if re.search(r'File "[^"]*/dreamddp/', c)]
    assert worker_tracebacks == [], stderr[-3000:]


def _alive(marker: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_workers_stop_when_their_launcher_is_killed(tmp_path):
    proc = _start(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    marker = f"train.log={tmp_path / 'log.jsonl'}"
    while _alive(marker) and time.monotonic() - killed_at < 15:
        time.sleep(0.2)
    gone_after = time.monotonic() - killed_at
    assert not _alive(marker), "workers outlived their launcher by 15 s"
    assert gone_after < 5, gone_after
    _, stderr = proc.communicate(timeout=30)
    lines = _trainer_lines(stderr)
    assert len(lines) == 2 and all("its launcher died; a rerun resumes from iteration" in x for x in lines), stderr
    # No checkpoint committed once the launcher was seen dead: latest is at most one cadence past the last log line.
    steps = [json.loads(line).get("step", 0) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    latest = int((tmp_path / "ckpt" / "latest").read_text().strip().removeprefix("step-"))
    assert latest <= max(steps) + 1

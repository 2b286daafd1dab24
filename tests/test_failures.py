"""A rank that hangs: the survivor exits within the process-group timeout and names it.

Two real trainer processes (env:// rendezvous, no torchrun, so nothing but the trainer itself
decides when to give up). Rank 1 SIGSTOPs itself at iteration 3; rank 0 must leave within
``train.timeout_s`` plus the heartbeat diagnosis, with one line naming rank 1 and the
iteration, and no stack trace.
"""

from __future__ import annotations

import os
import re
import signal
import socket
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
    "data.batch_size=4",
    "data.seq_len=16",
    "data.max_bytes=200000",
    "train.steps=40",
    "train.period=2",
    "train.progress=false",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_hung_rank_is_named_within_the_timeout(tmp_path):
    port = _free_port()
    timeout_s = 4
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
            "GLOO_SOCKET_IFNAME": "lo",
            "DREAMDDP_FAULT": "stop@1:3",
        }
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        cmd = [
            sys.executable,
            "-m",
            "dreamddp.train",
            "--config",
            str(REPO / "configs" / "gpt-tiny.toml"),
            "--set",
            f"train.log={tmp_path}/log.jsonl",
            "--set",
            f"train.timeout_s={timeout_s}",
        ]
        for item in TINY:
            cmd += ["--set", item]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        )
    try:
        # Wait until rank 1 has stopped itself, then time how long rank 0 takes to give up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _state(procs[1].pid) != "T":
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.05)
        assert _state(procs[1].pid) == "T", "rank 1 never reached its stop point"
        stopped_at = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        took = time.monotonic() - stopped_at
        assert procs[0].returncode == 1, err[-2000:]
        assert took < timeout_s + 15, f"rank 0 took {took:.1f}s to give up"
        lines = [ln for ln in err.splitlines() if ln.startswith("dreamddp train: error:")]
        assert len(lines) == 1, err[-2000:]
        # Heartbeats go out at most every 0.2 s, so rank 1 may have stopped before its last one.
        assert re.search(r"rank 0 stopped at iteration 3: rank 1 \(last heartbeat at iteration [0-3]\)", lines[0]), (
            lines[0]
        )
        assert "stopped responding" in lines[0]
        assert "Traceback" not in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)


def _state(pid: int) -> str:
    """The process state letter from /proc (T = stopped)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    return text.rsplit(")", 1)[1].split()[0]


def test_heartbeat_leaves_the_jobs_store_timeout_alone():
    """The heartbeat's short store timeout is its own: the job's store keeps train.timeout_s."""
    code = """
import datetime, torch.distributed as dist
from dreamddp.ops.failures import Heartbeat
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=77))
beat = Heartbeat(0, 1)
assert beat._store is not None, "no heartbeat store"
print(dist.distributed_c10d._get_default_store().timeout.total_seconds(), beat._store.timeout.total_seconds())
beat.close()
dist.destroy_process_group()
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    job, heartbeat = map(float, proc.stdout.split())
    assert job == 77.0 and heartbeat == 5.0

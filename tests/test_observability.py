"""The Prometheus endpoint scraped over HTTP during a real run, and the Chrome trace it writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).parents[1]
TINY = [
    "model.n_layer=2",
    "model.d_model=32",
    "model.n_head=2",
    "model.block_size=16",
    "data.batch_size=4",
    "data.seq_len=16",
    "data.max_bytes=200000",
    "train.period=2",
    "train.progress=false",
    "train.timing_warmup=1",
]


def _free_ports(n: int) -> int:
    """A base port with n free consecutive ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            socks = []
            for i in range(n):
                sock = socket.socket()
                sock.bind(("127.0.0.1", base + i))
                socks.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range")


def _start(tmp: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "dreamddp.train",
        "--config",
        str(REPO / "configs" / "gpt-tiny.toml"),
        "--set",
        f"train.log={tmp}/log.jsonl",
    ]
    for item in TINY + overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "GLOO_SOCKET_IFNAME": "lo"}
    # Output to files (a pipe nobody reads while we scrape could fill and block the trainer), in a
    # session of its own so that cleanup reaches torchrun's workers too.
    with open(tmp / "stdout.txt", "w") as out, open(tmp / "stderr.txt", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=tmp, start_new_session=True)


def _finish(proc: subprocess.Popen, tmp: Path, timeout: float) -> str:
    """Wait for the run; its stderr. A run still going at the end is killed with its workers."""
    try:
        proc.wait(timeout=timeout)
    finally:
        _kill(proc)
    return (tmp / "stderr.txt").read_text()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _scrape(port: int) -> dict[str, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
        text = response.read().decode()
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
    return families


@pytest.mark.slow  # kept out of the fast tier's 6 minutes; the trace test keeps a traced torchrun job there
@pytest.mark.timeout(180)
def test_metrics_endpoint_is_scraped_during_a_run(tmp_path):
    port = _free_ports(2)
    proc = _start(
        tmp_path,
        ['train.algorithm="dreamddp"', "train.steps=150", 'train.link="10mbit,10ms"', f"train.metrics_port={port}"],
    )
    try:
        seen: dict[int, dict] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(seen) < 2 and proc.poll() is None:
            for rank in (0, 1):
                try:
                    families = _scrape(port + rank)
                except OSError:
                    continue
                done = families.get("dreamddp_iteration", {}).get(("dreamddp_iteration", (("rank", str(rank)),)), 0)
                if 3 <= done < 150:
                    seen[rank] = families
            time.sleep(0.2)
        assert len(seen) == 2, f"could not scrape both ranks mid-run; trainer rc={proc.poll()}"
        for rank, families in seen.items():
            label = (("rank", str(rank)),)
            for name in (
                "dreamddp_iteration_seconds",
                "dreamddp_compute_seconds",
                "dreamddp_comm_exposed_seconds",
                "dreamddp_comm_hidden_seconds",
            ):
                assert families[name][(f"{name}_count", label)] >= 2, name
            assert families["dreamddp_sent_bytes"][("dreamddp_sent_bytes_total", label)] > 0
            assert families["dreamddp_units_synced"][("dreamddp_units_synced", label)] >= 1
            assert 0 < families["dreamddp_loss"][("dreamddp_loss", label)] < 10
            assert families["dreamddp_throughput"][("dreamddp_throughput", label)] > 0
            assert families["dreamddp_rss_bytes"][("dreamddp_rss_bytes", label)] > 10e6
            # Behind a 10 Mbit/s, 10 ms link some communication was hidden behind backward.
            assert families["dreamddp_comm_hidden_seconds"][("dreamddp_comm_hidden_seconds_sum", label)] > 0
        # Bound to loopback only, unless told otherwise.
        listeners = [
            c
            for child in psutil.Process(proc.pid).children(recursive=True)
            for c in child.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in (port, port + 1)
        ]
        assert {c.laddr.ip for c in listeners} == {"127.0.0.1"}, listeners
        err = _finish(proc, tmp_path, timeout=120)
        assert proc.returncode == 0, err[-2000:]
    finally:
        _kill(proc)


@pytest.mark.timeout(180)
def test_trace_shows_each_ranks_compute_and_bucket_lanes(tmp_path):
    trace_path = tmp_path / "trace.json"
    proc = _start(
        tmp_path,
        [
            'train.algorithm="dreamddp"',
            "train.steps=8",
            'train.link="100mbit,2ms"',
            f"train.trace={json.dumps(str(trace_path))}",
            "train.trace_steps=4",
        ],
    )
    err = _finish(proc, tmp_path, timeout=150)
    assert proc.returncode == 0, err[-2000:]
    trace = json.loads(trace_path.read_text())
    assert trace["metadata"]["source"] == "measured" and trace["metadata"]["method"] == "dreamddp"
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    lanes = {(e["pid"], e["args"]["name"]) for e in trace["traceEvents"] if e["name"] == "thread_name"}
    for rank in (0, 1):
        assert (rank, "compute") in lanes and (rank, "comm bucket 0") in lanes
        mine = [e for e in events if e["pid"] == rank]
        steps = sorted({e["args"]["step"] for e in mine if e["name"] == "forward"})
        assert steps == [1, 2, 3, 4]  # trace_steps iterations from the first timed one
        for step in steps:
            fwd = next(e for e in mine if e["name"] == "forward" and e["args"]["step"] == step)
            bwd = next(e for e in mine if e["name"] == "backward" and e["args"]["step"] == step)
            comm = [e for e in mine if e["tid"] >= 1 and e["args"].get("step") == step]
            assert comm, f"rank {rank} step {step}: no all-reduce traced"
            for e in comm:
                # Launched from backward hooks: after forward ended, never before.
                assert e["ts"] >= fwd["ts"] + fwd["dur"] - 1, (e, fwd)
                assert e["args"]["bytes"] > 0 and e["name"]
            # Per-unit backward slices nest inside (or right at the end of) backward.
            units = [
                e
                for e in mine
                if e["args"].get("what") == "backward of unit"
                and bwd["ts"] - 1 <= e["ts"] <= bwd["ts"] + bwd["dur"] + 1
            ]
            assert units
        # Same event shape as the simulator's trace, so the two open side by side.
        for e in mine:
            assert {"name", "ph", "pid", "tid", "ts", "dur", "args"} <= e.keys() and "phase" in e["args"]

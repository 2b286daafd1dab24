"""`make demo`'s program end to end, at toy size: profile, plan, train every algorithm, table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    overrides = [
        "model.n_layer=1",
        "model.d_model=32",
        "model.n_head=2",
        "model.block_size=16",
        "data.batch_size=4",
        "data.seq_len=16",
        "data.max_bytes=200000",
        "train.timing_warmup=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "dreamddp.tools.demo",
        "--steps",
        "6",
        "--period",
        "2",
        "--repeats",
        "2",
        "--link",
        "1gbit,1ms",
        "--out",
        str(out),
    ]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for name in ("ssgd", "local_sgd", "plsgd", "dreamddp", "dreamddp-int8"):
        assert f"| {name} |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"ssgd", "local_sgd", "plsgd", "dreamddp", "dreamddp-int8"}
    results = summary["results"]
    assert results["dreamddp-int8"]["bytes_per_iter"] < 0.3 * results["dreamddp"]["bytes_per_iter"]
    assert "int8" in results["dreamddp-int8"]["note"]
    assert (out / "schedule.json").exists() and (out / "profile.json").exists()
    note = summary["results"]["dreamddp"]["note"]  # it trained with the planned schedule, in its planned mode
    assert "ignored" not in note and "PLSGD" not in note, note
    assert all(len(r["repeats_iter_s"]) == 2 for r in summary["results"].values())  # interleaved repeats
    assert " overlap (" in proc.stdout  # the planner chose the wrapper's mode

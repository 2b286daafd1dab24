"""Launch the trainer under torchrun as a subprocess and return its summary.

The demo, the benchmarks and the integration tests all start real multi-process runs the
same way; this is that one way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["TrainRunFailed", "median_run", "read_summary", "run_torchrun", "torchrun"]


class TrainRunFailed(RuntimeError):
    pass


def torchrun(
    module_args: Sequence[str],
    *,
    nproc: int = 2,
    timeout: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
    max_restarts: int = 0,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``torchrun --standalone --nproc-per-node N -m <module_args>``; return its stdout.

    ``env`` adds to this process's environment. A failing run raises ``TrainRunFailed`` with
    the last lines of its output.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        *module_args,
    ]
    env = {**os.environ, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    # torchrun --standalone shares its rendezvous store with the workers, and a restarted gloo
    # job then reads the previous attempt's addresses (pytorch/pytorch#135712): keep them apart.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise TrainRunFailed(f"torchrun run did not finish within {timeout}s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise TrainRunFailed(f"torchrun exited {proc.returncode}:\n{tail}")
    return proc.stdout


def run_torchrun(
    config: str | os.PathLike[str],
    overrides: Sequence[str],
    log: str | os.PathLike[str],
    *,
    nproc: int = 2,
    timeout: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
    max_restarts: int = 0,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train under torchrun (``-m dreamddp.train``) and return rank 0's summary record.

    The run's wall time (start-up included) is added as ``wall_s``, its JSONL as ``records``.
    """
    args = ["dreamddp.train", "--config", os.fspath(config), "--set", f"train.log={os.fspath(log)}"]
    for item in overrides:
        args += ["--set", item]
    started = time.perf_counter()
    torchrun(args, nproc=nproc, timeout=timeout, cwd=cwd, max_restarts=max_restarts, env=env)
    summary = read_summary(log)
    summary["wall_s"] = time.perf_counter() - started
    return summary


def read_summary(log: str | os.PathLike[str]) -> dict[str, Any]:
    """Rank 0's summary record of a finished run's JSONL log, with every record as ``records``."""
    try:
        records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
        summary = records[-1]["summary"]
    except (OSError, ValueError, IndexError, KeyError):
        raise TrainRunFailed(f"the run exited without writing a summary to {os.fspath(log)}") from None
    summary["records"] = records
    return summary


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time per iteration (the faster middle one for an even count),
    plus every run's time as ``repeats_iter_s``: how repeated, interleaved runs are reported."""
    ordered = sorted(runs, key=lambda r: r["iter_s"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats_iter_s": [r["iter_s"] for r in runs]}

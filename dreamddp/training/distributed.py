"""Joining the job, and the small collectives through which every rank takes one decision.

Kept apart from the training loop: tools that only need a process group (``dreamddp
profile``) import this, not the trainer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from dreamddp.training.config import ExperimentConfig

__all__ = ["agree", "init_process_group", "rank_zero_value"]

T = TypeVar("T")


def init_process_group(cfg: ExperimentConfig) -> torch.device:
    """Join the torchrun job (or run alone when started without torchrun); this rank's device."""
    backend = cfg.train.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        # SystemExit: every front end that calls this (train, profile) ends with this one line.
        raise SystemExit("dreamddp train: error: train.backend='nccl' needs CUDA, and none is available")
    timeout = timedelta(seconds=cfg.train.timeout_s)
    if "RANK" in os.environ:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE") if not os.environ.get(v)]
        if missing:
            raise ValueError(
                f"environment variable {missing[0]} is not set, but RANK is: start the trainer with "
                "torchrun, or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE together"
            )
        dist.init_process_group(backend, timeout=timeout)
    else:
        # Started as a plain process: a world of one on a private loopback port.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def agree(build: Callable[[], T]) -> T:
    """Run ``build`` on every rank; if it fails anywhere, raise the first rank's error everywhere.

    Start-up checks that only one rank can fail (its port is taken, its checkpoint file is
    missing) must not leave the other ranks waiting in the next collective until the timeout.
    A result built on a rank where all went well is closed (if it can be) before raising.
    """
    result: T | None = None
    problem: str | None = None
    try:
        result = build()
    except ValueError as err:
        problem = str(err)
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    for r, p in enumerate(problems):
        if p is not None:
            close = getattr(result, "close", None)  # any built resource: a metrics server, a file
            if result is not None and callable(close):
                close()
            raise ValueError(p if r == dist.get_rank() else f"rank {r}: {p}")
    return cast(T, result)  # no rank failed, so build() returned it here


def rank_zero_value(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a stop decision all ranks must share)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def rank_zero_object(compute: Callable[[], T]) -> T:
    """Rank 0's ``compute()`` on every rank: computed there only, then broadcast (a decision all
    ranks must share, such as a re-planned schedule). ``compute`` must not raise, or the other
    ranks wait for a broadcast that never comes: catch on rank 0 and return what happened."""
    if not dist.is_initialized():
        return compute()
    box: list[Any] = [compute() if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return cast(T, box[0])

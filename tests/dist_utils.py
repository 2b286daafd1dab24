"""Run a function on N real gloo ranks (spawned processes) with a hard time limit.

Each rank initialises a real process group over a FileStore (no port races), runs the
function, and sends back its result; tensors come back as numpy arrays. A rank that raises
fails the test with its traceback; ranks that hang past ``timeout`` are killed and the test
fails — a hang never blocks the suite.
"""

from __future__ import annotations

import os
import queue
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class WorkerFailed(AssertionError):
    pass


def run_workers(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, backend: str = "gloo"
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo unless told); return their results."""
    ctx = mp.get_context("spawn")
    results: queue.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_entry, args=(fn, rank, world_size, store, results, args, backend), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        out: dict[int, Any] = {}
        try:
            while len(out) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=timeout)
                except queue.Empty:
                    raise WorkerFailed(
                        f"ranks {sorted(set(range(world_size)) - set(out))} did not finish within {timeout}s"
                    ) from None
                if not ok:
                    raise WorkerFailed(f"rank {rank} failed:\n{payload}")
                out[rank] = payload
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
    return [out[r] for r in range(world_size)]


def _entry(fn, rank, world_size, store, results, args, backend) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=f"file://{store}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        value = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, to_plain(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def to_plain(value: Any) -> Any:
    """Tensors to numpy arrays, recursively, so results pickle by value."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return value

"""Fit all-reduce time = alpha + beta * bytes on the live process group.

Messages are issued the way DreamDDP issues them — asynchronous in-place all-reduces,
``repeats`` back to back, then waited for — through the same code path (``BucketAverage``),
over whatever link the group really uses (loopback, a ``tc``-shaped interface, or a
``SimulatedLink``). Each rank times every size; the slowest rank's time is kept (it sets the
pace of a collective), and every rank fits the same line from the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dreamddp.core.collectives import BucketAverage
from dreamddp.emulation.link import SimulatedLink
from dreamddp.planning.profile import CommModel
from dreamddp.validation import is_int, positive_int

__all__ = ["DEFAULT_SIZES", "profile_comm"]

DEFAULT_SIZES = tuple(4**k * 1024 for k in range(1, 7))  # 4 KiB .. 4 MiB


def profile_comm(
    process_group: dist.ProcessGroup | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 5,
    *,
    link: SimulatedLink | None = None,
    device: torch.device | None = None,
    warmup: int = 1,
) -> CommModel:
    """Sweep all-reduce message sizes (bytes) and fit alpha (s) and beta (s/byte)."""
    positive_int("repeats", repeats)
    sizes = list(sizes)
    bad = next((s for s in sizes if not (is_int(s) and s >= 4)), None)
    if bad is not None:
        raise ValueError(f"message sizes must be integers >= 4 bytes, got {bad!r}")
    if len(set(sizes)) < 2:
        raise ValueError(f"profile_comm needs at least two distinct message sizes, got {sizes!r}")
    if not dist.is_initialized():
        raise RuntimeError("profile_comm needs an initialised process group")
    group = process_group if process_group is not None else dist.group.WORLD
    if device is None:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
    seconds = []
    for nbytes in sizes:
        buffers = [torch.zeros(nbytes // 4, dtype=torch.float32, device=device) for _ in range(repeats)]
        for _ in range(warmup):
            BucketAverage([buffers[0]], group).wait()
        dist.barrier(group=group)
        start = time.perf_counter()
        pending = [BucketAverage([b], group, link) for b in buffers]
        for work in pending:
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - start) / repeats)
    slowest = torch.tensor(seconds, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    points = [(nbytes // 4 * 4, float(t)) for nbytes, t in zip(sizes, slowest.tolist())]
    return CommModel.fit(points, link=str(link.spec) if link is not None else "")

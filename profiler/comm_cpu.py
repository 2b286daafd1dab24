"""How much compute an all-reduce in flight takes from forward and backward on the same cores.

The cost model counts a transfer that hides behind compute as free. On a CPU-only site the
network is driven by the cores that compute: gloo's threads copy and reduce, the kernel runs
TCP and the shaper. ``benchmarks/comm_cpu_cost.py`` measured it once on the emulated cluster:
a 4 MB transfer in flight slowed the tiny GPT's forward+backward 1.00-1.03x with tbf's 135 kB
bucket and 1.08-1.57x with a 50 kB one (tbf then segments in software). So the profiler
measures it on the job's own process group, as ``profiler.site_cost`` does for a site's
gradients: forward+backward alone and with one all-reduce of ``nbytes`` launched just before,
interleaved (the order alternating) so that a noisy stretch falls on both, every rank running
the same variant at once (a barrier before each). Only the compute lane is timed; the
transfer is waited for afterwards, untimed. ``nbytes`` should be what the link carries within
one forward+backward, so that all of it is in flight while compute runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dreamddp.validation import non_negative_int, positive_int

__all__ = ["CommCpuCost", "profile_comm_cpu"]

Batch = tuple[Any, Any]


@dataclass(frozen=True)
class CommCpuCost:
    """Median forward+backward of one rank, alone and with ``nbytes`` of all-reduce in flight."""

    alone_s: float
    with_transfer_s: float
    nbytes: int

    @property
    def s_per_byte(self) -> float:
        """Compute taken per byte in flight (never negative: noise is not a speed-up)."""
        return max(0.0, self.with_transfer_s - self.alone_s) / self.nbytes if self.nbytes > 0 else 0.0


def profile_comm_cpu(
    model: torch.nn.Module,
    make_batch: Callable[[int], Batch],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    nbytes: int,
    group: dist.ProcessGroup | None = None,
    iters: int = 8,
    warmup: int = 1,
) -> CommCpuCost:
    """Time ``iters`` interleaved pairs of forward+backward, alone and with a transfer in flight.

    Every rank of ``group`` must call this at the same time. Gradients are left unset.
    """
    positive_int("nbytes", nbytes)
    positive_int("iters", iters)
    non_negative_int("warmup", warmup)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    payload = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for step in range(warmup + iters):
            for with_transfer in (step % 2 == 0, step % 2 == 1):  # alternate which goes first
                inputs, target = make_batch(step)
                model.zero_grad(set_to_none=True)
                dist.barrier(group)
                start = time.perf_counter()
                work = dist.all_reduce(payload, group=group, async_op=True) if with_transfer else None
                loss_fn(model(inputs), target).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - start
                if work is not None:
                    work.wait()
                if step >= warmup:
                    times[with_transfer].append(elapsed)
    finally:
        model.zero_grad(set_to_none=True)
    return CommCpuCost(statistics.median(times[False]), statistics.median(times[True]), payload.numel() * 4)

"""Measure what delta synchronization's payload handling costs in compute, per payload byte.

Per compressor (``none``, ``bf16``, ``int8``): Δ = anchor − w, encoding with error feedback,
decoding the gathered parts and the outer step — everything a ``BucketDelta`` computes besides
the collective itself — timed on ``device`` over one bucket-sized tensor, median of a few runs.
The planner adds it to the channel time of each byte it sends (``dreamddp.planning.compression``):
encoding delays a bucket's launch, decoding delays its landing.
"""

from __future__ import annotations

import statistics
import time

import torch

from dreamddp.core.compress import COMPRESSORS, decode, with_feedback
from dreamddp.core.delta import outer_step

__all__ = ["profile_codecs"]


def profile_codecs(
    device: torch.device | None = None, elements: int = 1 << 20, repeats: int = 5, block: int = 256, world: int = 2
) -> dict[str, float]:
    """Seconds per byte of fp32 payload for each compressor (median over ``repeats``)."""
    device = device or torch.device("cpu")
    g = torch.Generator(device="cpu").manual_seed(0)
    weights = torch.randn(elements, generator=g).to(device)
    anchor = weights + 1e-3 * torch.randn(elements, generator=g).to(device)
    momentum = torch.zeros_like(anchor)
    residual = torch.zeros_like(anchor)
    out: dict[str, float] = {}
    for method in COMPRESSORS:
        samples = []
        for _ in range(repeats + 1):  # the first run warms up allocators and kernels
            _sync(device)
            start = time.perf_counter()
            delta = anchor - weights
            encoded, left = with_feedback(delta, residual if method != "none" else None, method, block)
            if left is not None:
                residual.copy_(left)
            mean = decode(encoded)
            for _ in range(world - 1):  # the other ranks' parts
                mean += decode(encoded)
            step = outer_step(mean, momentum, 0.7, 0.9, True)
            weights.copy_(anchor - step)
            _sync(device)
            samples.append(time.perf_counter() - start)
        out[method] = statistics.median(samples[1:]) / (4 * elements)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

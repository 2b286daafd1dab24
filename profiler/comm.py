"""Fit all-reduce time = alpha + beta * bytes, and the burst after idle, on the live process group.

Messages are issued the way DreamDDP issues them — asynchronous in-place all-reduces,
``repeats`` back to back, then waited for — through the same code path (``BucketAverage``),
over whatever link the group really uses (loopback, a ``tc``-shaped interface, or a
``SimulatedLink``). Each rank times every size; the slowest rank's time is kept (it sets the
pace of a collective), and every rank fits the same line from the same numbers.

A token-bucket shaper (``tc tbf``; many providers' rate limits) passes its bucket at line rate
after the link has idled, and training leaves the link idle between iterations, so the
back-to-back sweep alone prices the first message of every iteration too high (10-16% of an
iteration at 20 Mbit/s). ``burst_probes`` single messages, each after ``idle_s`` of silence,
measure it: the burst is how much sooner they finish than the back-to-back line predicts.
(Two messages issued together do not measure it: gloo runs them concurrently on two threads.)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dreamddp.core.collectives import BucketAverage
from dreamddp.emulation.link import SimulatedLink
from dreamddp.planning.profile import CommModel
from dreamddp.validation import is_int, is_number, non_negative_int, positive_int, require

__all__ = ["DEFAULT_SIZES", "fit_with_burst", "profile_comm"]

DEFAULT_SIZES = tuple(4**k * 1024 for k in range(1, 7))  # 4 KiB .. 4 MiB
# The burst probe's message: large enough that the bucket runs dry within it on the links we
# emulate (135 kB at 20 Mbit/s is 54 ms), small enough that timing noise stays a few ms.
PROBE_MAX_BYTES = 2**20


def profile_comm(
    process_group: dist.ProcessGroup | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 5,
    *,
    link: SimulatedLink | None = None,
    device: torch.device | None = None,
    warmup: int = 1,
    burst_probes: int = 3,
    idle_s: float = 0.25,
) -> CommModel:
    """Sweep all-reduce message sizes (bytes), fit alpha (s) and beta (s/byte), measure the burst.

    ``burst_probes``: 0 skips the burst probe (burst 0). ``idle_s``: silence before every timed
    batch, so each starts with a full bucket, as the fit assumes; a bucket that takes longer
    than this to refill is measured as what refills in ``idle_s``.
    """
    positive_int("repeats", repeats)
    non_negative_int("burst_probes", burst_probes)
    require(is_number(idle_s) and 0 <= idle_s <= 10, "idle_s", "seconds in [0, 10]", idle_s)
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
        _idle(group, idle_s)
        start = time.perf_counter()
        pending = [BucketAverage([b], group, link) for b in buffers]
        for work in pending:
            work.wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append((time.perf_counter() - start) / repeats)
    probe = max((s for s in sizes if s <= PROBE_MAX_BYTES), default=min(sizes))
    singles = _after_idle_seconds(group, probe, burst_probes, idle_s, link, device)
    slowest = torch.tensor([*seconds, *singles], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    times = slowest.tolist()
    points = [(nbytes // 4 * 4, float(t)) for nbytes, t in zip(sizes, times)]
    return fit_with_burst(points, repeats, probe // 4 * 4, times[len(sizes) :], str(link.spec) if link else "")


def fit_with_burst(
    points: Sequence[tuple[int, float]],
    repeats: int,
    probe_bytes: int,
    after_idle_s: Sequence[float],
    link: str = "",
) -> CommModel:
    """The sweep's line, and the burst: how much sooner ``probe_bytes`` finished after idle.

    The probe is compared with the sweep's own point at that size, not with the line (which
    misses single points by more than the burst at 20 Mbit/s): that point is the mean of
    ``repeats`` messages of which only the first had the burst, so ``t_point = t_full -
    burst / repeats`` and ``t_idle = t_full - burst``. Then the line is fitted to the points
    corrected for the burst their batches began with.
    """
    burst = 0.0
    at_probe = [t for b, t in points if b == probe_bytes]
    if after_idle_s and at_probe and repeats >= 2:
        burst = max(0.0, (at_probe[0] - statistics.median(after_idle_s)) * repeats / (repeats - 1))
    elif after_idle_s:  # single-message points all had the burst: read it off the line (approximate)
        for _ in range(4):
            line = CommModel.fit(points, link, burst, repeats)
            burst = max(0.0, statistics.median(line.predict(probe_bytes) - t for t in after_idle_s))
    return CommModel.fit(points, link, burst, repeats)


def _idle(group: dist.ProcessGroup | None, idle_s: float) -> None:
    """Every rank silent for ``idle_s`` after a barrier: the link's bucket refills."""
    dist.barrier(group=group)
    if idle_s > 0:
        time.sleep(idle_s)


def _after_idle_seconds(
    group: dist.ProcessGroup | None,
    nbytes: int,
    probes: int,
    idle_s: float,
    link: SimulatedLink | None,
    device: torch.device,
) -> list[float]:
    """This rank's time for one all-reduce of ``nbytes`` after ``idle_s`` of silence, ``probes`` times."""
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
    seconds = []
    for _ in range(probes):
        _idle(group, idle_s)
        start = time.perf_counter()
        BucketAverage([buffer], group, link).wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds

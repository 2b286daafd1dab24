"""What a site's gradient all-reduce costs an iteration, measured rather than modelled.

Two-level DreamDDP (``dreamddp.core.hierarchy``) all-reduces the gradients inside each site
every iteration, launched from the grad-ready hooks and waited for at the end of backward. The
α–β model of the site's network predicts how much of that transfer sticks out past backward;
it cannot see the other cost: where the site's network is a loopback or a NIC driven by the
same CPU cores that compute (this machine, and any CPU-only site), gloo's threads and the
kernel's copies take cycles from forward and backward. So measure both together: the same
iterations with and without the wrapper's own ``SiteGradients``, interleaved so that a noisy
stretch of the machine falls on both, with every rank of the job running the same variant at
once (a barrier before each), as in a real step. The difference of the medians is the
iteration's true cost of the site's gradients.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dreamddp.core.hierarchy import SiteGradients
from dreamddp.core.units import sync_units
from dreamddp.validation import non_negative_int, positive_int

__all__ = ["SiteGradientCost", "profile_site_gradients"]

Batch = tuple[Any, Any]


@dataclass(frozen=True)
class SiteGradientCost:
    """Median forward+backward time of one rank without and with the site's gradient all-reduce."""

    alone_s: float
    with_site_s: float
    gradient_bytes: int  # what one iteration all-reduced inside the site

    @property
    def extra_s(self) -> float:
        """The iteration time the site's gradients add (never negative: noise is not a speed-up)."""
        return max(0.0, self.with_site_s - self.alone_s)


def profile_site_gradients(
    model: torch.nn.Module,
    make_batch: Callable[[int], Batch],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    group: dist.ProcessGroup,
    iters: int = 10,
    warmup: int = 2,
    cap_bytes: int = 25 * 2**20,
) -> SiteGradientCost:
    """Time ``iters`` interleaved pairs of iterations, plain and with the site's gradient all-reduce.

    Every rank of the job must call this at the same time (it barriers on the default group);
    ``group`` is this rank's site. Gradients are left unset afterwards.
    """
    positive_int("iters", iters)
    non_negative_int("warmup", warmup)
    units = sync_units(model)
    device = next((t.device for u in units for t in u.tensors), torch.device("cpu"))
    gradients = SiteGradients(group, cap_bytes)
    ready = [False] * len(units)
    left = [0] * len(units)
    arrival: list[int] = []
    expected = [sum(1 for p in u.params if p.requires_grad) for u in units]
    reducing = [False]

    def on_grad(i: int) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            left[i] -= 1
            if left[i] == 0:
                ready[i] = True
                arrival.append(i)
                if reducing[0]:
                    gradients.launch_ready(ready)

        return hook

    handles = [
        p.register_post_accumulate_grad_hook(on_grad(i))
        for i, u in enumerate(units)
        for p in u.params
        if p.requires_grad
    ]
    order: Sequence[int] = list(reversed(range(len(units))))  # until one backward has shown the real order
    times: dict[bool, list[float]] = {False: [], True: []}
    bytes_sent = 0
    try:
        for step in range(warmup + iters):
            for with_site in (step % 2 == 0, step % 2 == 1):  # alternate which goes first
                ready[:] = [n == 0 for n in expected]
                left[:] = expected
                arrival.clear()
                reducing[0] = with_site
                if with_site:
                    gradients.start(units, order)
                model.zero_grad(set_to_none=True)
                inputs, target = make_batch(step)
                dist.barrier()
                start = time.perf_counter()
                try:
                    loss_fn(model(inputs), target).backward()
                    if with_site:
                        gradients.launch_ready(ready, force=True)
                        gradients.finish()
                except BaseException:
                    gradients.abandon()
                    raise
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step >= warmup:
                    times[with_site].append(time.perf_counter() - start)
                if with_site:
                    bytes_sent = gradients.bytes_sent
                missing = [i for i in range(len(units)) if not ready[i]]
                order = [*arrival, *missing]
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return SiteGradientCost(statistics.median(times[False]), statistics.median(times[True]), bytes_sent)

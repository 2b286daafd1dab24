"""Collectives shared by DreamDDP and the baselines: asynchronous, bucketed, in-place averages.

Small tensors are coalesced into one flat buffer per bucket (a slow link charges latency per
message, so one call per tensor is latency-bound); a bucket holding a single contiguous
tensor is all-reduced in place with no copy at all. A ``SimulatedLink`` (``dreamddp.emulation``)
may delay every collective like a slow network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dreamddp.core.buckets import pack_in_order
from dreamddp.emulation.link import SimulatedLink, sleep_until

__all__ = ["BucketAverage", "average_op", "average_tensors", "pack_buckets"]


def average_op(group: dist.ProcessGroup | None) -> tuple[dist.ReduceOp.RedOpType, bool]:
    """The reduce op for an average, and whether the caller must still divide by world size.

    NCCL averages natively (and in one rounding for bf16); gloo only sums.
    """
    if dist.get_backend(group) == dist.Backend.NCCL:
        return dist.ReduceOp.AVG, False
    return dist.ReduceOp.SUM, True


def pack_buckets(tensors: Sequence[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """Group consecutive tensors into buckets of at most ``cap_bytes`` (indices into ``tensors``).

    A bucket holds one dtype on one device, so it can be flattened; a tensor larger than the
    cap gets a bucket of its own (and is then reduced in place, with no copy). The packing
    rule is the wrapper's and the planner's (``dreamddp.core.buckets``).
    """
    sizes = [t.numel() * t.element_size() for t in tensors]
    return pack_in_order(sizes, cap_bytes, keys=[(t.dtype, t.device) for t in tensors])


class BucketAverage:
    """One bucket's asynchronous in-place average; ``wait()`` finishes it.

    Launch coalesces the tensors into a flat buffer (or uses the single tensor itself) and
    issues a non-blocking all-reduce; ``wait()`` waits for it (and for the simulated link),
    divides where the backend cannot average, and copies the result back.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        group: dist.ProcessGroup | None,
        link: SimulatedLink | None = None,
        track_done: bool = False,
    ) -> None:
        self.tensors = list(tensors)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self._inplace = len(self.tensors) == 1 and self.tensors[0].is_contiguous()
        if self._inplace:
            self.buffer = self.tensors[0]
        else:
            self.buffer = torch.cat([t.detach().reshape(-1) for t in self.tensors])
        op, self._divide = average_op(group)
        self._world = dist.get_world_size(group)
        self.work = dist.all_reduce(self.buffer, op=op, group=group, async_op=True)
        self.booking = link.book(self.nbytes) if link is not None else None
        self.done_ns: int | None = None  # host time the result became usable (track_done, CPU)
        if link is not None and self.booking is not None:
            link.track(self.work, self.booking)
        if track_done and self.buffer.device.type == "cpu":
            self.work.get_future().add_done_callback(self._mark_done)

    def _mark_done(self, _fut: torch.futures.Future) -> None:
        finished = time.perf_counter_ns()
        if self.booking is None:
            self.done_ns = finished
        else:  # usable at the link's release (which may wait for an earlier collective)
            self.booking.when_released(lambda release: setattr(self, "done_ns", max(finished, int(release * 1e9))))

    def is_ready(self) -> bool:
        """The result may be used now without blocking (the simulated link's release included)."""
        if not self.work.is_completed():
            return False
        if self.booking is None:
            return True
        release = self.booking.release
        return release is not None and time.perf_counter() >= release

    def wait(self) -> None:
        self.work.wait()
        if self.booking is not None:
            sleep_until(self.booking.wait_release())
        if self._divide:
            self.buffer.div_(self._world)
        if not self._inplace:
            offset = 0
            for t in self.tensors:
                n = t.numel()
                t.copy_(self.buffer[offset : offset + n].view_as(t))
                offset += n


def average_tensors(
    tensors: Sequence[torch.Tensor],
    group: dist.ProcessGroup | None = None,
    *,
    cap_bytes: int = 25 * 2**20,
    link: SimulatedLink | None = None,
) -> int:
    """Average ``tensors`` across the group in place, bucketed; blocks. Returns bytes reduced.

    All buckets are issued back to back before any is waited for, so they pipeline on the
    link instead of paying one round trip each.
    """
    pending = [BucketAverage([tensors[i] for i in b], group, link) for b in pack_buckets(tensors, cap_bytes)]
    for bucket in pending:
        bucket.wait()
    return sum(b.nbytes for b in pending)

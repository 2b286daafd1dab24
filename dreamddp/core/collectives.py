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
from dreamddp.emulation.link import Booking, SimulatedLink, sleep_until

__all__ = ["ActiveRanks", "BucketAverage", "BucketSync", "average_op", "average_tensors", "pack_buckets"]


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


class ActiveRanks:
    """Under torch's ``Join``: how many ranks still train this iteration, the divisor of its averages.

    ``work`` is the all-reduce of ones that ``Join.notify_join_context`` launched (ranks that
    have joined add zeros). It is waited for lazily, by the first bucket's ``wait()``, so it
    overlaps backward as torch DDP's forward-pass work handle does. ``work=None``: a count of
    1, for a joined rank shadowing the others' buckets (it discards their results).
    """

    def __init__(self, work: dist.Work | None, booking: Booking | None = None) -> None:
        self.work = work
        self.booking = booking  # the count's own booking on a simulated link
        self._count: int | torch.Tensor | None = None if work is not None else 1

    def count(self) -> int | torch.Tensor:
        """A Python int on the CPU (the division is then the one without ``Join``, bit for bit);
        a device tensor otherwise (no host synchronisation)."""
        if self._count is None:
            assert self.work is not None
            self.work.wait()
            if self.booking is not None:
                sleep_until(self.booking.wait_release())
            total = self.work.get_future().value()[0]
            self._count = int(total.item()) if total.device.type == "cpu" else total
        return self._count


class BucketSync:
    """One bucket's synchronization in flight; ``wait()`` finishes it, writing the synchronized values.

    What every kind shares (plain averages here, delta syncs in ``dreamddp.core.delta``): its
    ``dist.Work``, the simulated link's booking that delays it like a slow network, and, with
    ``track_done``, the host time its result became usable, for ``record_timings``.
    """

    site_bytes = 0  # two-level sync (dreamddp.core.hierarchy): bytes it moves inside the site

    def __init__(
        self, work: dist.Work, nbytes: int, device: torch.device, link: SimulatedLink | None, track_done: bool
    ) -> None:
        self.work = work
        self.nbytes = nbytes  # priced as the all-reduce payload with the same wire traffic
        self.booking = link.book(nbytes) if link is not None else None
        self.done_ns: int | None = None  # host time the result became usable (track_done, CPU)
        if link is not None and self.booking is not None:
            link.track(work, self.booking)
        if track_done and device.type == "cpu":
            work.get_future().add_done_callback(self._mark_done)

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
        raise NotImplementedError

    def wait_wire(self) -> None:
        """Block until the collective is done and the simulated link has released it."""
        self.work.wait()
        if self.booking is not None:
            sleep_until(self.booking.wait_release())


class BucketAverage(BucketSync):
    """One bucket's asynchronous in-place average; ``wait()`` finishes it.

    Launch coalesces the tensors into a flat buffer (or uses the single tensor itself) and
    issues a non-blocking all-reduce; ``wait()`` waits for it (and for the simulated link),
    divides where the backend cannot average, and copies the result back.

    ``divisor`` (torch ``Join`` only): sum, and divide by the ranks still training rather than
    the world size (ranks that joined add zeros); without it nothing changes.
    """

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        group: dist.ProcessGroup | None,
        link: SimulatedLink | None = None,
        track_done: bool = False,
        divisor: ActiveRanks | None = None,
    ) -> None:
        self.tensors = list(tensors)
        self._inplace = len(self.tensors) == 1 and self.tensors[0].is_contiguous()
        if self._inplace:
            self.buffer = self.tensors[0]
        else:
            self.buffer = torch.cat([t.detach().reshape(-1) for t in self.tensors])
        if divisor is None:
            op, self._divide = average_op(group)
        else:  # even with NCCL: its AVG would divide by the world size
            op, self._divide = dist.ReduceOp.SUM, True
        self.divisor = divisor
        self._world = dist.get_world_size(group)
        work = dist.all_reduce(self.buffer, op=op, group=group, async_op=True)
        nbytes = sum(t.numel() * t.element_size() for t in self.tensors)
        super().__init__(work, nbytes, self.buffer.device, link, track_done)

    def wait(self) -> None:
        self.wait_wire()
        if self._divide:
            self.buffer.div_(self._world if self.divisor is None else self.divisor.count())
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

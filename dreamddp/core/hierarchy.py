"""Two-level synchronization: every step inside a site, the layer-wise schedule across sites.

With several ranks per site (``Topology.hierarchical``) a flat ring would cross the WAN at
every site boundary, every one of the S·G replicas would drift on its own with a G-times
smaller batch, and each site's uplink would carry the scheduled bytes G times. Instead:

- **Inside a site** the ranks are one replica: their gradients are averaged every step
  (``SiteGradients``), bucketed in launch order and launched from the same grad-ready hooks
  that launch the cross-site buckets, as torch DDP overlaps its buckets with backward. The
  gradients are waited for at the end of backward — the optimizer needs them — so the ranks
  of a site take the same step on the same weights and stay bitwise identical.
- **Across sites** a scheduled bucket's parameters are averaged *sharded*
  (``BucketSiteAverage``): the rank with local index l all-reduces the l-th of G equal
  shards of the bucket with its peers of index l at the other sites (its ``cross`` group),
  then the site all-gathers the averaged shards. Each site sends the scheduled bytes once.

The all-gather can only start when the cross-site part has finished, which no hook knows in
advance; so it is launched opportunistically — each later grad-ready hook launches the
all-gathers whose cross-site part is complete, strictly in launch order — and at the latest
when the bucket is waited for. It runs on its own group (``Topology.gather``): its launches
do not follow backward's order, and a group's collectives must be issued in the same order by
every member. Everything else (forward overlap, delays, checkpoints) sees an ordinary
``BucketSync`` that writes the synchronized values into its target when waited for.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.grad_mode import _unsafe_preserve_version_counter

from dreamddp.core.buckets import pack_in_order
from dreamddp.core.collectives import BucketSync, average_op, pack_buckets
from dreamddp.core.topology import HIERARCHIES, Topology
from dreamddp.core.units import SyncUnit
from dreamddp.emulation.link import SimulatedLink

__all__ = [
    "BucketSiteAverage",
    "GradBucket",
    "HIERARCHIES",
    "SiteBuffers",
    "SiteGradients",
    "SiteLevel",
    "gradient_buckets",
]

_ONE_BUCKET = 2**62  # buffers are small: one all-reduce per dtype


class BucketSiteAverage(BucketSync):
    """One bucket averaged across sites, sharded over the site's ranks; ``wait()`` writes the average.

    ``nbytes`` is what this rank sends across the WAN: its shard (the site as a whole sends
    the bucket once). The shard is a copy taken at launch, and the all-gather lands in a buffer
    of its own: the target is a view of the flat storage, whose version counter every
    parameter shares, so nothing may write it while backward runs — ``wait()`` copies the
    result in, where landing (or the end of backward) allows it. The cost is one bucket-sized
    buffer per bucket in flight.
    """

    def __init__(
        self, target: torch.Tensor, level: SiteLevel, link: SimulatedLink | None = None, track_done: bool = False
    ) -> None:
        topology = level.topology
        ranks, local = topology.ranks_per_site, topology.local
        self.target, self.level = target, level
        n = target.numel()
        per = -(-n // ranks)
        lo, hi = min(local * per, n), min((local + 1) * per, n)
        self.shard = target.new_zeros(per)
        self.shard[: hi - lo].copy_(target.reshape(-1)[lo:hi])
        op, self._divide = average_op(topology.cross)
        self._sites = topology.sites
        self._gathered = target.new_empty(per * ranks)
        self.site_bytes = per * (ranks - 1) * target.element_size()  # the all-gather, over the site's LAN
        self._gather: dist.Work | None = None
        work = dist.all_reduce(self.shard, op=op, group=topology.cross, async_op=True)
        super().__init__(work, (hi - lo) * target.element_size(), target.device, link, track_done)
        level.queue(self)

    @property
    def gathering(self) -> bool:
        return self._gather is not None

    def start_gather(self) -> None:
        """Finish the cross-site part (blocking if it is not done) and launch the site's all-gather."""
        self.wait_wire()
        if self._divide:
            self.shard.div_(self._sites)
        outputs = list(self._gathered.view(self.level.topology.ranks_per_site, -1).unbind(0))
        self._gather = dist.all_gather(outputs, self.shard, group=self.level.topology.gather, async_op=True)

    def wait(self) -> None:
        self.level.gather_through(self)
        assert self._gather is not None
        self._gather.wait()
        self.target.copy_(self._gathered[: self.target.numel()].view_as(self.target))


@dataclass(frozen=True)
class GradBucket:
    """Gradients all-reduced together inside a site: ``params``, belonging to ``units``."""

    params: tuple[nn.Parameter, ...]
    units: frozenset[int]


def gradient_buckets(units: Sequence[SyncUnit], order: Sequence[int], cap_bytes: int) -> list[GradBucket]:
    """The trainable parameters of ``units`` in launch ``order``, packed within ``cap_bytes`` per
    dtype and device (``pack_in_order``, the rule the planner prices)."""
    items = [(i, p) for i in order for p in units[i].params if p.requires_grad]
    packed = pack_in_order(
        [p.numel() * p.element_size() for _, p in items], cap_bytes, keys=[(p.dtype, p.device) for _, p in items]
    )
    return [GradBucket(tuple(items[k][1] for k in b), frozenset(items[k][0] for k in b)) for b in packed]


class SiteGradients:
    """One backward's gradient buckets inside the site: launched in order as units become ready.

    A parameter whose gradient never arrived (unused this step) contributes zeros and a
    presence flag of 0, both in the same all-reduce: where no rank of the site had a gradient
    it stays ``None`` (as with torch DDP's unused parameters), otherwise it becomes the mean —
    so every rank of the site steps the same parameters the same way.
    """

    def __init__(self, group: dist.ProcessGroup, cap_bytes: int) -> None:
        self.group = group
        self.cap_bytes = cap_bytes
        self.size = dist.get_world_size(group)
        self._plan: list[GradBucket] = []
        self._plan_order: tuple[int, ...] | None = None
        self._next = 0
        self._inflight: list[tuple[GradBucket, torch.Tensor, dist.Work]] = []
        self.bytes_sent = 0  # this backward's

    def plan(self, units: Sequence[SyncUnit], order: Sequence[int]) -> list[GradBucket]:
        """The gradient buckets for launch ``order`` (rebuilt only when the order changes)."""
        if self._plan_order != tuple(order):
            self._plan = gradient_buckets(units, order, self.cap_bytes)
            self._plan_order = tuple(order)
        return self._plan

    def start(self, units: Sequence[SyncUnit], order: Sequence[int]) -> None:
        """A synchronising backward begins: plan its buckets."""
        self.plan(units, order)
        self._next = 0
        self._inflight = []
        self.bytes_sent = 0

    @torch.no_grad()
    def launch_ready(self, ready: Sequence[bool], force: bool = False) -> None:
        """Launch the next buckets while all their units are ready (every one left if ``force``)."""
        while self._next < len(self._plan):
            bucket = self._plan[self._next]
            if not force and not all(ready[u] for u in bucket.units):
                return
            first = bucket.params[0]
            sparse = next((p for p in bucket.params if p.grad is not None and p.grad.is_sparse), None)
            if sparse is not None:
                raise ValueError(
                    f"two-level synchronization averages dense gradients; a parameter of shape {tuple(sparse.shape)} "
                    "has a sparse one (nn.Embedding(sparse=True)?): use dense gradients or hierarchy='flat'"
                )
            parts = [p.grad.reshape(-1) if p.grad is not None else first.new_zeros(p.numel()) for p in bucket.params]
            flags = torch.tensor([p.grad is not None for p in bucket.params], dtype=first.dtype, device=first.device)
            buffer = torch.cat([*parts, flags])
            op, _ = average_op(self.group)
            self._inflight.append((bucket, buffer, dist.all_reduce(buffer, op=op, group=self.group, async_op=True)))
            self.bytes_sent += buffer.numel() * buffer.element_size()
            self._next += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for every bucket and write the site's mean gradients back."""
        _, divide = average_op(self.group)
        try:
            for bucket, buffer, work in self._inflight:
                work.wait()
                if divide:
                    buffer.div_(self.size)
                present = buffer[-len(bucket.params) :].tolist()
                offset = 0
                for p, flag in zip(bucket.params, present, strict=True):
                    n = p.numel()
                    if flag > 0:
                        mean = buffer[offset : offset + n].view_as(p)
                        if p.grad is None:
                            p.grad = mean.clone()
                        else:
                            p.grad.copy_(mean)
                    offset += n
        finally:
            self._inflight = []

    def abandon(self) -> None:
        """A failed backward: wait for what was launched (no collective left dangling), write nothing."""
        try:
            for _, _, work in self._inflight:
                work.wait()
        finally:
            self._inflight = []


@dataclass
class _BufferMean:
    """The site's all-reduce of some floating buffers, launched at the start of backward."""

    buffer: torch.Tensor
    work: dist.Work
    done: bool = False


class SiteBuffers:
    """One backward's floating buffers, averaged inside the site.

    Floating buffers (BatchNorm's running statistics) are updated by each rank's own forward,
    so they are averaged inside the site too: one all-reduce launched when backward starts
    (forward is over), written back unit by unit — a unit's buffers when its cross-site bucket
    launches (its backward is done, as for a flat average), the rest at the end of backward. A
    cross-site shard must hold values every rank of the site shares, or the all-gather would
    stitch different ranks' values together. The writes keep the flat storage's version
    counter (``layout.flats``), as landing's do: autograd would otherwise take them for writes
    to every parameter saved for backward.
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self._means: list[_BufferMean] = []
        self._owned: dict[int, list[tuple[int, torch.Tensor, int]]] = {}  # unit -> (mean, buffer, offset)
        self._flats: tuple[torch.Tensor, ...] = ()
        self.bytes_sent = 0  # this backward's

    @torch.no_grad()
    def start(self, units: Sequence[SyncUnit], order: Sequence[int], flats: Sequence[torch.Tensor]) -> None:
        """Launch the site's average of every floating buffer (forward is over when backward starts)."""
        self._flats = tuple(flats)
        owners = [(i, b) for i in order for b in units[i].buffers]
        self._means, self._owned = [], {}
        op, _ = average_op(self.group)
        for packed in pack_buckets([b for _, b in owners], _ONE_BUCKET):
            buffer = torch.cat([owners[k][1].reshape(-1) for k in packed])
            self._means.append(_BufferMean(buffer, dist.all_reduce(buffer, op=op, group=self.group, async_op=True)))
            offset = 0
            for k in packed:
                unit_id, tensor = owners[k]
                self._owned.setdefault(unit_id, []).append((len(self._means) - 1, tensor, offset))
                offset += tensor.numel()
        self.bytes_sent = sum(m.buffer.numel() * m.buffer.element_size() for m in self._means)

    @torch.no_grad()
    def settle(self, unit_ids: Iterable[int] | None = None) -> None:
        """Write the site's mean buffers of ``unit_ids`` (all left if None), blocking on their all-reduce."""
        chosen = list(self._owned) if unit_ids is None else [u for u in unit_ids if u in self._owned]
        if not chosen:
            return
        _, divide = average_op(self.group)
        with _unsafe_preserve_version_counter(self._flats):
            for unit_id in chosen:
                for index, tensor, offset in self._owned.pop(unit_id):
                    mean = self._means[index]
                    if not mean.done:
                        mean.work.wait()
                        if divide:
                            mean.buffer.div_(self.size)
                        mean.done = True
                    tensor.copy_(mean.buffer[offset : offset + tensor.numel()].view_as(tensor))

    def abandon(self) -> None:
        """A failed backward: wait for the all-reduces, write nothing."""
        try:
            for mean in self._means:
                if not mean.done:
                    mean.work.wait()
        finally:
            self._means, self._owned = [], {}


class SiteLevel:
    """The wrapper's two-level machinery: the topology, the site's gradients, the all-gather queue."""

    def __init__(self, topology: Topology, cap_bytes: int) -> None:
        if not topology.hierarchical:
            raise ValueError(
                f"two-level synchronization needs several sites of several ranks, got {topology.describe()}"
            )
        self.topology = topology
        self.gradients = SiteGradients(topology.intra, cap_bytes)
        self.buffers = SiteBuffers(topology.intra)
        self._waiting: deque[BucketSiteAverage] = deque()  # cross-site part launched, all-gather not yet

    def queue(self, sync: BucketSiteAverage) -> None:
        self._waiting.append(sync)

    def advance(self) -> None:
        """Launch, in order, the all-gathers whose cross-site part has finished; never blocks."""
        while self._waiting and self._waiting[0].is_ready():
            self._waiting.popleft().start_gather()

    def gather_through(self, sync: BucketSiteAverage) -> None:
        """Launch every all-gather up to and including ``sync``'s, in order, blocking where needed."""
        while not sync.gathering:
            self._waiting.popleft().start_gather()

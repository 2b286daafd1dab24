"""The per-backward state machine: grad-ready hooks launch this iteration's buckets in plan order.

The moment a unit's gradients are complete (``register_post_accumulate_grad_hook``) its
weights are no longer read by the rest of backward, so they may be overwritten by their
average while backward goes on with the layers below. Buckets launch strictly in plan
order, each once all its units are ready, so every rank issues the same collectives in the
same order even if its hooks fire in a different order. At the end of backward (an autograd
callback, as torch DDP uses) whatever is left is launched and waited for — or, with forward
overlap, handed to landing. After the first synchronising backward the launch order becomes
the readiness order rank 0 observed, as torch DDP rebuilds its buckets.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Joinable

from dreamddp.core.buckets import Bucket
from dreamddp.core.collectives import ActiveRanks, BucketAverage, BucketSync
from dreamddp.core.delta import BucketDelta, DeltaState
from dreamddp.core.hierarchy import BucketSiteAverage, SiteLevel
from dreamddp.core.join import active_ranks
from dreamddp.core.landing import InFlight, Landing, unit_slices
from dreamddp.core.observer import TimingObserver
from dreamddp.core.state import SyncState
from dreamddp.emulation.link import SimulatedLink

__all__ = ["BackwardReport", "Reducer"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackwardReport:
    """What one synchronising backward sent, handed to whoever keeps the statistics."""

    iteration: int
    phase: int
    bytes_sent: int
    buckets: int
    wait_s: float  # blocked at the end of backward
    site_bytes: int = 0  # two-level: sent inside the site (gradients every step, all-gathers of averages)


class Reducer:
    """Launches each synchronising backward's buckets and finishes (or hands over) their averages."""

    def __init__(
        self,
        state: SyncState,
        landing: Landing,
        group: dist.ProcessGroup,
        *,
        link: SimulatedLink | None,
        overlap: str,
        observer: TimingObserver | None,
        on_finish: Callable[[BackwardReport], None],
        joinable: Callable[[], Joinable | None] = lambda: None,
        delta: DeltaState | None = None,
        site: SiteLevel | None = None,
    ) -> None:
        self.state = state
        self.delta = delta  # sync="delta": buckets send pseudo-gradients and step anchors
        self.site = site  # two-level: gradients averaged inside the site, averages sharded across sites
        self.landing = landing
        self.group = group
        self.link = link
        self.overlap = overlap
        self.observer = observer
        self.on_finish = on_finish
        self.joinable = joinable  # the wrapper, weakly: it tells an enclosing torch Join (join.py)
        self.enabled = True  # False under no_sync(): backward sends nothing and the counter stays
        self.in_backward = False
        self.order_rebuilt = False  # the launch order is rank 0's observed one (or a checkpoint's)
        self._grad_params = [sum(1 for p in u.params if p.requires_grad) for u in state.units]
        # Per backward.
        self._grads_left: list[int] = []
        self._ready: list[bool] = []
        self._observed: list[int] = []
        self._next_bucket = 0
        self._launched: list[InFlight] = []
        self._divisor: ActiveRanks | None = None  # under torch Join: the ranks still training
        self._handles = [
            p.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, u in enumerate(state.units)
            for p in u.params
            if p.requires_grad
        ]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, unit_id: int) -> Callable[[torch.Tensor], None]:
        # A weak reference: a model that outlives its wrapper trains on without communicating,
        # instead of keeping the wrapper alive and all-reducing through a dead process group.
        reducer = weakref.ref(self)

        def hook(_param: torch.Tensor) -> None:
            this = reducer()
            if this is not None:
                this._on_grad_ready(unit_id)

        return hook

    # ------------------------------------------------------------------ one backward
    def _start_backward(self) -> None:
        if self.landing.pending:
            self.landing.land(due_only=True)  # a backward without our forward: nothing due may stay in flight
        self._divisor = active_ranks(self.joinable(), self.link)  # None (and nothing sent) outside Join
        self.in_backward = True
        self._grads_left = list(self._grad_params)
        self._ready = [False] * len(self.state.units)
        self._observed = []
        self._next_bucket = 0
        self._launched = []
        if self.observer is not None:
            self.observer.backward_started()
        if self.site is not None:
            self.site.gradients.start(self.state.units, self.state.order)
            self.site.buffers.start(self.state.units, self.state.order, self.state.layout.flats)
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _on_grad_ready(self, unit_id: int) -> None:
        if not self.enabled:
            return
        if not self.in_backward:
            self._start_backward()
        self._grads_left[unit_id] -= 1
        if self._grads_left[unit_id] == 0:
            if self.observer is not None:
                self.observer.unit_ready(unit_id)
            self._ready[unit_id] = True
            self._observed.append(unit_id)
            self._launch_ready_buckets(force=False)
            if self.site is not None:
                self.site.gradients.launch_ready(self._ready)
                self.site.advance()

    @torch.no_grad()
    def _launch_ready_buckets(self, force: bool) -> None:
        """Launch the plan's next buckets while all their units are ready (all of them if ``force``)."""
        state = self.state
        plan = state.plan()
        while self._next_bucket < len(plan):
            bucket = plan[self._next_bucket]
            if not force and not all(self._ready[i] for i in bucket.units):
                return
            if self.site is not None:
                self.site.buffers.settle(bucket.units)  # what crosses sites (or is snapshotted) is the site's
            view = state.layout.view(bucket.key, bucket.start, bucket.end)
            if self.observer is not None:
                self.observer.bucket_launched()
            delays = {i: state.schedule.delay_of(state.units[i].name) for i in bucket.units}
            if any(delays.values()):
                # The live weights train on while this average is in flight: reduce a copy.
                snapshot, reduced = view.clone(), view.clone()
                average = self._sync(reduced, bucket)
                inflight = InFlight(
                    average,
                    bucket,
                    state.iteration,
                    delays,
                    snapshot,
                    reduced,
                    offsets=unit_slices(bucket, state.layout),
                )
            else:
                inflight = InFlight(self._sync(view, bucket), bucket, state.iteration, delays)
            self._launched.append(inflight)
            self._next_bucket += 1

    def _sync(self, target: torch.Tensor, bucket: Bucket) -> BucketSync:
        """Launch ``bucket``'s collective on ``target``: an average, or a delta sync (``sync="delta"``)."""
        track = self.observer is not None
        if self.delta is not None:
            return BucketDelta(target, bucket, self.delta, self.group, self.link, track_done=track)
        if self.site is not None:
            return BucketSiteAverage(target, self.site, self.link, track_done=track)
        return BucketAverage([target], self.group, self.link, track_done=track, divisor=self._divisor)

    @torch.no_grad()
    def _finish_backward(self) -> None:
        """End of backward: launch what is left (units whose hooks never fired), wait, finish."""
        state, landing = self.state, self.landing
        try:
            self._launch_ready_buckets(force=True)
            start = time.perf_counter()
            site_bytes = 0
            if self.site is not None:  # the optimizer needs the site's mean gradients: always waited for here
                self.site.gradients.launch_ready(self._ready, force=True)
                self.site.gradients.finish()
                self.site.buffers.settle()
                site_bytes = self.site.gradients.bytes_sent + self.site.buffers.bytes_sent
            if self.overlap == "forward" and self.order_rebuilt:
                for inflight in self._launched:
                    landing.add(inflight)
            else:
                # The paper's mode, and the first synchronising backward of forward mode (the bucket
                # order may be rebuilt right after it, which moves the storage under any bucket left in flight).
                for inflight in self._launched:
                    if inflight.delayed:  # reduces its own copy: a re-layout cannot disturb it
                        landing.add(inflight)
                    else:
                        landing.complete(inflight)
            wait_s = time.perf_counter() - start
            if landing.needs_optimizer():
                raise RuntimeError(
                    "DreamDDP(overlap='forward') must hold back the optimizer step of units "
                    "still averaging: call ddp.register_optimizer(optimizer) once"
                )
            launched = [(f.bucket, f.average) for f in self._launched if f.average is not None]
            if self.observer is not None:
                names = [u.name for u in state.units]
                self.observer.backward_finished(state.iteration, state.phase, names, launched)
            sent = sum(average.nbytes for _, average in launched)
            site_bytes += sum(average.site_bytes for _, average in launched)
            self.on_finish(BackwardReport(state.iteration, state.phase, sent, len(launched), wait_s, site_bytes))
            state.iteration += 1
            if not self.order_rebuilt:
                self.order_rebuilt = True
                self._rebuild_order_from_rank0()
        finally:
            self.in_backward = False
            self._launched = []

    @torch.no_grad()
    def abandon(self) -> None:
        """A backward raised before its end callback ran: drain what it launched, count nothing.

        Every rank that launched a bucket waits for it, so no collective is left dangling;
        the iteration counter is not advanced, so the failed iteration is simply retried.
        """
        try:
            if self.site is not None:
                self.site.gradients.abandon()
                self.site.buffers.abandon()
            for inflight in self._launched:
                if inflight.average is not None:
                    inflight.average.wait()
        finally:
            self.in_backward = False
            self._launched = []

    def _rebuild_order_from_rank0(self) -> None:
        """Adopt rank 0's observed readiness order so buckets launch as early as they can."""
        observed = list(dict.fromkeys(self._observed))
        seen = set(observed)
        order = observed + [i for i in self.state.order if i not in seen]
        device = torch.device("cpu")
        if dist.get_backend(self.group) == dist.Backend.NCCL:
            device = torch.device("cuda", torch.cuda.current_device())
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        dist.broadcast(order_t, src=dist.get_global_rank(self.group, 0), group=self.group)
        new_order = order_t.tolist()
        if new_order != self.state.order:
            logger.debug("launch order rebuilt from rank 0's backward: %s", new_order)
            self.state.lay_out(new_order)

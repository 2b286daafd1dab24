"""DreamDDP: partial local SGD with parameter averaging overlapped with backward.

In iteration t (h = t mod period) the units the schedule assigns to h have their parameter
*data* averaged across ranks, in place, by asynchronous all-reduces launched from
``register_post_accumulate_grad_hook`` — the moment a unit's gradients are complete its
weights are no longer read by the rest of backward, so they can be overwritten while backward
goes on with the layers below. At the end of backward (an autograd callback, as torch DDP
uses) the wrapper launches whatever is left, waits for all of it and finishes the averages.
When ``loss.backward()`` returns the scheduled units are identical on every rank, and the
user's ``optimizer.step()`` applies the *local* gradient: w <- mean(w) - lr * g_local.
Gradients are never averaged; optimizer state stays local.

Buckets are fixed per iteration of the period and launched strictly in order, so every rank
issues the same collectives in the same order even if its hooks fire in a different order.
The order is first the reverse of registration order, then — after the first synchronising
backward, as torch DDP does — the readiness order rank 0 actually observed.

This module is the facade: argument checks, wiring and the public API. The parts, as torch
DDP separates bucket assignment, the Reducer and comm hooks:

- ``buckets``: the pure bucket plan, shared with the planner's cost model;
- ``state``: the units laid out flat in launch order, the schedule, the iteration, the plans;
- ``agreement``: the collective check that every rank wraps the same model and schedule;
- ``reducer``: grad-ready hooks, launching buckets, the end-of-backward callback;
- ``landing``: averages that outlive their backward (forward overlap, delays), held-back steps;
- ``observer``: ``record_timings``;
- ``join``: torch's ``Join([ddp])`` for uneven inputs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Joinable, JoinHook

from dreamddp.core.agreement import check_agreement
from dreamddp.core.collectives import BucketAverage
from dreamddp.core.compress import check_world
from dreamddp.core.delta import DeltaState
from dreamddp.core.extra_state import export_extra_state, restore_extra_state
from dreamddp.core.forward_reads import FORWARDS_CHECKED, ForwardReads
from dreamddp.core.hierarchy import BucketSiteAverage, SiteLevel
from dreamddp.core.join import DreamDDPJoinHook, join_device
from dreamddp.core.landing import Landing
from dreamddp.core.observer import TIMINGS_KEPT, TimingObserver
from dreamddp.core.reducer import BackwardReport, Reducer
from dreamddp.core.schedule import OVERLAPS, Schedule
from dreamddp.core.state import SyncState, initial_order
from dreamddp.core.sync_options import SyncOptions
from dreamddp.core.timing import ObservedIteration
from dreamddp.core.topology import HIERARCHIES, Topology, discover
from dreamddp.core.units import SyncUnit, sync_units
from dreamddp.emulation.link import SimulatedLink
from dreamddp.validation import positive_number

__all__ = ["DreamDDP", "IterationStats", "TIMINGS_KEPT"]


@dataclass
class IterationStats:
    """What one synchronising backward pass communicated, and how long it waited."""

    iteration: int = 0
    phase: int = 0  # h = iteration mod period
    units: list[str] = field(default_factory=list)
    bytes_sent: int = 0  # payload bytes all-reduced by this rank (two-level: across sites, its shard)
    site_bytes_sent: int = 0  # two-level: bytes moved inside the site (gradients, all-gathers)
    buckets: int = 0
    wait_s: float = 0.0  # host time blocked on communication: end of backward + forward stalls
    backward_wait_s: float = 0.0  # blocked at the end of backward (the paper's mode)
    forward_stall_s: float = 0.0  # blocked before units' forward (overlap="forward")
    forward_events: list[tuple[str, str, int, int]] = field(default_factory=list)  # (kind, units, start_ns, end_ns)
    snapshot_bytes: int = 0  # extra memory held for delayed averages after this backward
    sync_state_bytes: int = 0  # sync="delta": anchors, outer momentum and residuals held

    @classmethod
    def of(
        cls,
        report: BackwardReport,
        schedule: Schedule,
        stall_s: float,
        events: list[tuple[str, str, int, int]],
        snapshot_bytes: int,
        sync_state_bytes: int = 0,
    ) -> IterationStats:
        """The statistics of the backward ``report`` describes, with the forward stalls before it."""
        return cls(
            iteration=report.iteration,
            phase=report.phase,
            units=schedule.units_at(report.phase),
            bytes_sent=report.bytes_sent,
            site_bytes_sent=report.site_bytes,
            buckets=report.buckets,
            wait_s=report.wait_s + stall_s,
            backward_wait_s=report.wait_s,
            forward_stall_s=stall_s,
            forward_events=events,
            snapshot_bytes=snapshot_bytes,
            sync_state_bytes=sync_state_bytes,
        )


class DreamDDP(nn.Module, Joinable):
    """Wrap ``module`` so that ``backward()`` averages the scheduled units' parameters.

    Args:
        module: the model, already on its device.
        schedule: which units to average in which iteration of the period; must name every
            unit of ``sync_units(module)`` and nothing else.
        process_group: the data-parallel group (default: the world).
        bucket_cap_mb: largest coalesced all-reduce; small units are packed together.
        link: optional ``SimulatedLink`` that delays every collective like a slow network.
        broadcast_from_rank0: start every rank from rank 0's parameters and buffers.
        record_timings: keep, per synchronising iteration, when each unit's gradients became
            ready and when each bucket's all-reduce was launched and finished (read with
            ``observed_timings()``; the profiler refreshes a Profile from them). Off by default;
            when on, hooks only take timestamps — nothing waits for the device.
        overlap: ``"backward"`` (the paper, default): every average launched in backward is
            waited for when backward ends. ``"forward"``: it is not; a unit's optimizer step is
            held back until its average lands, at the latest just before the unit's forward in
            the next iteration, so communication also hides behind the optimizer step and the
            next forward. Needs ``register_optimizer(optimizer)``. Also enables the schedule's
            ``delays``. None: what the schedule was planned for (``schedule.overlap``).
        sync: ``"average"`` (the paper, default): a scheduled unit's weights become their mean.
            ``"delta"`` or a ``SyncOptions``: each unit keeps an anchor; its mean pseudo-gradient
            (anchor − weights, optionally compressed with error feedback) steps the anchor
            through an outer optimizer (DiLoCo's Nesterov, per unit), and the weights become the
            new anchor. Same hooks, same overlap, same schedule (``dreamddp.core.sync_options``).
        hierarchy: ``"flat"`` (default): every rank is its own replica on one group.
            ``"hierarchical"``: ranks are grouped in sites (``dreamddp.core.topology``: one per
            node by default, ``ranks_per_site`` or ``DREAMDDP_SITE`` to override); inside a site
            gradients are averaged every step, so its ranks are one replica, and the schedule's
            averages cross sites sharded, each site sending the scheduled bytes once
            (``dreamddp.core.hierarchy``). ``"auto"``: hierarchical when there are several sites
            of several ranks, else flat. Collective, and every rank must pass the same value.
        ranks_per_site: consecutive ranks per site, when the environment does not say.
    """

    def __init__(
        self,
        module: nn.Module,
        schedule: Schedule,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        *,
        link: SimulatedLink | None = None,
        broadcast_from_rank0: bool = True,
        record_timings: bool = False,
        overlap: str | None = None,
        sync: str | SyncOptions = "average",
        hierarchy: str = "flat",
        ranks_per_site: int | None = None,
    ) -> None:
        super().__init__()
        Joinable.__init__(self)  # torch's Join([ddp]) for uneven inputs (dreamddp.core.join)
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a dreamddp.Schedule, got {type(schedule).__name__}")
        overlap = schedule.overlap if overlap is None else overlap
        if overlap not in OVERLAPS:
            raise ValueError(f"overlap must be one of {', '.join(OVERLAPS)}, got {overlap!r}")
        if schedule.delays and overlap != "forward":
            raise ValueError(
                f"the schedule delays {len(schedule.delays)} units, which needs overlap='forward', got {overlap!r}"
            )
        positive_number("bucket_cap_mb", bucket_cap_mb)
        if hierarchy not in HIERARCHIES:
            raise ValueError(f"hierarchy must be one of {', '.join(HIERARCHIES)}, got {hierarchy!r}")
        if ranks_per_site is not None and (
            isinstance(ranks_per_site, bool) or not isinstance(ranks_per_site, int) or ranks_per_site < 1
        ):
            raise ValueError(f"ranks_per_site must be a positive integer, got {ranks_per_site!r}")
        self.sync = SyncOptions.of(sync)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DreamDDP needs an initialised process group: call torch.distributed.init_process_group() first"
            )
        self.module = module
        self.process_group = _group_or_world(process_group)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.link = link
        self.overlap = overlap
        if self.sync.delta:
            check_world(self.sync.compress, dist.get_world_size(self.process_group))
        units = sync_units(module)
        hierarchy_claim = hierarchy if ranks_per_site is None else f"{hierarchy}, ranks_per_site={ranks_per_site}"
        check_agreement(
            units, schedule, self.process_group, overlap, sync=self.sync.describe(), hierarchy=hierarchy_claim
        )
        self.topology: Topology | None = None  # two-level only
        self._site = None
        if hierarchy != "flat":
            topology = discover(self.process_group, ranks_per_site)
            if topology.hierarchical:
                if self.sync.delta:
                    raise ValueError(
                        f"sync='delta' with two-level synchronization ({topology.describe()}) is not supported yet: "
                        "use hierarchy='flat' or sync='average'"
                    )
                self.topology, self._site = topology, SiteLevel(topology, self.bucket_cap_bytes)
            elif hierarchy == "hierarchical":
                raise ValueError(
                    f"hierarchy='hierarchical' needs several sites of several ranks, found {topology.describe()}; "
                    "use hierarchy='auto' or 'flat', or set ranks_per_site / DREAMDDP_SITE"
                )
        self._state = SyncState(module, schedule, self.bucket_cap_bytes, initial_order(units))
        if broadcast_from_rank0:
            src = dist.get_global_rank(self.process_group, 0)
            for chunk in self._state.chunks():
                dist.broadcast(chunk, src=src, group=self.process_group)
        self._delta = None
        if self.sync.delta:
            self._delta = DeltaState(self._state, self.sync, self.process_group, weights_equal=broadcast_from_rank0)
        self.last_stats = IterationStats(sync_state_bytes=self.sync_state_bytes)
        self.total_bytes_sent = 0
        self._observer: TimingObserver | None = None
        if record_timings:
            self._observer = TimingObserver(next((t.device for u in units for t in u.tensors), torch.device("cpu")))
        self._landing = Landing(self._state, forward=overlap == "forward")
        wrapper = weakref.ref(self)  # the reducer must not keep the wrapper (and its process group) alive

        def finished(report: BackwardReport) -> None:
            this = wrapper()
            if this is not None:
                this._finished(report)

        self._reducer = Reducer(
            self._state,
            self._landing,
            self.process_group,
            link=link,
            overlap=overlap,
            observer=self._observer,
            on_finish=finished,
            joinable=wrapper,
            delta=self._delta,
            site=self._site,
        )

    # ------------------------------------------------------------------ API
    _reads_to_check = FORWARDS_CHECKED  # overlap="forward": training forwards left to check (forward_reads)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.prepare_forward()
        if self._reads_to_check and self.overlap == "forward" and torch.is_grad_enabled():
            self._reads_to_check -= 1  # a structural check: after the first forwards, no mode and no hooks
            with ForwardReads(self._state):
                output = self.module(*args, **kwargs)
        else:
            output = self.module(*args, **kwargs)
        if self._landing.pending:
            # Units this forward did not run are due too.
            self._landing.land(due_only=True)
        if self._observer is not None and self._reducer.enabled:
            self._observer.forward_returned()
        return output

    def prepare_forward(self) -> None:
        """What must happen before each forward; for integrations that call ``self.module`` themselves.

        Drains a backward that raised half-way (so no collective is left dangling) and lays
        the storage out again if something moved it.
        """
        if self._reducer.in_backward:
            self._reducer.abandon()
        if not self._state.layout.intact():
            self.flush()
            self._state.lay_out()  # something (model.to(), load_state_dict(assign=True)) moved the storage

    def join_hook(self, **kwargs: Any) -> JoinHook:  # with Join([ddp]): see dreamddp.core.join
        if self._delta is not None:  # a joined rank would miss anchor updates: anchors must stay equal
            raise ValueError(
                "Join([ddp]) with sync='delta' is not supported: a rank that runs out of data would miss "
                "the anchor updates every rank must share; give every rank the same number of batches"
            )
        if self._site is not None:
            raise ValueError(
                "Join([ddp]) with two-level synchronization is not supported: a rank that runs out of data would "
                "stall its site's per-step gradient average; give every rank the same number of batches"
            )
        return DreamDDPJoinHook(self, **kwargs)

    @property
    def join_device(self) -> torch.device:
        return join_device(self.process_group)

    @property
    def join_process_group(self) -> dist.ProcessGroup:
        return self.process_group

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let ``overlap="forward"`` hold back this optimizer's step for units still averaging.

        Register every optimizer that steps the model's parameters, once, on every rank.
        Harmless (and unused) with ``overlap="backward"``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"register_optimizer() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._landing.deferred.register(optimizer)

    @torch.no_grad()
    def flush(self, delayed: bool = True) -> None:
        """Land every average still in flight and apply the steps held back for it.

        Needed before anything reads all the weights (evaluation, checkpoints, ``average_all``);
        changes nothing in the arithmetic of undelayed units. ``delayed=False`` leaves delayed
        averages in flight until they are due (their correction time is part of the
        trajectory); those due at the next forward land now, as they would there — so a
        forward that is not training's (evaluation) never lands one onto weights it restores.
        """
        if self._reducer.in_backward:
            raise RuntimeError("flush() cannot be called during backward")
        self._landing.land(due_only=False, delayed=delayed)

    @property
    def units(self) -> list[SyncUnit]:
        """The model's sync units (registration order), their tensors now in the flat storage."""
        return self._state.units

    @property
    def snapshot_bytes(self) -> int:
        """Extra memory now held for delayed averages (snapshot + reduction buffer)."""
        return self._landing.snapshot_bytes

    @property
    def sync_state_bytes(self) -> int:
        """Extra memory held by ``sync="delta"`` (anchors, outer momentum, residuals); 0 when averaging."""
        return self._delta.nbytes if self._delta is not None else 0

    @property
    def schedule(self) -> Schedule:
        return self._state.schedule

    @property
    def iteration(self) -> int:
        """Synchronising backward passes so far; this backward uses phase ``(iteration - period_origin) % period``."""
        return self._state.iteration

    @property
    def period_origin(self) -> int:
        """The iteration the current period length started at: 0, or where ``set_schedule`` changed H."""
        return self._state.origin

    @property
    def phase(self) -> int:
        return self._state.phase

    def set_schedule(self, schedule: Schedule) -> None:
        """Switch schedules between iterations (call on every rank at the same iteration).

        A schedule of the same period continues the current period's phase; one of another
        period starts its first period at this iteration (switch at a period boundary, where
        every unit of the old schedule has just been averaged).
        """
        if self._reducer.in_backward:
            raise RuntimeError("set_schedule() cannot be called during backward")
        schedule.check_units([u.name for u in self.units])
        if schedule.delays and self.overlap != "forward":
            raise ValueError("a schedule with delays needs overlap='forward'")
        self.flush()
        self._state.set_schedule(schedule)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient-accumulation micro-steps: backward sends nothing and the counter stays."""
        previous = self._reducer.enabled
        self._reducer.enabled = False
        try:
            yield
        finally:
            self._reducer.enabled = previous

    @torch.no_grad()
    def average_all(self) -> None:
        """Average every unit now (before evaluation, checkpoints, the end of training)."""
        if self._reducer.in_backward:
            raise RuntimeError("average_all() cannot be called during backward")
        self.flush()
        if not self._state.layout.intact():
            self._state.lay_out()
        pending: list[BucketAverage | BucketSiteAverage] = [
            BucketAverage([chunk], self.process_group, self.link)
            if self._site is None
            else BucketSiteAverage(chunk, self._site, self.link)
            for chunk in self._state.chunks()
        ]
        for bucket in pending:
            bucket.wait()
        self.total_bytes_sent += sum(b.nbytes for b in pending)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.flush(delayed=False)  # undelayed averages land (arithmetic unchanged); delayed ones are saved
        return super().state_dict(*args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return export_extra_state(self._state, self._landing, self._delta, self._sites)

    def set_extra_state(self, state: Any) -> None:
        restore_extra_state(state, self._state, self._landing, self._reducer, self._delta, self._sites)

    def observed_timings(self) -> list[ObservedIteration]:
        """What the last (up to TIMINGS_KEPT) synchronising iterations really did, in seconds.

        Converting CUDA events needs one device synchronisation, done here, once, not in hooks.
        """
        return self._observer.observed(self._state.iteration) if self._observer is not None else []

    def remove_hooks(self) -> None:
        """Detach from the model; it trains as a plain module afterwards."""
        if not self._reducer.in_backward:
            self.flush()
        self._reducer.remove_hooks()
        self._landing.remove_hooks()

    # ---------------------------------------------------------------- wiring
    @property
    def _sites(self) -> str | None:
        return self.topology.describe() if self.topology is not None else None

    def _finished(self, report: BackwardReport) -> None:
        """The reducer finished a synchronising backward: keep its statistics."""
        stall_s, events = self._landing.take_stalls()
        self.last_stats = IterationStats.of(
            report, self._state.schedule, stall_s, events, self._landing.snapshot_bytes, self.sync_state_bytes
        )
        self.total_bytes_sent += report.bytes_sent


def _group_or_world(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """The given group, or the world's (which exists once the process group is initialised)."""
    if group is not None:
        return group
    world = dist.group.WORLD
    if world is None:
        raise RuntimeError("DreamDDP needs an initialised process group (torch.distributed has no WORLD group)")
    return world

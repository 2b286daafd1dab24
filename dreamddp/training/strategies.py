"""The training algorithms, each as a small strategy the one training loop drives.

Every strategy wraps the model, builds or wraps the optimizer, reports after each iteration
what it communicated (``stats()``), says which averaging period H it runs (``period``), and
makes the ranks' models equal at the end. The loop itself (``trainer.py``) is the same for all
of them, so their timings differ only by what each algorithm communicates and when; and it
never looks inside a strategy, so a wrapper's internals can change without touching it.

- ``none``: no communication at all — the compute-only reference for "how much was hidden".
- ``ssgd``: torch ``DistributedDataParallel`` (gradient all-reduce overlapped with backward).
- ``local_sgd``: every parameter averaged every H iterations after the step, bucketed.
- ``post_local_sgd``: torch's ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``.
- ``hier_local_sgd``: torch's two-level recipe: gradients every step inside a site (DDP's
  ``post_localSGD_hook`` on the site's subgroup), ``HierarchicalModelAverager`` every H.
- ``plsgd``: DreamDDP with H contiguous groups of about equal bytes (no profile).
- ``dreamddp``: DreamDDP with a schedule file (the scheduler's output), else PLSGD's groups.

Frozen parameters (``requires_grad=False``, e.g. a LoRA base model) are never communicated and
never given to an optimizer: every algorithm averages, or all-reduces the gradients of, the
trainable parameters (and floating buffers) only — ``sync_units`` for the local methods, torch
DDP's own rule for ``ssgd``, the optimizer's parameters for torch's PostLocalSGD averager.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.algorithms.model_averaging.hierarchical_model_averager import HierarchicalModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from dreamddp.core.agreement import check_frozen
from dreamddp.core.collectives import average_tensors
from dreamddp.core.ddp import DreamDDP
from dreamddp.core.schedule import SCHEDULE_FORMAT, Schedule
from dreamddp.core.timing import ObservedIteration
from dreamddp.core.topology import discover
from dreamddp.core.units import sync_units
from dreamddp.emulation.link import SimulatedLink, sleep_until
from dreamddp.training.config import TrainConfig
from dreamddp.training.link_hooks import linked_allreduce_hook, linked_post_local_sgd_hook

__all__ = [
    "SCHEDULED",
    "CommStats",
    "Strategy",
    "build_lr_scheduler",
    "build_optimizer",
    "build_strategy",
    "trainable_parameters",
]


@dataclass(frozen=True)
class CommStats:
    """What one iteration communicated, in the terms the trainer reports (log, metrics, trace)."""

    wait_s: float | None  # exposed: host time blocked on communication this iteration (None: not observable)
    bytes_sent: int
    units_synced: int = 0  # sync units whose parameters (or gradients) were averaged
    hidden_s: float | None = None  # communication that overlapped compute; only filled when asked (see stats())
    backward_wait_s: float = 0.0  # the part of the wait spent at the end of backward
    after_step_wait_s: float = 0.0  # the part spent in after_step, after the optimizer step
    forward_events: list[tuple[str, str, int, int]] = field(default_factory=list)  # overlap="forward" stalls


def _after_step_comm(wait_s: float | None, bytes_sent: int, units_synced: int = 0) -> CommStats:
    """Stats of a strategy whose communication (if any) blocks after the optimizer step."""
    return CommStats(wait_s, bytes_sent, units_synced, after_step_wait_s=wait_s or 0.0)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer steps and an algorithm communicates: those with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_lr_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Linear warm-up then constant or cosine-to-zero; None when the LR never changes."""
    if cfg.lr_schedule == "constant" and not cfg.lr_warmup:
        return None
    warmup, total, cosine = cfg.lr_warmup, cfg.steps, cfg.lr_schedule == "cosine"

    def factor(step: int) -> float:
        scale = min(1.0, (step + 1) / (warmup + 1)) if warmup else 1.0
        if cosine:
            scale *= 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Strategy:
    """Base: no communication. Subclasses override what they change."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        self.raw_model = model
        self.cfg = cfg
        self.link = link
        self.model: nn.Module = model
        self.optimizer: torch.optim.Optimizer = build_optimizer(cfg, trainable_parameters(model))
        self.note = ""  # anything the run should report about how this strategy was set up
        self.n_units = len(sync_units(model))
        self._last = _after_step_comm(0.0, 0)

    @property
    def period(self) -> int:
        """H, the averaging period this strategy really runs (phases in the trace, the summary)."""
        return self.cfg.period_h

    def phase_of(self, step: int) -> int:
        """The iteration of the period that ``step`` (just run) was."""
        return step % max(self.period, 1)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """This rank's model, optimizer and algorithm state (rank-local under local SGD)."""
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "strategy": {}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def schedule_record(self) -> dict[str, Any] | None:
        """What must match for a checkpoint of this run to be resumed exactly."""
        return {"period": self.cfg.period_h}

    @property
    def schedule_in_state(self) -> bool:
        """Whether the schedule is state (re-planned while running: restored from a checkpoint)
        rather than identity (fixed by the config: a checkpoint must match it)."""
        return False

    # ------------------------------------------------------------ iterations
    def after_step(self, step: int) -> None:
        """Communicate after the optimizer step, if this algorithm does; ``stats()`` then reports it."""
        self._last = _after_step_comm(0.0, 0)

    def stats(self, with_hidden: bool = False) -> CommStats:
        """What the last iteration communicated.

        ``with_hidden`` also measures the communication hidden behind compute. Opt-in because
        for DreamDDP it reads the hooks' timings, which costs a device synchronisation on CUDA:
        only the metrics endpoint asks, not every run.
        """
        return replace(self._last, hidden_s=self._hidden_comm_s()) if with_hidden else self._last

    def _hidden_comm_s(self) -> float | None:
        # Communication after the step blocks the host: none of it is hidden (when it is observable at all).
        return 0.0 if self._last.wait_s is not None else None

    def observed_timings(self) -> list[ObservedIteration]:
        """Per-bucket hook timings of recent iterations, for the trace (none unless DreamDDP records them)."""
        return []

    def flush(self) -> None:
        """Land communication still in flight before something reads every weight (evaluation)."""

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """A gradient-accumulation micro-step: a backward that communicates nothing (DDP's when wrapped)."""
        return _ddp_no_sync(self.model)

    def finish(self) -> None:
        """Make every rank's model equal (not part of the timed iterations)."""
        average_tensors([t for u in sync_units(self.raw_model) for t in u.tensors])

    def close(self) -> None:
        pass


def _ddp_no_sync(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """torch DDP's own ``no_sync`` for a DDP-wrapped model, else nothing to suppress."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


class NoCommunication(Strategy):
    pass


class SSGD(Strategy):
    """torch DDP as users run it; the simulated link, if any, delays its bucket futures."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        super().__init__(model, cfg, link)
        self.model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
        if link is not None:
            self.model.register_comm_hook(link, linked_allreduce_hook)
        self.optimizer = build_optimizer(cfg, trainable_parameters(self.model))
        self._grad_bytes = sum(p.numel() * p.element_size() for p in trainable_parameters(model))

    def after_step(self, step: int) -> None:
        # The all-reduce ran inside backward, where torch DDP does not say how long it blocked.
        self._last = _after_step_comm(None, self._grad_bytes, self.n_units)

    def schedule_record(self) -> dict[str, Any] | None:
        return None

    def finish(self) -> None:
        pass  # DDP keeps the replicas equal

    def close(self) -> None:
        # Tear DDP down before the process group goes (an occasional SIGABRT at exit otherwise).
        del self.model
        self.model = self.raw_model


class LocalSGD(Strategy):
    """Every trainable parameter and floating buffer averaged every H iterations after the step (bucketed)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        super().__init__(model, cfg, link)
        check_frozen(sync_units(model))  # never averaged: every rank must start with the same ones

    def after_step(self, step: int) -> None:
        if (step + 1) % self.cfg.period_h:
            self._last = _after_step_comm(0.0, 0)
            return
        start = time.perf_counter()
        sent = average_tensors(
            [t for u in sync_units(self.raw_model) for t in u.tensors],
            cap_bytes=int(self.cfg.bucket_cap_mb * 2**20),
            link=self.link,
        )
        self._last = _after_step_comm(time.perf_counter() - start, sent, self.n_units)


class _PaysLink:
    """Mixin for torch's model averagers: when one averages (``_due``), it also pays the simulated link."""

    def __init__(self, link: SimulatedLink | None, nbytes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.link, self.nbytes = link, nbytes
        self.averaged_last = False

    def _due(self) -> bool:
        raise NotImplementedError

    def average_parameters(self, params) -> None:
        due = self._due()
        booking = self.link.book(self.nbytes) if due and self.link is not None else None
        super().average_parameters(params)  # type: ignore[misc]
        if self.link is not None and booking is not None:
            sleep_until(self.link.complete(booking))
        self.averaged_last = due


class _LinkedAverager(_PaysLink, PeriodicModelAverager):
    """torch's PeriodicModelAverager, paying the simulated link when it averages."""

    def _due(self) -> bool:
        return self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0


class PostLocalSGD(Strategy):
    """torch's PostLocalSGD: DDP for ``post_local_warmup`` iterations, then periodic averaging."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        super().__init__(model, cfg, link)
        self.model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
        subgroup = self._gradient_subgroup()
        state = PostLocalSGDState(
            process_group=None,
            subgroup=subgroup,
            start_localSGD_iter=cfg.post_local_warmup,
            # pure local SGD after warm-up; or, in a site's subgroup, its gradients every step
            post_local_gradient_allreduce=subgroup is not None,
        )
        self._state = state
        if link is None or subgroup is not None:  # a site's gradients stay on its LAN: not the simulated WAN
            self.model.register_comm_hook(state, post_localSGD_hook)
        else:
            self.model.register_comm_hook((state, link), linked_post_local_sgd_hook)
        # The averager averages the optimizer's parameters: only the trainable ones (DDP has made
        # the frozen ones equal at construction, and they never change).
        trainable = trainable_parameters(model)
        self._param_bytes = sum(p.numel() * p.element_size() for p in trainable)
        self.averager = self._make_averager(link)
        self._post_local = PostLocalSGDOptimizer(optim=build_optimizer(cfg, trainable), averager=self.averager)
        self.optimizer = self._post_local

    def _gradient_subgroup(self) -> dist.ProcessGroup | None:
        """Where gradients are all-reduced after warm-up: nowhere (pure local SGD)."""
        return None

    def _make_averager(self, link: SimulatedLink | None) -> _LinkedAverager | _LinkedHierarchicalAverager:
        return _LinkedAverager(
            link, self._param_bytes, period=self.cfg.period_h, warmup_steps=self.cfg.post_local_warmup
        )

    def after_step(self, step: int) -> None:
        sent = self._param_bytes if self.averager.averaged_last else 0
        if step < self.cfg.post_local_warmup:
            sent += self._param_bytes  # gradient all-reduce during warm-up
        self._last = _after_step_comm(None, sent, self.n_units if sent else 0)

    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()  # the optimizer's state carries the averager's step
        state["strategy"] = {"local_sgd_iter": self._state.iter}
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        # torch's PostLocalSGDOptimizer keeps a reference to the inner optimizer's param_groups
        # list, which the inner load_state_dict replaces: without this, an LR scheduler would
        # set the learning rate on stale groups and the resumed run would train at a frozen LR.
        self._post_local.param_groups = self._post_local.optim.param_groups
        self._state.iter = int(state["strategy"]["local_sgd_iter"])

    def schedule_record(self) -> dict[str, Any] | None:
        return {"period": self.cfg.period_h, "warmup": self.cfg.post_local_warmup}

    def close(self) -> None:
        del self.model
        self.model = self.raw_model


class _LinkedHierarchicalAverager(_PaysLink, HierarchicalModelAverager):
    """torch's HierarchicalModelAverager, paying the simulated link when it averages across all ranks."""

    def _due(self) -> bool:
        return self.step >= self.warmup_steps and self._find_process_group() is not None


class HierarchicalLocalSGD(PostLocalSGD):
    """torch's two-level recipe, the peer of two-level DreamDDP (``hier_local_sgd``).

    DDP whose comm hook (``post_localSGD_hook`` with the site as its subgroup) all-reduces the
    gradients inside each site every step, and ``HierarchicalModelAverager`` with
    ``PostLocalSGDOptimizer`` averaging every parameter over all ranks every H steps: a flat
    all-reduce, so each site's uplink carries the model G times per period.
    """

    def _gradient_subgroup(self) -> dist.ProcessGroup | None:
        topology = discover(ranks_per_site=self.cfg.ranks_per_site or None)
        if not topology.hierarchical:
            raise ValueError(
                f"train.algorithm='hier_local_sgd' needs several sites of several ranks, found "
                f"{topology.describe()}; set train.ranks_per_site or DREAMDDP_SITE, or use local_sgd"
            )
        self.topology = topology
        self.note = f"two-level: {topology.describe()}, gradients every step inside a site"
        return topology.intra

    def _make_averager(self, link: SimulatedLink | None) -> _LinkedHierarchicalAverager:
        world = dist.get_world_size()
        return _LinkedHierarchicalAverager(
            link,
            self._param_bytes,
            period_group_size_dict=OrderedDict([(self.cfg.period_h, world)]),
            warmup_steps=self.cfg.post_local_warmup,
        )

    def after_step(self, step: int) -> None:
        super().after_step(step)
        if step >= self.cfg.post_local_warmup:  # what crossed the WAN: the averages, not the site's gradients
            self._last = _after_step_comm(None, self._param_bytes if self.averager.averaged_last else 0, self.n_units)


class PartialLocalSGD(Strategy):
    """DreamDDP's wrapper running a resolved schedule: PLSGD's groups or a schedule file's plan."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None, schedule: Schedule) -> None:
        super().__init__(model, cfg, link)
        if cfg.algorithm == "dreamddp" and cfg.schedule and cfg.period == "auto" and cfg.replan_every:
            self.note = f"schedule {cfg.schedule!r} starts with H={schedule.period}; re-planning chooses H from then on"
        elif cfg.algorithm == "dreamddp" and cfg.schedule:
            if schedule.period != cfg.period:
                # The schedule file decides H; say so rather than silently ignoring train.period.
                self.note = f"schedule {cfg.schedule!r} has period {schedule.period}; train.period={cfg.period} ignored"
        elif cfg.algorithm == "dreamddp" and cfg.period == "auto":
            self.note = f"train.period='auto': H={schedule.period}, planned from {cfg.profile!r}"
        elif cfg.algorithm == "dreamddp":
            self.note = "no schedule file given: using PLSGD's equal-bytes contiguous groups"
        self.ddp = DreamDDP(
            model,
            schedule,
            bucket_cap_mb=cfg.bucket_cap_mb,
            link=link,
            # Re-planning reads rank 0's timings only; other ranks would just hold them.
            record_timings=bool(cfg.trace or cfg.metrics_port or (cfg.replan_every and _rank() == 0)),
            overlap=cfg.overlap or None,
            sync=cfg.sync_options,
            hierarchy=cfg.hierarchy,
            ranks_per_site=cfg.ranks_per_site or None,
        )
        self.ddp.register_optimizer(self.optimizer)  # overlap="forward" holds back steps of units still averaging
        self.model = self.ddp
        self.schedule = schedule
        if self.ddp.sync.delta:
            self.note = "; ".join(x for x in (self.note, f"sync: {self.ddp.sync.describe()}") if x)
        if self.ddp.topology is not None:
            two_level = f"two-level: {self.ddp.topology.describe()}, gradients every step inside a site"
            self.note = "; ".join(x for x in (self.note, two_level) if x)
        if self.ddp.overlap == "forward":
            self.note = "; ".join(
                x
                for x in (
                    self.note,
                    "averages land before each unit's next forward "
                    f"(overlap='forward', {len(schedule.delays)} units delayed)",
                )
                if x
            )

    @property
    def period(self) -> int:
        return self.schedule.period  # the schedule's H, whatever train.period says

    def after_step(self, step: int) -> None:
        stats = self.ddp.last_stats  # DreamDDP communicated inside backward (and, overlapped, in forward)
        self._last = CommStats(
            wait_s=stats.wait_s,
            bytes_sent=stats.bytes_sent,
            units_synced=len(stats.units),
            backward_wait_s=stats.backward_wait_s,
            forward_events=list(stats.forward_events),
        )

    def _hidden_comm_s(self) -> float | None:
        """Communication that overlapped compute: the buckets' busy span minus the wait."""
        observed = self.ddp.observed_timings()
        if not observed or observed[-1].iteration != self.ddp.iteration - 1 or not observed[-1].buckets:
            return 0.0
        spans = sorted((b.launch_s, b.done_s) for b in observed[-1].buckets)
        busy, end = 0.0, float("-inf")
        for start, done in spans:  # length of the union of the buckets' intervals
            if done > end:
                busy += done - max(start, end)
                end = done
        return max(0.0, busy - (self._last.wait_s or 0.0))

    def observed_timings(self) -> list[ObservedIteration]:
        return self.ddp.observed_timings()

    def checkpoint_state(self) -> dict[str, Any]:
        # The wrapper's state dict adds its iteration counter and bucket order to the model's.
        return {"model": self.ddp.state_dict(), "optimizer": self.optimizer.state_dict(), "strategy": {}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        record = state.get("schedule")
        if self.schedule_in_state and isinstance(record, dict) and record.get("assignment") is not None:
            # Re-planned while running: the checkpoint holds the schedule in force at that iteration.
            self.switch_schedule(schedule_from_record(record))
        self.ddp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def schedule_record(self) -> dict[str, Any] | None:
        return {
            "period": self.schedule.period,
            "assignment": {n: list(its) for n, its in self.schedule.assignment.items()},
            "delays": dict(self.schedule.delays),
            "overlap": self.ddp.overlap,
        }

    @property
    def schedule_in_state(self) -> bool:
        return bool(self.cfg.replan_every)

    def phase_of(self, step: int) -> int:
        return (step - self.ddp.period_origin) % self.period  # a new H counts from where it began

    def switch_schedule(self, schedule: Schedule) -> None:
        """Run ``schedule`` from the next iteration on (every rank, at the same iteration)."""
        self.ddp.set_schedule(schedule)
        self.schedule = schedule

    def flush(self) -> None:
        self.ddp.flush(delayed=False)  # a delayed average lands on its own iteration, or the trajectory moves

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        return self.ddp.no_sync()

    def finish(self) -> None:
        self.ddp.average_all()

    def close(self) -> None:
        self.ddp.remove_hooks()


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def schedule_from_record(record: dict[str, Any]) -> Schedule:
    """The schedule a checkpoint's ``schedule_record`` describes (the schedule file's fields)."""
    return Schedule.from_dict({"format": SCHEDULE_FORMAT, **record}, source="the checkpoint's schedule")


_STRATEGIES: dict[str, type[Strategy]] = {
    "none": NoCommunication,
    "ssgd": SSGD,
    "local_sgd": LocalSGD,
    "post_local_sgd": PostLocalSGD,
    "hier_local_sgd": HierarchicalLocalSGD,
}
SCHEDULED = ("plsgd", "dreamddp")  # the algorithms that run a DreamDDP schedule


def build_strategy(
    model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None, schedule: Schedule | None = None
) -> Strategy:
    """The strategy for ``cfg.algorithm``; plsgd and dreamddp run ``schedule``.

    The schedule is resolved before (``dreamddp.training.schedules.resolve_schedule``), once,
    so that reading the file, checking it and choosing H happen in one place.
    """
    if cfg.algorithm in SCHEDULED:
        if schedule is None:
            raise TypeError(f"train.algorithm={cfg.algorithm!r} needs the resolved schedule (resolve_schedule)")
        return PartialLocalSGD(model, cfg, link, schedule)
    return _STRATEGIES[cfg.algorithm](model, cfg, link)

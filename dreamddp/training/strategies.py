"""The training algorithms, each as a small strategy the one training loop drives.

Every strategy wraps the model, builds or wraps the optimizer, says after each iteration how
long it blocked on communication and how many bytes it sent, and makes the ranks' models
equal at the end. The loop itself (``train.py``) is the same for all of them, so their
timings differ only by what each algorithm communicates and when.

- ``none``: no communication at all — the compute-only reference for "how much was hidden".
- ``ssgd``: torch ``DistributedDataParallel`` (gradient all-reduce overlapped with backward).
- ``local_sgd``: every parameter averaged every H iterations after the step, bucketed.
- ``post_local_sgd``: torch's ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``.
- ``plsgd``: DreamDDP with H contiguous groups of about equal bytes (no profile).
- ``dreamddp``: DreamDDP with a schedule file (the scheduler's output), else PLSGD's groups.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.optim import PostLocalSGDOptimizer

from dreamddp.core.collectives import average_tensors
from dreamddp.core.ddp import DreamDDP
from dreamddp.core.schedule import Schedule
from dreamddp.core.units import sync_units
from dreamddp.emulation.link import SimulatedLink, sleep_until
from dreamddp.training.config import TrainConfig
from dreamddp.training.link_hooks import linked_allreduce_hook, linked_post_local_sgd_hook

__all__ = ["Strategy", "CommRecord", "build_lr_scheduler", "build_strategy", "build_optimizer"]


@dataclass
class CommRecord:
    wait_s: float | None  # host time blocked on communication this iteration (None: not observable)
    bytes_sent: int
    units_synced: int = 0  # sync units whose parameters (or gradients) were averaged


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
        self.optimizer: torch.optim.Optimizer = build_optimizer(cfg, model.parameters())
        self.note = ""  # anything the run should report about how this strategy was set up
        self.n_units = len(sync_units(model))

    # ------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """This rank's model, optimizer and algorithm state (rank-local under local SGD)."""
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(), "strategy": {}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def schedule_record(self) -> dict[str, Any] | None:
        """What must match for a checkpoint of this run to be resumed exactly."""
        return {"period": self.cfg.period}

    def after_step(self, step: int) -> CommRecord:
        return CommRecord(wait_s=0.0, bytes_sent=0)

    def flush(self) -> None:
        """Land communication still in flight before something reads every weight (evaluation)."""

    def finish(self) -> None:
        """Make every rank's model equal (not part of the timed iterations)."""
        average_tensors([t for u in sync_units(self.raw_model) for t in u.tensors])

    def close(self) -> None:
        pass


class NoCommunication(Strategy):
    pass


class SSGD(Strategy):
    """torch DDP as users run it; the simulated link, if any, delays its bucket futures."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        super().__init__(model, cfg, link)
        self.model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
        if link is not None:
            self.model.register_comm_hook(link, linked_allreduce_hook)
        self.optimizer = build_optimizer(cfg, self.model.parameters())
        self._grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    def after_step(self, step: int) -> CommRecord:
        return CommRecord(wait_s=None, bytes_sent=self._grad_bytes, units_synced=self.n_units)

    def schedule_record(self) -> dict[str, Any] | None:
        return None

    def finish(self) -> None:
        pass  # DDP keeps the replicas equal

    def close(self) -> None:
        # Tear DDP down before the process group goes (an occasional SIGABRT at exit otherwise).
        del self.model
        self.model = self.raw_model


class LocalSGD(Strategy):
    """Every parameter and buffer averaged every H iterations after the step (bucketed)."""

    def after_step(self, step: int) -> CommRecord:
        if (step + 1) % self.cfg.period:
            return CommRecord(wait_s=0.0, bytes_sent=0)
        start = time.perf_counter()
        sent = average_tensors(
            [t for u in sync_units(self.raw_model) for t in u.tensors],
            cap_bytes=int(self.cfg.bucket_cap_mb * 2**20),
            link=self.link,
        )
        return CommRecord(wait_s=time.perf_counter() - start, bytes_sent=sent, units_synced=self.n_units)


class _LinkedAverager(PeriodicModelAverager):
    """torch's PeriodicModelAverager; when it averages, it also pays the simulated link."""

    def __init__(self, link: SimulatedLink | None, nbytes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.link, self.nbytes = link, nbytes
        self.averaged_last = False

    def average_parameters(self, params) -> None:
        due = self.step >= self.warmup_steps and (self.step - self.warmup_steps) % self.period == 0
        booking = self.link.book(self.nbytes) if (due and self.link is not None) else None
        super().average_parameters(params)
        if booking is not None:
            sleep_until(self.link.complete(booking))
        self.averaged_last = due


class PostLocalSGD(Strategy):
    """torch's PostLocalSGD: DDP for ``post_local_warmup`` iterations, then periodic averaging."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        super().__init__(model, cfg, link)
        self.model = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cfg.bucket_cap_mb)
        state = PostLocalSGDState(
            process_group=None,
            subgroup=None,
            start_localSGD_iter=cfg.post_local_warmup,
            post_local_gradient_allreduce=False,  # pure local SGD after warm-up
        )
        self._state = state
        if link is None:
            self.model.register_comm_hook(state, post_localSGD_hook)
        else:
            self.model.register_comm_hook((state, link), linked_post_local_sgd_hook)
        self._param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.averager = _LinkedAverager(link, self._param_bytes, period=cfg.period, warmup_steps=cfg.post_local_warmup)
        self.optimizer = PostLocalSGDOptimizer(
            optim=build_optimizer(cfg, self.model.parameters()), averager=self.averager
        )

    def after_step(self, step: int) -> CommRecord:
        sent = self._param_bytes if self.averager.averaged_last else 0
        if step < self.cfg.post_local_warmup:
            sent += self._param_bytes  # gradient all-reduce during warm-up
        return CommRecord(wait_s=None, bytes_sent=sent, units_synced=self.n_units if sent else 0)

    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()  # the optimizer's state carries the averager's step
        state["strategy"] = {"local_sgd_iter": self._state.iter}
        return state

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        # torch's PostLocalSGDOptimizer keeps a reference to the inner optimizer's param_groups
        # list, which the inner load_state_dict replaces: without this, an LR scheduler would
        # set the learning rate on stale groups and the resumed run would train at a frozen LR.
        self.optimizer.param_groups = self.optimizer.optim.param_groups
        self._state.iter = int(state["strategy"]["local_sgd_iter"])

    def schedule_record(self) -> dict[str, Any] | None:
        return {"period": self.cfg.period, "warmup": self.cfg.post_local_warmup}

    def close(self) -> None:
        del self.model
        self.model = self.raw_model


class PartialLocalSGD(Strategy):
    """DreamDDP's wrapper, with PLSGD's groups or a given schedule."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> None:
        super().__init__(model, cfg, link)
        if cfg.algorithm == "dreamddp" and cfg.schedule:
            schedule = Schedule.from_json(cfg.schedule)
            planned_for = schedule.metadata.get("world_size")
            world = torch.distributed.get_world_size()
            if planned_for is not None and planned_for != world:
                # Ring all-reduce costs scale with (n-1)/n and the link mix changes with n: a plan
                # for another world size is a plan for another job.
                raise ValueError(
                    f"schedule {cfg.schedule!r} was planned for {planned_for} ranks, this job has "
                    f"{world}: profile and plan again for this world size"
                )
            if schedule.period != cfg.period:
                # The schedule file decides H; say so rather than silently ignoring train.period.
                self.note = f"schedule {cfg.schedule!r} has period {schedule.period}; train.period={cfg.period} ignored"
        else:
            schedule = Schedule.plsgd(sync_units(model), cfg.period)
            if cfg.algorithm == "dreamddp":
                self.note = "no schedule file given: using PLSGD's equal-bytes contiguous groups"
        self.ddp = DreamDDP(
            model,
            schedule,
            bucket_cap_mb=cfg.bucket_cap_mb,
            link=link,
            record_timings=bool(cfg.trace or cfg.metrics_port),
            overlap=cfg.overlap or None,
        )
        self.ddp.register_optimizer(self.optimizer)  # overlap="forward" holds back steps of units still averaging
        self.model = self.ddp
        self.schedule = schedule
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

    def after_step(self, step: int) -> CommRecord:
        stats = self.ddp.last_stats
        return CommRecord(wait_s=stats.wait_s, bytes_sent=stats.bytes_sent, units_synced=len(stats.units))

    def checkpoint_state(self) -> dict[str, Any]:
        # The wrapper's state dict adds its iteration counter and bucket order to the model's.
        return {"model": self.ddp.state_dict(), "optimizer": self.optimizer.state_dict(), "strategy": {}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.ddp.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def schedule_record(self) -> dict[str, Any] | None:
        return {
            "period": self.schedule.period,
            "assignment": {n: list(its) for n, its in self.schedule.assignment.items()},
            "delays": dict(self.schedule.delays),
            "overlap": self.ddp.overlap,
        }

    def flush(self) -> None:
        self.ddp.flush(delayed=False)  # a delayed average lands on its own iteration, or the trajectory moves

    def finish(self) -> None:
        self.ddp.average_all()

    def close(self) -> None:
        self.ddp.remove_hooks()


_STRATEGIES: dict[str, type[Strategy]] = {
    "none": NoCommunication,
    "ssgd": SSGD,
    "local_sgd": LocalSGD,
    "post_local_sgd": PostLocalSGD,
    "plsgd": PartialLocalSGD,
    "dreamddp": PartialLocalSGD,
}


def build_strategy(model: nn.Module, cfg: TrainConfig, link: SimulatedLink | None) -> Strategy:
    return _STRATEGIES[cfg.algorithm](model, cfg, link)

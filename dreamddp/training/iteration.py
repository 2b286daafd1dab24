"""One training iteration, timed: forward, backward, optimizer step, the strategy's communication.

The same code for every algorithm, so their timings differ only by what each communicates
and when. The marks it takes are what the log, the metrics and the trace report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from dreamddp.training.data import BatchSource
from dreamddp.training.loss import LossFn
from dreamddp.training.strategies import CommStats, Strategy

__all__ = ["IterationResult", "IterationRunner", "StepTimes"]


@dataclass(frozen=True)
class StepTimes:
    """Host ``perf_counter_ns()`` marks around one iteration."""

    start: int
    forward_end: int
    backward_end: int  # loss.backward() returned (DreamDDP's end-of-backward wait included)
    optimizer_end: int
    end: int  # after the strategy's after-step communication


@dataclass(frozen=True)
class IterationResult:
    """One finished iteration, as every observer of the loop sees it."""

    step: int
    loss: float
    times: StepTimes
    comm: CommStats

    @property
    def elapsed_s(self) -> float:
        return (self.times.end - self.times.start) / 1e9


class IterationRunner:
    """Runs iteration ``step`` on this rank's batch for that step.

    ``measure_hidden``: also measure the communication hidden behind compute (see
    ``Strategy.stats``), for the metrics endpoint.
    """

    def __init__(
        self,
        strategy: Strategy,
        data: BatchSource,
        loss_fn: LossFn,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        device: torch.device,
        *,
        grad_clip: float = 0.0,
        measure_hidden: bool = False,
    ) -> None:
        self.strategy, self.data, self.loss_fn, self.lr_scheduler = strategy, data, loss_fn, lr_scheduler
        self.device, self.grad_clip, self.measure_hidden = device, grad_clip, measure_hidden

    def run(self, step: int) -> IterationResult:
        strategy = self.strategy
        x, y = (t.to(self.device, non_blocking=True) for t in self.data.batch(step))
        t_start = time.perf_counter_ns()
        strategy.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(strategy.model(x), y)
        t_forward = time.perf_counter_ns()
        loss.backward()
        t_backward = time.perf_counter_ns()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(strategy.raw_model.parameters(), self.grad_clip)
        strategy.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        t_optimizer = time.perf_counter_ns()
        strategy.after_step(step)
        if self.device.type == "cuda":
            # Once per iteration, outside every hook: honest timing. The compute stream only — a
            # whole-device sync would also wait for averages overlap="forward" leaves in flight.
            torch.cuda.current_stream(self.device).synchronize()
        times = StepTimes(t_start, t_forward, t_backward, t_optimizer, time.perf_counter_ns())
        return IterationResult(step, loss.item(), times, strategy.stats(with_hidden=self.measure_hidden))

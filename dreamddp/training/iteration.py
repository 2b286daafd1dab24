"""One training iteration, timed: forward, backward, optimizer step, the strategy's communication.

The same code for every algorithm, so their timings differ only by what each communicates
and when. The marks it takes are what the log, the metrics and the trace report.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

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
    forward_end: int  # the (last micro-step's) forward returned
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
        grad_accum: int = 1,
        precision: str = "fp32",
    ) -> None:
        self.strategy, self.data, self.loss_fn, self.lr_scheduler = strategy, data, loss_fn, lr_scheduler
        self.device, self.grad_clip, self.measure_hidden = device, grad_clip, measure_hidden
        self.grad_accum, self.precision = grad_accum, precision

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 compute for forward and loss; parameters, gradients and averages stay fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Every micro-step but the last under the strategy's ``no_sync``; the loss, and when the last forward ended.

        The step's batch is split into ``grad_accum`` equal micro-batches, each loss scaled by
        1/k, so the accumulated gradient is the whole batch's (the data stream and the
        effective batch do not depend on k; only the memory does).
        """
        k = self.grad_accum
        if k == 1:
            with self._autocast():
                loss = self.loss_fn(self.strategy.model(x), y)
            t_forward = time.perf_counter_ns()
            loss.backward()
            return loss.detach(), t_forward
        total = torch.zeros((), device=self.device)
        t_forward = 0
        for j, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
            last = j == k - 1
            with contextlib.nullcontext() if last else self.strategy.no_sync():
                with self._autocast():
                    loss = self.loss_fn(self.strategy.model(xs), ys) / k
                t_forward = time.perf_counter_ns()
                loss.backward()
            total += loss.detach().float()
        return total, t_forward

    def run(self, step: int) -> IterationResult:
        strategy = self.strategy
        x, y = (t.to(self.device, non_blocking=True) for t in self.data.batch(step))
        t_start = time.perf_counter_ns()
        strategy.optimizer.zero_grad(set_to_none=True)
        loss, t_forward = self._forward_backward(x, y)
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

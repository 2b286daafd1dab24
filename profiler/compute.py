"""Per-unit forward and backward times, measured with hooks on the plain (unwrapped) model.

Backward time of a unit is the window from the previous unit's gradients being ready (or
backward starting) to its own — exactly the compute an all-reduce launched at the previous
unit's readiness can hide behind, which is what the scheduler reasons about. Readiness is
observed with ``register_post_accumulate_grad_hook``, the same hook the wrapper launches from.

Timing never serialises the run: on CPU the hooks read ``time.perf_counter_ns``; on CUDA they
record ``torch.cuda.Event``s on the current stream and everything is read once at the end.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dreamddp.core.timing import Clock
from dreamddp.core.units import SyncUnit, sync_units, units_fingerprint
from dreamddp.planning.profile import Profile, Spread, UnitProfile
from dreamddp.validation import non_negative_int, positive_int

__all__ = ["profile_compute"]

logger = logging.getLogger(__name__)

Batch = tuple[Any, Any]


@dataclass
class _Sample:
    """One measured iteration's clock marks (CPU ns or CUDA events, read at the end)."""

    start: Any
    forward_end: Any
    backward_end: Any
    step_end: Any
    forward: list[list[tuple[Any, Any]]]  # per unit: (enter, exit) of each call of its module
    ready: list[Any]  # per unit: when its last gradient was accumulated (None: never)


def profile_compute(
    model: nn.Module,
    make_batch: Callable[[int], Batch],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    iters: int = 20,
    warmup: int = 5,
    optimizer: torch.optim.Optimizer | None = None,
) -> Profile:
    """Measure every sync unit's forward and backward time over ``iters`` iterations.

    ``make_batch(step) -> (inputs, target)``; ``loss_fn(output, target) -> loss``. The
    first ``warmup`` iterations are run but not measured. Times are medians with p10/p90.
    ``optimizer`` (optional) is stepped each iteration so its time is measured too.
    """
    positive_int("iters", iters)
    non_negative_int("warmup", warmup)
    units = sync_units(model)
    if not units:
        raise ValueError("the model has no parameters or floating buffers: there is nothing to synchronise or profile")
    device = next((t.device for u in units for t in u.tensors), torch.device("cpu"))
    clock = Clock(device)
    n = len(units)

    fwd_marks: list[list[tuple[Any, Any]]] = [[] for _ in range(n)]
    ready_mark: list[Any] = [None] * n
    grads_left = [0] * n
    grad_params = [sum(1 for p in u.params if p.requires_grad) for u in units]
    handles = []
    open_calls: dict[int, list[Any]] = {}
    for i, unit in enumerate(units):
        module = model if unit.name == "<root>" else model.get_submodule(unit.name)
        handles.append(module.register_forward_pre_hook(_pre_hook(i, open_calls, clock)))
        handles.append(module.register_forward_hook(_post_hook(i, open_calls, fwd_marks, clock)))
        for p in unit.params:
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(_ready_hook(i, grads_left, ready_mark, clock)))

    samples: list[_Sample] = []
    try:
        for step in range(warmup + iters):
            inputs, target = make_batch(step)
            for marks in fwd_marks:
                marks.clear()
            ready_mark[:] = [None] * n
            grads_left[:] = grad_params
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            else:
                model.zero_grad(set_to_none=True)
            t_start = clock.mark()
            loss = loss_fn(model(inputs), target)
            t_forward = clock.mark()
            loss.backward()
            t_backward = clock.mark()
            if optimizer is not None:
                optimizer.step()
            t_step = clock.mark()
            if step >= warmup:
                samples.append(
                    _Sample(t_start, t_forward, t_backward, t_step, [list(m) for m in fwd_marks], list(ready_mark))
                )
        clock.settle()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)

    return _summarise(units, samples, clock, iters, warmup, device)


def _pre_hook(i: int, open_calls: dict[int, list[Any]], clock: Clock) -> Callable[[nn.Module, Any], None]:
    def hook(_module: nn.Module, _args: Any) -> None:
        open_calls.setdefault(i, []).append(clock.mark())

    return hook


def _post_hook(
    i: int, open_calls: dict[int, list[Any]], fwd_marks: list[list[tuple[Any, Any]]], clock: Clock
) -> Callable[[nn.Module, Any, Any], None]:
    def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
        fwd_marks[i].append((open_calls[i].pop(), clock.mark()))

    return hook


def _ready_hook(i: int, grads_left: list[int], ready_mark: list[Any], clock: Clock) -> Callable[[torch.Tensor], None]:
    def hook(_param: torch.Tensor) -> None:
        grads_left[i] -= 1
        if grads_left[i] == 0:
            ready_mark[i] = clock.mark()

    return hook


def _summarise(
    units: list[SyncUnit], samples: list[_Sample], clock: Clock, iters: int, warmup: int, device: torch.device
) -> Profile:
    n = len(units)
    forward_s = [[sum(clock.seconds(a, b) for a, b in s.forward[i]) for s in samples] for i in range(n)]
    backward_windows: list[list[float]] = [[] for _ in range(n)]
    ready_at: list[list[float]] = [[] for _ in range(n)]
    for s in samples:
        ready = {i: clock.seconds(s.forward_end, m) for i, m in enumerate(s.ready) if m is not None}
        previous = 0.0
        for i in sorted(ready, key=lambda unit: ready[unit]):
            backward_windows[i].append(max(0.0, ready[i] - previous))
            ready_at[i].append(ready[i])
            previous = ready[i]
    # Backward order: by median readiness; units whose gradients never arrive go last.
    never = float("inf")
    median_ready = [Spread.of(r).median if r else never for r in ready_at]
    order = sorted(range(n), key=lambda i: (median_ready[i], -i))
    profiled = tuple(
        UnitProfile(
            name=units[i].name,
            nbytes=units[i].nbytes,
            forward_s=Spread.of(forward_s[i]).median,
            backward_s=Spread.of(backward_windows[i]).median if backward_windows[i] else 0.0,
            forward_spread=Spread.of(forward_s[i]),
            backward_spread=Spread.of(backward_windows[i]),
        )
        for i in order
    )
    never_ready = [units[i].name for i in range(n) if not ready_at[i]]
    if never_ready:  # frozen or unused parameters: planned with no backward window of their own
        logger.info("no gradient arrived for %d unit(s) while profiling: %s", len(never_ready), ", ".join(never_ready))
    totals = {
        "forward_s": Spread.of([clock.seconds(s.start, s.forward_end) for s in samples]),
        "backward_s": Spread.of([clock.seconds(s.forward_end, s.backward_end) for s in samples]),
        "optimizer_s": Spread.of([clock.seconds(s.backward_end, s.step_end) for s in samples]),
    }
    return Profile(
        units=profiled,
        forward_s=totals["forward_s"].median,
        backward_s=totals["backward_s"].median,
        optimizer_s=totals["optimizer_s"].median,
        metadata={
            "device": str(device),
            "torch": torch.__version__,
            "model_fingerprint": units_fingerprint(units),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "iters": iters,
            "warmup": warmup,
            "units_never_ready": never_ready,
        },
        spreads=totals,
    )

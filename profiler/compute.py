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
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dreamddp.core.timing import Clock
from dreamddp.core.units import sync_units, units_fingerprint
from dreamddp.planning.profile import Profile, Spread, UnitProfile

__all__ = ["profile_compute"]

Batch = tuple[Any, Any]


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
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
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

    samples: list[dict[str, Any]] = []
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
                    {
                        "marks": (t_start, t_forward, t_backward, t_step),
                        "fwd": [list(m) for m in fwd_marks],
                        "ready": list(ready_mark),
                    }
                )
        clock.settle()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)

    return _summarise(model, units, samples, clock, iters, warmup, device)


def _pre_hook(i: int, open_calls: dict[int, list[Any]], clock: Clock):
    def hook(_module: nn.Module, _args: Any) -> None:
        open_calls.setdefault(i, []).append(clock.mark())

    return hook


def _post_hook(i: int, open_calls: dict[int, list[Any]], fwd_marks: list[list[tuple[Any, Any]]], clock: Clock):
    def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
        fwd_marks[i].append((open_calls[i].pop(), clock.mark()))

    return hook


def _ready_hook(i: int, grads_left: list[int], ready_mark: list[Any], clock: Clock):
    def hook(_param: torch.Tensor) -> None:
        grads_left[i] -= 1
        if grads_left[i] == 0:
            ready_mark[i] = clock.mark()

    return hook


def _summarise(model, units, samples, clock: Clock, iters: int, warmup: int, device: torch.device) -> Profile:
    n = len(units)
    forward_s = [[sum(clock.seconds(a, b) for a, b in s["fwd"][i]) for s in samples] for i in range(n)]
    backward_windows: list[list[float]] = [[] for _ in range(n)]
    ready_at: list[list[float]] = [[] for _ in range(n)]
    for s in samples:
        t_start, t_forward, _, _ = s["marks"]
        ready = {i: clock.seconds(t_forward, m) for i, m in enumerate(s["ready"]) if m is not None}
        previous = 0.0
        for i in sorted(ready, key=ready.get):
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
    totals = {
        "forward_s": Spread.of([clock.seconds(s["marks"][0], s["marks"][1]) for s in samples]),
        "backward_s": Spread.of([clock.seconds(s["marks"][1], s["marks"][2]) for s in samples]),
        "optimizer_s": Spread.of([clock.seconds(s["marks"][2], s["marks"][3]) for s in samples]),
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
            "units_never_ready": [units[i].name for i in range(n) if not ready_at[i]],
        },
        spreads=totals,
    )

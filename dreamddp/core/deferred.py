"""Deferring the optimizer step of parameters whose average is still on the wire.

With ``DreamDDP(overlap="forward")`` a unit's all-reduce may still be running when the user
calls ``optimizer.step()``. Stepping that unit then would apply the local gradient to weights
that are about to be overwritten by the average; the arithmetic of the paper's mode is
``w <- step(mean(w), g_local)``. So, for those parameters only, the step is held back and
applied later, per unit, when the average has landed — at the latest just before the unit's
forward in the next iteration. Everything else steps as usual, and the user's optimizer,
LR scheduler and loop stay unchanged.

How, without touching the optimizer's code:

- a step pre-hook moves each deferred parameter's gradient into a stash and sets ``.grad`` to
  None. Every torch optimizer skips parameters without a gradient, so ``step()`` leaves them
  alone; ``zero_grad()`` later finds nothing to clear, so the stash survives it.
- the hook also snapshots each parameter group's hyperparameters (lr, betas, weight decay...)
  as they are *at this step*: an LR scheduler stepping right after ``optimizer.step()`` must
  not change the learning rate a deferred step uses.
- applying a deferred step calls the same optimizer's ``step()`` once with each group's
  ``params`` narrowed to the units that landed (other groups emptied) and the snapshot
  hyperparameters, then restores the groups and the parameters' current gradients. Optimizer
  state is per parameter, so momentum buffers and Adam's moments and step counts advance
  exactly as they would have in one combined step.

Gradient clipping by global norm needs no help: the user clips the local gradients before
``step()``, i.e. before anything is stashed, and the average changes weights, not gradients,
so the norm is the paper mode's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DeferredSteps"]


@dataclass
class _Stashed:
    grad: torch.Tensor
    optimizer: torch.optim.Optimizer
    group: int
    hparams: dict[str, Any]


class DeferredSteps:
    """Registry of optimizers and the gradients whose step is waiting for an average."""

    def __init__(self, to_defer: Callable[[], set[torch.nn.Parameter]]) -> None:
        self._to_defer = to_defer  # asked at each step: which parameters must wait
        self._optimizers: list[torch.optim.Optimizer] = []
        self._handles: list[Any] = []
        self._stash: dict[torch.nn.Parameter, _Stashed] = {}
        self._applying = False
        self.applied = 0  # parameters whose step was held back and applied later (for tests, stats)

    @property
    def registered(self) -> bool:
        return bool(self._optimizers)

    @property
    def pending(self) -> int:
        return len(self._stash)

    def register(self, optimizer: torch.optim.Optimizer) -> None:
        if any(o is optimizer for o in self._optimizers):
            return
        self._optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._before_step))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._optimizers = [], []

    def discard(self) -> None:
        """Forget the held-back steps (the state they belong to is being replaced)."""
        self._stash.clear()

    def _before_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self._applying:
            return
        defer = self._to_defer()
        if not defer:
            return
        args = args[1:]  # the first is the optimizer itself
        if args or kwargs:
            # A closure re-runs forward and backward inside step(); GradScaler passes a fused
            # optimizer grad_scale/found_inf for this step only. Neither can be replayed later.
            given = ", ".join([*(type(a).__name__ for a in args), *kwargs])
            raise RuntimeError(
                f"DreamDDP(overlap='forward') cannot hold back a step called with arguments ({given}): "
                "call optimizer.step() without a closure, unscale gradients first "
                "(scaler.unscale_(optimizer)) with a non-fused optimizer, or use overlap='backward'"
            )
        for index, group in enumerate(optimizer.param_groups):
            hparams = None
            for p in group["params"]:
                if p in defer and p.grad is not None:
                    if p in self._stash:
                        raise RuntimeError("a parameter's previous deferred step was never applied")
                    if hparams is None:
                        hparams = {k: _frozen(v) for k, v in group.items() if k != "params"}
                    self._stash[p] = _Stashed(p.grad, optimizer, index, hparams)
                    p.grad = None

    @torch.no_grad()
    def apply(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Apply the held-back step of ``params`` (those without one are ignored)."""
        chosen = [p for p in params if p in self._stash]
        if not chosen:
            return
        by_optimizer: dict[int, tuple[torch.optim.Optimizer, dict[int, list]]] = {}
        for p in chosen:
            entry = self._stash[p]
            _, groups = by_optimizer.setdefault(id(entry.optimizer), (entry.optimizer, {}))
            groups.setdefault(entry.group, []).append(p)
        for optimizer, groups in by_optimizer.values():
            saved = [dict(g) for g in optimizer.param_groups]
            current = {p: p.grad for ps in groups.values() for p in ps}
            try:
                for index, group in enumerate(optimizer.param_groups):
                    if index in groups:
                        group.update(self._stash[groups[index][0]].hparams)
                        group["params"] = groups[index]
                    else:
                        group["params"] = []
                for ps in groups.values():
                    for p in ps:
                        p.grad = self._stash.pop(p).grad
                self._applying = True
                optimizer.step()
                self.applied += sum(len(ps) for ps in groups.values())
            finally:
                self._applying = False
                for group, original in zip(optimizer.param_groups, saved):
                    group.clear()
                    group.update(original)
                for p, grad in current.items():
                    p.grad = grad


def _frozen(value: Any) -> Any:
    """A hyperparameter as it is now (a tensor LR is copied: schedulers update it in place)."""
    return value.clone() if isinstance(value, torch.Tensor) else value

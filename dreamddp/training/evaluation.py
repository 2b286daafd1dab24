"""Validation loss, and the averaged model that local-SGD runs are judged (and exported) by.

Between synchronisations every rank holds its own weights; the model a local-SGD run stands
for is their mean. ``averaged_weights`` lends each rank that mean for a moment and gives its
own weights back bit for bit, so evaluating or exporting never changes the trajectory.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dreamddp.core.collectives import average_tensors
from dreamddp.core.units import sync_units
from dreamddp.training.data import BatchSource
from dreamddp.training.loss import LossFn
from dreamddp.training.strategies import Strategy

__all__ = ["PeriodicEvaluator", "averaged_state", "averaged_weights", "evaluate"]


@contextmanager
def averaged_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Collective: inside, ``model`` holds the ranks' mean weights; after, this rank's own again.

    Units are read now, not at start-up: DreamDDP may have re-laid its storage since, and a
    buffer list taken earlier would point at tensors the model no longer uses.
    """
    tensors = [t for u in sync_units(model) for t in u.tensors]
    snapshot = [t.clone() for t in tensors]
    average_tensors(tensors)
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, saved in zip(tensors, snapshot):
                t.copy_(saved)


def averaged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The averaged model's state dict (collective), for the checkpoint's export copy."""
    with averaged_weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: BatchSource, loss_fn: LossFn, n_batches: int, device: torch.device) -> float:
    """Mean loss over the data set's first ``n_batches`` held-out batches, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        losses = [loss_fn(model(x.to(device)), y.to(device)).item() for x, y in data.eval_batches(n_batches)]
    finally:
        model.train(was_training)
    return statistics.fmean(losses)


class PeriodicEvaluator:
    """Validation loss every ``every`` iterations during training, and once at the end.

    Mid-run, on the averaged model: in-flight averages land first (``strategy.flush``), then
    each rank's own weights come back, so a run with evaluation trains exactly like one
    without. Not after the last iteration: the final evaluation follows then.
    """

    def __init__(
        self,
        strategy: Strategy,
        data: BatchSource,
        loss_fn: LossFn,
        device: torch.device,
        *,
        every: int,
        n_batches: int,
        steps: int,
    ) -> None:
        self.strategy, self.data, self.loss_fn, self.device = strategy, data, loss_fn, device
        self.every, self.n_batches, self.steps = every, n_batches, steps

    def maybe_act(self, step: int) -> float | None:
        """Collective when due (after iteration ``step``): the averaged model's loss; else None."""
        if not (self.every and (step + 1) % self.every == 0 and step + 1 < self.steps):
            return None
        self.strategy.flush()
        with averaged_weights(self.strategy.raw_model) as model:
            return evaluate(model, self.data, self.loss_fn, self.n_batches, self.device)

    def final(self) -> float:
        """The loss after ``strategy.finish()``, which already made every rank's model the average."""
        return evaluate(self.strategy.raw_model, self.data, self.loss_fn, self.n_batches, self.device)

"""The training loss of each task, shared by the trainer and the profiler."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["LossFn", "loss_for_task"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_for_task(task: str) -> LossFn:
    """Cross-entropy; a language model's logits and targets are flattened over the sequence first."""
    if task == "lm":
        return lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy

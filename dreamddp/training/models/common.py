"""Pieces the model families share: config checks, decoder init, token-id checks."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from dreamddp.validation import positive_int


def require_positive_ints(config: object, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` if any of ``names`` on ``config`` is not an int >= 1.

    Shared by the model configs so that every bad value produces the same
    one-line message naming the class, the field and the value (``True`` is
    not ``1`` here).
    """
    owner = type(config).__name__
    for name in names:
        positive_int(f"{owner}.{name}", getattr(config, name), allowed="a positive int")


def init_decoder_weights(model: nn.Module, residual_projections: Iterable[nn.Linear], n_layer: int) -> None:
    """GPT-2 style init: N(0, 0.02) for every Linear and Embedding weight, zero Linear biases,
    and the projections that write into the residual stream scaled by 1/sqrt(2 * n_layer), so
    the residual's variance does not grow with depth (each block adds two such writes)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    for proj in residual_projections:
        nn.init.normal_(proj.weight, mean=0.0, std=resid_std)


def check_token_ids(idx: torch.Tensor, block_size: int, model: str) -> int:
    """Return the sequence length of a [B, T] batch of token ids, or raise naming the problem."""
    if idx.dim() != 2:
        raise ValueError(f"{model} expects token ids of shape [B, T], got {tuple(idx.shape)}")
    t = idx.shape[1]
    if t > block_size:
        raise ValueError(f"sequence length T={t} exceeds {model}Config.block_size={block_size}")
    return t

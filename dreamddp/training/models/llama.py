"""A small Llama-style decoder: RMSNorm, rotary positions, SwiGLU, optional GQA.

It exists next to :mod:`dreamddp.training.models.gpt` because it stresses the
synchronisation schedule differently: no biases, no tied weights, more (and
differently sized) linear layers per block, and parameter-free position
information kept in non-persistent buffers that must never be averaged or
checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dreamddp.training.models.common import check_token_ids, init_decoder_weights, require_positive_ints
from dreamddp.validation import positive_number


@dataclass
class LlamaConfig:
    """Hyper-parameters of :class:`Llama`; validated on construction.

    ``n_kv_head`` and ``ffn_hidden`` default to ``None`` rather than to a number
    so that ``dataclasses.replace(config, d_model=...)`` re-derives them; use
    :attr:`kv_heads` and :attr:`ffn_dim` for the effective values.
    """

    vocab_size: int = 256
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 2
    n_kv_head: int | None = None
    d_model: int = 64
    ffn_hidden: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        require_positive_ints(self, ("vocab_size", "block_size", "n_layer", "n_head", "d_model"))
        if self.n_kv_head is not None:
            require_positive_ints(self, ("n_kv_head",))
            if self.n_head % self.n_kv_head != 0:
                raise ValueError(f"LlamaConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.ffn_hidden is not None:
            require_positive_ints(self, ("ffn_hidden",))
        if self.d_model % self.n_head != 0:
            raise ValueError(f"LlamaConfig.d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if (self.d_model // self.n_head) % 2 != 0:
            # Rotary embeddings rotate pairs of channels.
            raise ValueError(
                f"LlamaConfig.d_model={self.d_model} / n_head={self.n_head} must be even for rotary embeddings"
            )
        for name in ("norm_eps", "rope_theta"):
            positive_number(f"LlamaConfig.{name}", getattr(self, name), allowed="a positive number")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_head`` unless grouped-query attention)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden size: ``8/3 * d_model`` rounded up to a multiple of 32.

        8/3 keeps the three-matrix SwiGLU at the parameter count of a 4x
        two-matrix MLP; the multiple of 32 keeps matmuls well aligned.
        """
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = math.ceil(8 * self.d_model / 3)
        return 32 * math.ceil(hidden / 32)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: rescales without re-centring, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so low-precision activations do not lose the
        # small mean-square values.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``[length, head_dim // 2]`` for rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(i, i + D/2)`` of ``x [B, H, T, D]`` by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with rotary q/k and optional grouped-query heads."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        self.q = nn.Linear(config.d_model, config.n_head * self.head_dim, bias=False)
        self.k = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(config.n_head * self.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.n_kv_head != self.n_head:
            # Each key/value head serves n_head / n_kv_head query heads.
            repeat = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).contiguous().view(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    """Pre-norm block: attention then SwiGLU, each added to the residual stream."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """Llama-style language model returning next-token logits ``[B, T, vocab]``."""

    rope_cos: torch.Tensor  # buffers, declared for the type checker
    rope_sin: torch.Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        layers = [LlamaBlock(config) for _ in range(config.n_layer)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Derived from the config, so not state: keep them out of state_dict
        # (checkpoints) and out of anything that averages model state.
        cos, sin = rotary_tables(config.head_dim, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_decoder_weights(self, [p for layer in layers for p in (layer.attn.o, layer.ffn.down)], config.n_layer)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = check_token_ids(idx, self.config.block_size, "Llama")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.tok_emb(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))

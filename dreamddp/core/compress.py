"""Compressed payloads for delta synchronization, with error feedback. Pure: no process group.

A synchronization of a unit sends its pseudo-gradient Δ (``sync="delta"``). Across a WAN the
bytes dominate, so Δ may be sent as

- ``"none"``: in the anchor's own dtype (fp32 for a bf16 model), all-reduced;
- ``"bf16"``: rounded to bfloat16 and all-reduced in bfloat16 (half the bytes of fp32);
- ``"int8"``: per block of ``block`` elements, an fp32 scale (absmax / 127) and one signed byte
  per element. Quantized values of different ranks have different scales and cannot be summed
  on the wire, so every rank *all-gathers* the others' bytes and scales and dequantizes and sums
  them itself, in rank order — the same arithmetic on every rank, so the result is bitwise
  identical everywhere, and no sum can overflow. An all-gather carries (N−1)·m bytes per rank
  where a ring all-reduce of fp32 carries 2(N−1)/N·4n: int8 sends N/8 (plus the scales) of the
  fp32 bytes — 0.25x across 2 sites, 0.5x across 4; beyond 7 sites it sends more, and
  ``int8`` is refused there (``check_world``).

**Error feedback.** What rounding drops is not lost: each rank keeps its residual
``e = (Δ + e) − decode(encode(Δ + e))`` for the unit and adds it to the unit's next Δ, so over
many syncs every rank's sent total tracks its true total (``with_feedback``).

Byte accounting: a collective is reported and priced (``SimulatedLink``, the planner) as the
all-reduce payload with the same wire traffic — ``allreduce_equivalent_bytes`` — so "bytes sent"
compares across methods whatever collective carries them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "COMPRESSORS",
    "INT8_MAX_WORLD",
    "Encoded",
    "allreduce_equivalent_bytes",
    "check_world",
    "compressed_fraction",
    "decode",
    "encode",
    "with_feedback",
]

COMPRESSORS = ("none", "bf16", "int8")
INT8_MAX_WORLD = 7  # an all-gather of int8 sends no more than a ring all-reduce of fp32 up to here
_INT8_LEVELS = 127.0


@dataclass
class Encoded:
    """One rank's encoded payload: ``data`` (what goes on the wire) and how to read it back.

    ``none``/``bf16``: ``data`` is the values themselves. ``int8``: ``data`` is one int8 buffer,
    the quantized values followed by the fp32 scales' bytes (one per block), so a
    single all-gather carries both.
    """

    method: str
    data: torch.Tensor
    numel: int  # elements of the payload before padding
    block: int = 0


def encode(x: torch.Tensor, method: str, block: int = 256) -> Encoded:
    """``x`` (1-D, floating) as ``method`` sends it."""
    if method == "none":
        return Encoded(method, x, x.numel())
    if method == "bf16":
        return Encoded(method, x.to(torch.bfloat16), x.numel())
    if method != "int8":
        raise ValueError(f"unknown compressor {method!r}; choose one of {', '.join(COMPRESSORS)}")
    n = x.numel()
    blocks = max(1, math.ceil(n / block))
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=x.device)
    padded[:n] = x
    grid = padded.view(blocks, block)
    scales = grid.abs().amax(dim=1) / _INT8_LEVELS
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(grid / safe[:, None]).clamp_(-_INT8_LEVELS, _INT8_LEVELS).to(torch.int8)
    data = torch.cat([q.reshape(-1)[:n], scales.view(torch.int8)])  # the padding is not sent
    return Encoded(method, data, n, block)


def decode(encoded: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``encoded`` stands for, as ``dtype`` (a new tensor)."""
    return decode_data(encoded.data, encoded.method, encoded.numel, encoded.block, dtype)


def decode_data(data: torch.Tensor, method: str, numel: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode one rank's wire buffer (for int8: quantized values, then the scales' bytes)."""
    if method != "int8":
        return data.to(dtype)
    blocks = max(1, math.ceil(numel / block))
    q = torch.zeros(blocks * block, dtype=torch.float32, device=data.device)
    q[:numel] = data[:numel]
    scales = data[numel:].clone().view(torch.float32)  # a copy: its bytes may sit unaligned
    return (q.view(blocks, block) * scales[:, None]).reshape(-1)[:numel].to(dtype)


def with_feedback(
    delta: torch.Tensor, residual: torch.Tensor | None, method: str, block: int = 256
) -> tuple[Encoded, torch.Tensor | None]:
    """Encode ``delta + residual``; return it and the new residual (what the encoding dropped).

    ``method="none"`` drops nothing: no residual is kept (None in, None out).
    """
    if method == "none":
        return encode(delta, method), None
    corrected = delta if residual is None else delta + residual
    encoded = encode(corrected, method, block)
    return encoded, corrected - decode(encoded, corrected.dtype)


def wire_bytes(numel: int, method: str, block: int, element_size: int) -> int:
    """Bytes of one rank's encoded payload of ``numel`` elements (``element_size``: uncompressed)."""
    if method == "none":
        return numel * element_size
    if method == "bf16":
        return numel * 2
    return numel + 4 * max(1, math.ceil(numel / block))


def allreduce_equivalent_bytes(payload_bytes: int, method: str, world: int) -> int:
    """The all-reduce payload with the wire traffic of this method's collective.

    A ring all-reduce of P bytes sends 2(N−1)/N·P per rank; an all-gather of m bytes per rank
    sends (N−1)·m, the traffic of an all-reduce of N·m/2.
    """
    if method != "int8" or world <= 1:
        return payload_bytes
    return payload_bytes * world // 2


def compressed_fraction(method: str, block: int, world: int, element_size: int = 4) -> float:
    """Bytes priced per byte of an uncompressed payload of ``element_size``-byte elements."""
    per_element = wire_bytes(1, method, block, element_size) if method != "int8" else 1.0 + 4.0 / block
    if method == "int8" and world > 1:
        per_element *= world / 2.0
    return per_element / element_size


def check_world(method: str, world: int) -> None:
    """int8 is an all-gather: beyond ``INT8_MAX_WORLD`` ranks it sends more than fp32 would."""
    if method == "int8" and world > INT8_MAX_WORLD:
        raise ValueError(
            f"compress='int8' all-gathers every rank's payload, which across {world} ranks sends more "
            f"than an fp32 all-reduce; use it with at most {INT8_MAX_WORLD} ranks (one per site), or compress='bf16'"
        )

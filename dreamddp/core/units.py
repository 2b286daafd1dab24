"""Split a model into sync units: the granularity at which DreamDDP averages parameters.

A sync unit is everything trainable one module owns directly (``recurse=False``): its
parameters with ``requires_grad`` and its floating-point buffers. Units are the "layers" of
the paper. Choosing the owning module, rather than each tensor, keeps a Linear's weight and
bias together (they become ready in the same backward node) and keeps the schedule readable
(``"blocks.3.mlp.fc"``).

A parameter shared by several modules (GPT-2's tied ``wte``/``lm_head``) belongs to exactly one
unit, so it is averaged once per period. We give it to the first owner in ``named_modules()``
order. Modules are normally registered in forward order, so that is its earliest use in
forward and hence the point in backward where its gradient is complete — the moment its
parameter can be overwritten without disturbing the rest of backward.

A frozen parameter (``requires_grad=False``: a LoRA base model, a frozen backbone) is in no
unit and never communicated: it cannot change, so averaging it would only send bytes — at the
end of backward, where nothing hides them, since it never gets a gradient. A module whose
parameters are all frozen and that has no floating buffer gives no unit. The frozen
parameters are kept aside (``SyncUnits.frozen``) so that the wrapper can check once, at
construction, that every rank holds the same ones (``agreement``). For a fully trainable model
the units, their names and their order are what they always were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SyncUnit", "SyncUnits", "sync_units", "units_fingerprint"]


@dataclass(frozen=True, eq=False)
class SyncUnit:
    """The trainable parameters and floating buffers one module owns directly.

    ``params`` and ``buffers`` keep their registration order; ``param_names`` and
    ``buffer_names`` are the qualified names, for messages and checkpoints.
    """

    name: str
    params: tuple[nn.Parameter, ...]
    buffers: tuple[torch.Tensor, ...]
    param_names: tuple[str, ...]
    buffer_names: tuple[str, ...]

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Everything averaged for this unit: parameter data, then buffers."""
        return tuple(p.data for p in self.params) + self.buffers

    @property
    def nbytes(self) -> int:
        """Bytes one all-reduce of this unit moves (parameters plus floating buffers)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    @property
    def signature(self) -> tuple[tuple[str, tuple[int, ...], str], ...]:
        """Names, shapes and dtypes: what must match across ranks."""
        return tuple(
            (name, tuple(t.shape), str(t.dtype)) for name, t in zip(self.param_names + self.buffer_names, self.tensors)
        )


class SyncUnits(list[SyncUnit]):
    """``sync_units``' result: the units, in order, and the frozen parameters they leave out.

    ``frozen`` holds ``(qualified name, parameter)`` of every ``requires_grad=False`` parameter,
    each once (first owner's name), in ``named_modules()`` order. Never averaged; checked
    identical across ranks at construction (``dreamddp.core.agreement``).
    """

    frozen: tuple[tuple[str, nn.Parameter], ...] = ()


def sync_units(model: nn.Module) -> SyncUnits:
    """Return the model's sync units in ``named_modules()`` (registration) order.

    Frozen parameters (``requires_grad=False``) are in no unit (see ``SyncUnits.frozen``);
    modules that own no trainable parameter and no floating buffer are skipped. Integer buffers
    (BatchNorm's ``num_batches_tracked``) are not averaged: every rank counts the same
    number of steps, and an average of counters is not a counter.
    Backward order is, for ordinary models, the reverse of this list.
    """
    seen: set[int] = set()
    units = SyncUnits()
    frozen: list[tuple[str, nn.Parameter]] = []
    for module_name, module in model.named_modules():
        params, param_names = [], []
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                frozen.append((_join(module_name, pname), p))
                continue
            params.append(p)
            param_names.append(_join(module_name, pname))
        buffers, buffer_names = [], []
        for bname, b in module.named_buffers(recurse=False):
            if b is None or not b.is_floating_point() or id(b) in seen:
                continue
            if bname in getattr(module, "_non_persistent_buffers_set", ()):
                continue  # derived tables (rotary cos/sin): identical by construction
            seen.add(id(b))
            buffers.append(b)
            buffer_names.append(_join(module_name, bname))
        if params or buffers:
            units.append(
                SyncUnit(
                    name=module_name or "<root>",
                    params=tuple(params),
                    buffers=tuple(buffers),
                    param_names=tuple(param_names),
                    buffer_names=tuple(buffer_names),
                )
            )
    units.frozen = tuple(frozen)
    return units


def units_fingerprint(units: list[SyncUnit]) -> str:
    """A short hash of every unit's names, shapes and dtypes (not values)."""
    digest = hashlib.sha256()
    for unit in units:
        digest.update(repr((unit.name, unit.signature)).encode())
    return digest.hexdigest()[:16]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name

"""What a scheduled synchronization does to a unit: average its weights, or apply an outer step to its delta.

``mode="average"`` (the paper, the default): the unit's weights become their mean across ranks.

``mode="delta"`` (DiLoCo's outer loop, per unit, on DreamDDP's layer schedule): each unit keeps
an *anchor*, its value at its last sync, identical on every rank. At the unit's slot every rank
sends its pseudo-gradient Δ = anchor − w (optionally compressed, with error feedback); the mean
Δ̄ updates the anchor through an outer optimizer, and the weights become the new anchor before
the local step. Outer SGD with lr 1 and no momentum is plain averaging (anchor − Δ̄ = mean w);
Nesterov momentum lets the period H grow without losing quality (DiLoCo: lr 0.7, momentum 0.9,
the defaults here). Validated once, here, with one line per bad value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dreamddp.core.compress import COMPRESSORS
from dreamddp.validation import is_int, is_number

__all__ = ["ANCHOR_DEVICES", "OUTER_OPTIMIZERS", "SYNC_MODES", "SyncOptions"]

SYNC_MODES = ("average", "delta")
OUTER_OPTIMIZERS = ("sgd", "nesterov")
ANCHOR_DEVICES = ("param", "cpu")
_OUTER_DEFAULTS = {"sgd": (1.0, 0.0), "nesterov": (0.7, 0.9)}  # (lr, momentum)


@dataclass(frozen=True)
class SyncOptions:
    """How scheduled units synchronize (see the module docstring).

    ``outer_lr``/``outer_momentum``: None takes the outer optimizer's default (sgd: 1, 0;
    nesterov: 0.7, 0.9). ``compress_block``: elements per int8 scale. ``anchor_device``: ``"param"``
    keeps anchors (and momentum, residuals) beside the weights; ``"cpu"`` keeps them in host
    memory, as DiLoCo does, copied to and from the device without blocking the host.
    """

    mode: str = "average"
    outer: str = "sgd"
    outer_lr: float | None = None
    outer_momentum: float | None = None
    compress: str = "none"
    compress_block: int = 256
    anchor_device: str = "param"
    prefix: str = "sync"  # how error messages name the options ("train" in the trainer)

    def __post_init__(self) -> None:
        p = self.prefix
        _one_of(self.mode_key, self.mode, SYNC_MODES)
        _one_of(f"{p}.outer", self.outer, OUTER_OPTIMIZERS)
        _one_of(f"{p}.compress", self.compress, COMPRESSORS)
        _one_of(f"{p}.anchor_device", self.anchor_device, ANCHOR_DEVICES)
        if self.outer_lr is not None and not (
            is_number(self.outer_lr) and math.isfinite(self.outer_lr) and self.outer_lr > 0
        ):
            raise ValueError(f"{p}.outer_lr must be a finite number > 0, got {self.outer_lr!r}")
        momentum = self.outer_momentum
        if momentum is not None and not (is_number(momentum) and 0.0 <= momentum < 1.0):
            raise ValueError(f"{p}.outer_momentum must be a number in [0, 1), got {momentum!r}")
        if self.outer == "nesterov" and momentum is not None and momentum == 0:
            raise ValueError(f"{p}.outer='nesterov' needs {p}.outer_momentum > 0, got 0")
        if not (is_int(self.compress_block) and self.compress_block >= 1):
            raise ValueError(f"{p}.compress_block must be an integer >= 1, got {self.compress_block!r}")
        if self.mode == "average":
            changed = [
                f"{name}={value!r}"
                for name, value, default in (
                    ("outer", self.outer, "sgd"),
                    ("outer_lr", self.outer_lr, None),
                    ("outer_momentum", self.outer_momentum, None),
                    ("compress", self.compress, "none"),
                    ("anchor_device", self.anchor_device, "param"),
                )
                if value != default
            ]
            if changed:
                raise ValueError(
                    f"{', '.join(f'{p}.{c}' for c in changed)} needs {self.mode_key}='delta' (averaging has no "
                    "anchor, outer optimizer or compressed payload)"
                )

    @property
    def mode_key(self) -> str:
        return "train.sync" if self.prefix == "train" else f"{self.prefix}.mode"

    @property
    def delta(self) -> bool:
        return self.mode == "delta"

    @property
    def lr(self) -> float:
        return float(self.outer_lr if self.outer_lr is not None else _OUTER_DEFAULTS[self.outer][0])

    @property
    def momentum(self) -> float:
        return float(self.outer_momentum if self.outer_momentum is not None else _OUTER_DEFAULTS[self.outer][1])

    @property
    def plain_average(self) -> bool:
        """The outer step is ``anchor − Δ̄``: no momentum buffer, buffers need no special case."""
        return self.lr == 1.0 and self.momentum == 0.0

    def describe(self) -> str:
        if not self.delta:
            return "average"
        outer = f"{self.outer}(lr={self.lr:g}, momentum={self.momentum:g})"
        compress = f", {self.compress}" + (f"/{self.compress_block}" if self.compress == "int8" else "")
        return f"delta, outer {outer}{compress if self.compress != 'none' else ''}"

    def fingerprint(self) -> tuple[str, str, float, float, str, int]:
        """What every rank must agree on (and a checkpoint must match): the arithmetic and the collectives."""
        return (self.mode, self.outer, self.lr, self.momentum, self.compress, self.compress_block)

    @classmethod
    def of(cls, sync: str | SyncOptions) -> SyncOptions:
        """``"average"``/``"delta"`` as options with every default, or the options themselves."""
        if isinstance(sync, SyncOptions):
            return sync
        if isinstance(sync, str):
            return cls(mode=sync)
        raise TypeError(f"sync must be 'average', 'delta' or a SyncOptions, got {type(sync).__name__}")


def _one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

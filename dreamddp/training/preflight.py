"""Checks of a run's inputs and outputs that must pass before any training starts."""

from __future__ import annotations

from pathlib import Path

from dreamddp.ops.outputs import check_writable
from dreamddp.training.config import ExperimentConfig

__all__ = ["check_output_paths"]

_DEFAULT_NAMES = {"trace": "trace.json", "log": "train.jsonl"}  # suggested when a directory is given


def check_output_paths(cfg: ExperimentConfig) -> None:
    """Output paths must be writable before training starts, not when it ends (one-line ValueError)."""
    tc = cfg.train
    for key in ("trace", "checkpoint_dir", "log"):
        value = getattr(tc, key)
        if not value:
            continue
        if key != "checkpoint_dir" and Path(value).is_dir():
            raise ValueError(
                f"train.{key} {value!r} is a directory; give a file path such as "
                f"{str(Path(value) / Path(_DEFAULT_NAMES[key]))!r}"
            )
        check_writable(f"train.{key}", value, Path(value) if key == "checkpoint_dir" else None)

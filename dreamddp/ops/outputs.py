"""Output paths, checked before the work that fills them.

A trace, log, checkpoint directory or schedule that cannot be written should fail in one
line at start-up, not after an hour of training or planning.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_writable"]


def check_writable(label: str, path: str, directory: Path | None = None) -> None:
    """Raise a one-line ``ValueError`` unless ``directory`` (default: the path's parent) can hold it.

    Missing folders are made. ``label`` names the setting in the message (``--out``,
    ``train.trace``).
    """
    directory = Path(path).parent if directory is None else directory
    hint = "give a path in a writable directory"
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{label} {path!r} cannot be written: {str(directory)!r} is a file, not a directory; {hint}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{label} {path!r} cannot be written: {err.strerror or err}; {hint}") from None
    if not os.access(directory, os.W_OK):
        raise ValueError(f"{label} {path!r} cannot be written: {str(directory)!r} is not writable; {hint}")

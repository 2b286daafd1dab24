"""The run's JSON-lines log (``train.log``), written by rank 0 only.

One record per line, flushed as written, so a run that dies still leaves every finished
iteration on disk; a resumed run appends to the log of the run it continues.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

__all__ = ["RankZeroLog"]


class RankZeroLog:
    """JSON lines written by rank 0 only; other ranks (and runs without ``train.log``) hold a closed log."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self._file: IO[str] | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - open for the run

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

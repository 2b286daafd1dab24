"""Versioned JSON files: written atomically, read with one-line errors.

Schedules and profiles are shared between processes and jobs; a reader must never see half
a file (temp file, fsync, rename), and a bad file must say what is wrong with which file.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read_json", "write_json_atomic"]


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """The parsed file; ValueError naming ``what`` and the path if missing or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what} file {os.fspath(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} file {os.fspath(path)!r} is not valid JSON: {err}") from None
    except OSError as err:  # a directory, no permission: still one line, never a stack trace
        raise ValueError(f"{what} file {os.fspath(path)!r} cannot be read: {err.strerror or err}") from None

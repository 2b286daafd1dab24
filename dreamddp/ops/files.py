"""Files that are written whole or not at all, and JSON read back with one-line errors.

Schedules, profiles, checkpoints, traces and benchmark results are shared between processes
and jobs; a reader must never see half a file. Every writer in the project goes through
``atomic_write``: the content goes to a temporary file beside the target, which is renamed
over it only once complete, so a crash leaves the old file or the new one. ``fsync`` makes
the content durable before the rename (files that are resumed from); ``fsync_dir`` makes the
rename itself durable (a checkpoint's commit mark).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "read_json", "write_json_atomic"]


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "w", *, fsync: bool = True, fsync_dir: bool = False
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit, rename it over ``path``.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. If the body raises, the temporary file is
    removed and ``path`` is left as it was. The temporary name carries the process id, so
    ranks writing beside each other never share one.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    tmp = target.with_name(f"{target.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync_dir:
        _fsync_directory(target.parent)


def _fsync_directory(path: Path) -> None:
    """Make a rename inside ``path`` durable: the directory entry must reach the disk too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, fsync_dir: bool = False) -> None:
    """``data`` as indented JSON with a final newline, written atomically and fsynced."""
    with atomic_write(path, fsync_dir=fsync_dir) as f:
        json.dump(data, f, indent=2)
        f.write("\n")


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

"""Byte-level language modelling on real text that every machine already has.

The corpus is the Python standard library's own source code: it is real,
varied text (code, comments, docstrings), needs no download (machines in a
geo-distributed run may have no internet access), and is byte-identical on
every machine running the same Python build, so all ranks agree on the data
without shipping it around.

What is left out, and why:

* ``site-packages`` / ``dist-packages``: their content depends on what each
  machine happens to have installed.
* Test suites (``test``, ``tests``, ``idle_test``) and the packages that
  Linux distributions split into separate, optional OS packages (``idlelib``,
  ``tkinter``, ``turtledemo``, ``lib2to3``, ``distutils``, ``ensurepip``,
  ``venv``): whether they are present varies between machines with the same
  Python version, and a missing file would shift every byte after it.
* ``_sysconfigdata_*.py`` and ``config-*/``: generated at build time and full
  of machine-specific paths.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamddp.training.data import check_positive, check_rank, step_generator
from dreamddp.validation import is_number, require

_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "__pycache__",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "venv",
    }
)


def _excluded_dir(name: str) -> bool:
    return name in _EXCLUDED_DIRS or name.startswith("config-")


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The corpus's ``*.py`` files under ``root`` (default: the stdlib), in corpus order.

    Order is by relative POSIX path, so it does not depend on the install
    prefix or on the file system's directory listing order.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    rel_paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                rel_paths.append((rel_dir / name).as_posix())
    return [root / rel for rel in sorted(rel_paths)]


@functools.lru_cache(maxsize=4)
def stdlib_bytes(max_bytes: int) -> bytes:
    """The first ``max_bytes`` bytes of the concatenated stdlib sources.

    Cached per process: walking and reading a few hundred files costs far more
    than the training steps of a small test run.  Files are read only until
    ``max_bytes`` (checked by the caller, ``ByteCorpus.from_stdlib``) is reached.
    """
    chunks: list[bytes] = []
    total = 0
    for path in stdlib_source_files():
        if total >= max_bytes:
            break
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
    if total == 0:
        raise RuntimeError(
            f"no Python sources found under {sysconfig.get_paths()['stdlib']!r}; "
            "this Python ships its stdlib compiled-only, use the 'synthetic' data set instead"
        )
    return b"".join(chunks)[:max_bytes]


@dataclass
class ByteCorpus:
    """Train/validation byte streams (``uint8`` tensors, one token per byte)."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_stdlib(cls, max_bytes: int = 4_000_000, val_fraction: float = 0.05) -> ByteCorpus:
        """Load up to ``max_bytes`` of stdlib source; the last ``val_fraction`` is validation.

        A tail split (instead of a random one) keeps validation text disjoint
        from training text at the file level, except for the one file that
        straddles the boundary.
        """
        require(is_number(val_fraction) and 0.0 < val_fraction < 1.0, "val_fraction", "in (0, 1)", val_fraction)
        check_positive(max_bytes=max_bytes)
        data = stdlib_bytes(max_bytes)
        n_val = max(1, int(len(data) * val_fraction))
        if len(data) - n_val < 1:
            raise ValueError(f"max_bytes={max_bytes} with val_fraction={val_fraction} leaves no training bytes")
        # bytearray: torch.frombuffer needs a writable buffer to avoid a warning;
        # this also copies, so callers cannot mutate the cached bytes.
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        split = len(data) - n_val
        return cls(train=tokens[:split].clone(), val=tokens[split:].clone())


class LMBatches:
    """Next-token batches from random windows of this rank's shard of ``tokens``.

    Rank ``r`` of ``world_size`` only ever reads the contiguous slice
    ``[r*N/W, (r+1)*N/W)``, so workers see different data, as in ordinary
    data-parallel training.  ``batch(step)`` depends only on
    ``(seed, rank, step)``.
    """

    def __init__(
        self,
        tokens: torch.Tensor,
        batch_size: int,
        seq_len: int,
        rank: int,
        world_size: int,
        seed: int,
        *,
        val_tokens: torch.Tensor | None = None,
    ) -> None:
        check_positive(batch_size=batch_size, seq_len=seq_len)
        check_rank(rank, world_size)
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        n = tokens.numel()
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        # Strictly longer than one window, so there are at least two offsets to draw from.
        if hi - lo <= seq_len + 1:
            raise ValueError(
                f"shard of rank {rank} has {hi - lo} tokens ({n} tokens / world_size={world_size}); "
                f"it must be longer than seq_len+1={seq_len + 1}"
            )
        self.shard = tokens[lo:hi]
        self.val_tokens = val_tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` int64 ``[B, T]`` with ``y[:, i] == x[:, i + 1]`` within each window."""
        gen = step_generator(self.seed, self.rank, step)
        n_offsets = self.shard.numel() - self.seq_len  # last start leaves room for seq_len+1 tokens
        starts = torch.randint(0, n_offsets, (self.batch_size,), generator=gen)
        window = self.shard[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def eval_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` batches of windows spread evenly over the validation tokens, in order.

        Spreading (rather than taking the first ``n_batches * B`` windows)
        makes a small evaluation budget still sample the whole validation
        text.  Windows overlap only if they cannot all fit side by side.
        """
        if self.val_tokens is None:
            raise ValueError("eval_batches needs validation tokens: pass val_tokens=... to LMBatches")
        val = self.val_tokens
        last_start = val.numel() - (self.seq_len + 1)
        if last_start < 0:
            raise ValueError(f"validation set has {val.numel()} tokens, fewer than seq_len+1={self.seq_len + 1}")
        n_windows = n_batches * self.batch_size
        starts = torch.linspace(0, last_start, n_windows, dtype=torch.float64).round().long()
        windows = val[starts[:, None] + torch.arange(self.seq_len + 1)].long()
        return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows.split(self.batch_size)]

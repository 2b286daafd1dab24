"""Training data sources behind one small protocol.

Every source is a pure function of ``(seed, rank, step)``: ``batch(step)``
holds no iterator state, so a run resumed from a checkpoint at step ``s`` sees
exactly the batches it would have seen, and no rank ever has to wait on or
agree with another rank about data.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch

from dreamddp.validation import is_int, positive_int, require

DATASETS: tuple[str, ...] = ("stdlib-bytes", "digits", "synthetic")


@runtime_checkable
class BatchSource(Protocol):
    """What the trainer needs from a data set."""

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets for training step ``step`` on this rank."""
        ...

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of up to ``n`` validation batches, identical on every call.

        ``n`` is ``train.eval_batches``, already checked (>= 1) where the config was loaded.
        """
        ...


def check_rank(rank: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= rank < world_size``."""
    positive_int("world_size", world_size, allowed="a positive int")
    require(is_int(rank) and 0 <= rank < world_size, "rank", f"in [0, world_size={world_size})", rank)


def check_positive(**values: int) -> None:
    """Raise ``ValueError`` naming the first argument that is not an int >= 1."""
    for name, value in values.items():
        positive_int(name, value, allowed="a positive int")


def step_generator(seed: int, rank: int, step: int, stream: str = "train") -> torch.Generator:
    """A CPU generator seeded from ``(stream, seed, rank, step)`` alone.

    Hashing (rather than e.g. ``seed + rank * K + step``) keeps the streams of
    different ranks and steps from colliding for any values, and does not
    depend on Python's per-process hash randomisation.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    key = f"{stream}:{seed}:{rank}:{step}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return gen


def build_data(
    name: str,
    *,
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    rank: int,
    world_size: int,
    seed: int,
    max_bytes: int = 4_000_000,
) -> BatchSource:
    """Build the data source ``name`` for this rank.

    ``seq_len`` and ``vocab_size`` only matter for token data; ``max_bytes``
    only for ``stdlib-bytes``.  Submodules are imported lazily so that, e.g.,
    a language-model run does not need scikit-learn.
    """
    if name == "stdlib-bytes":
        from dreamddp.training.data.text import ByteCorpus, LMBatches

        if vocab_size < 256:
            raise ValueError(f"stdlib-bytes needs vocab_size >= 256 (one id per byte), got {vocab_size}")
        corpus = ByteCorpus.from_stdlib(max_bytes=max_bytes)
        return LMBatches(corpus.train, batch_size, seq_len, rank, world_size, seed, val_tokens=corpus.val)
    if name == "digits":
        from dreamddp.training.data.digits import DigitsBatches

        return DigitsBatches(batch_size, rank, world_size, seed)
    if name == "synthetic":
        from dreamddp.training.data.synthetic import SyntheticTokens

        return SyntheticTokens(vocab_size, batch_size, seq_len, rank, world_size, seed)
    raise ValueError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")


__all__ = ["DATASETS", "BatchSource", "build_data", "check_positive", "check_rank", "step_generator"]

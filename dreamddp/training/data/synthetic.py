"""Uniformly random tokens, for throughput and communication benchmarks.

No file system access and no fixed data size, so any model or vocabulary size
can be benchmarked; the loss carries no information (it should sit at
``log(vocab_size)``).
"""

from __future__ import annotations

import torch

from dreamddp.training.data import check_positive, check_rank, step_generator


class SyntheticTokens:
    """Random ``(x, y)`` int64 ``[B, T]`` batches with ``y`` = ``x`` shifted by one."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, rank: int, world_size: int, seed: int) -> None:
        check_positive(vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len)
        check_rank(rank, world_size)
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rank = rank
        self.world_size = world_size
        self.seed = seed

    def _draw(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch determined by ``(seed, rank, step)``; ranks differ through ``rank``."""
        return self._draw(step_generator(self.seed, self.rank, step))

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` batches from a separate, rank-independent stream (same on every rank)."""
        return [self._draw(step_generator(self.seed, 0, i, stream="eval")) for i in range(n)]

"""scikit-learn's 8x8 handwritten digits as a tiny, offline image-classification task.

The data set (1,797 images) ships inside scikit-learn, so image runs need no
download; it is small enough that a ResNet trains on it in seconds on a CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from dreamddp.training.data import check_positive, check_rank, step_generator

VAL_FRACTION = 0.2
# Fixed, independent of the run seed: the validation set must be the same for
# every run so that validation losses are comparable across runs.
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train": (x, y), "val": (x, y)}``: x float32 ``[N, 1, 8, 8]`` in [0, 1], y int64.

    The permutation comes from numpy's legacy ``RandomState``, whose stream is
    guaranteed stable across numpy versions, so the split is the same on every
    machine.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    order = torch.from_numpy(np.random.RandomState(SPLIT_SEED).permutation(len(labels)))
    images, labels = images[order], labels[order]
    n_val = int(round(len(labels) * VAL_FRACTION))
    split = len(labels) - n_val
    return {
        "train": (images[:split], labels[:split]),
        "val": (images[split:], labels[split:]),
    }


class DigitsBatches:
    """Image batches ``(x [B, 1, 8, 8] float32, y [B] int64)`` from this rank's shard.

    ``split`` selects which part ``batch(step)`` samples from; rank ``r`` only
    samples its own contiguous ``1/world_size`` of it (the split is already
    shuffled, so contiguous shards are class-balanced in expectation).
    ``eval_batches`` always uses the validation split, unsharded.
    """

    def __init__(self, batch_size: int, rank: int, world_size: int, seed: int, split: str = "train") -> None:
        check_positive(batch_size=batch_size)
        check_rank(rank, world_size)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = load_digits_split()
        x, y = data[split]
        n = len(y)
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        if hi - lo < batch_size:
            raise ValueError(
                f"shard of rank {rank} has {hi - lo} {split} images ({n} / world_size={world_size}); "
                f"batch_size={batch_size} is larger"
            )
        self.x, self.y = x[lo:hi], y[lo:hi]
        self.val_x, self.val_y = data["val"]
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.split = split

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` distinct images of the shard, chosen by ``(seed, rank, step)``."""
        gen = step_generator(self.seed, self.rank, step)
        idx = torch.randperm(len(self.y), generator=gen)[: self.batch_size]
        return self.x[idx], self.y[idx]

    def eval_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``n`` consecutive full batches of the validation set, in order.

        Only full batches, so a mean of per-batch losses weights every image
        equally; if the validation set is smaller than one batch, it is
        returned whole as a single batch.
        """
        total = len(self.val_y)
        if total < self.batch_size:
            return [(self.val_x, self.val_y)]
        count = min(n, total // self.batch_size)
        b = self.batch_size
        return [(self.val_x[i * b : (i + 1) * b], self.val_y[i * b : (i + 1) * b]) for i in range(count)]

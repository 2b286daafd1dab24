"""Data sources: determinism, sharding, shapes and argument validation."""

from __future__ import annotations

import pytest
import torch

from dreamddp.training.data import BatchSource, build_data, step_generator
from dreamddp.training.data.digits import DigitsBatches, load_digits_split
from dreamddp.training.data.synthetic import SyntheticTokens
from dreamddp.training.data.text import ByteCorpus, LMBatches, stdlib_source_files

SMALL_BYTES = 200_000


@pytest.fixture(scope="module")
def corpus() -> ByteCorpus:
    return ByteCorpus.from_stdlib(max_bytes=SMALL_BYTES)


def _lm(corpus: ByteCorpus, rank: int = 0, world_size: int = 2, seed: int = 1) -> LMBatches:
    return LMBatches(corpus.train, 4, 32, rank, world_size, seed, val_tokens=corpus.val)


def test_corpus_split_deterministic_and_nonempty(corpus: ByteCorpus) -> None:
    assert corpus.train.dtype == torch.uint8
    assert corpus.train.numel() + corpus.val.numel() == SMALL_BYTES
    assert corpus.val.numel() == int(SMALL_BYTES * 0.05)
    again = ByteCorpus.from_stdlib(max_bytes=SMALL_BYTES)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    # The split is a tail split of one byte stream.
    longer = ByteCorpus.from_stdlib(max_bytes=SMALL_BYTES, val_fraction=0.5)
    assert torch.equal(torch.cat([longer.train, longer.val]), torch.cat([corpus.train, corpus.val]))


def test_corpus_is_real_python_source(corpus: ByteCorpus) -> None:
    files = stdlib_source_files()
    rel = [p.as_posix() for p in files]
    assert rel == sorted(rel)
    assert not any("site-packages" in p or "/test/" in p for p in rel)
    first = files[0].read_bytes()
    assert bytes(corpus.train[: len(first)].tolist()) == first[:SMALL_BYTES]
    assert b"def " in bytes(corpus.train[:50_000].tolist())


def test_lm_batch_deterministic(corpus: ByteCorpus) -> None:
    a, b = _lm(corpus), _lm(corpus)
    for step in (0, 1, 57):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(_lm(corpus, seed=2).batch(0)[0], a.batch(0)[0])


def test_lm_batch_shapes_and_shift(corpus: ByteCorpus) -> None:
    x, y = _lm(corpus).batch(3)
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 256 and int(x.min()) >= 0


def test_lm_ranks_read_their_own_shard(corpus: ByteCorpus) -> None:
    r0, r1 = _lm(corpus, rank=0), _lm(corpus, rank=1)
    assert not torch.equal(r0.batch(0)[0], r1.batch(0)[0])
    half = corpus.train.numel() // 2
    assert torch.equal(r0.shard, corpus.train[:half])
    assert torch.equal(r1.shard, corpus.train[half:])
    # Every window of rank 1 must come from rank 1's half.
    x, y = r1.batch(5)
    windows = r1.shard.unfold(0, 33, 1).long()
    for row_x, row_y in zip(x, y):
        full = torch.cat([row_x, row_y[-1:]])
        assert (windows == full).all(dim=1).any()


def test_lm_eval_batches(corpus: ByteCorpus) -> None:
    src = _lm(corpus)
    batches = src.eval_batches(3)
    assert len(batches) == 3
    again = _lm(corpus, rank=1, seed=9).eval_batches(3)
    for (x, y), (x2, y2) in zip(batches, again):
        assert x.shape == (4, 32)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(x[:, 1:], y[:, :-1])
    # Starts at the beginning of the validation set and ends at its end.
    assert torch.equal(batches[0][0][0], corpus.val[:32].long())
    assert torch.equal(batches[-1][1][-1], corpus.val[-32:].long())


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
        ({"seq_len": 0}, "seq_len must be a positive int, got 0"),
        ({"rank": 2}, "got 2"),
        ({"seq_len": 200}, "seq_len+1=201"),
    ],
)
def test_lm_bad_arguments(kwargs: dict, needle: str) -> None:
    args = {"batch_size": 2, "seq_len": 8, "rank": 0, "world_size": 2, "seed": 0, **kwargs}
    tokens = torch.arange(300) % 256
    with pytest.raises(ValueError) as info:
        LMBatches(tokens, **args)
    assert needle in str(info.value)


def test_bad_corpus_arguments() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        ByteCorpus.from_stdlib(max_bytes=1000, val_fraction=1.0)
    with pytest.raises(ValueError, match="max_bytes must be a positive int, got 0"):
        ByteCorpus.from_stdlib(max_bytes=0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        step_generator(0, 0, -1)


def test_digits_shapes_and_ranges() -> None:
    split = load_digits_split()
    (xt, yt), (xv, yv) = split["train"], split["val"]
    assert len(yt) + len(yv) == 1797
    assert len(yv) == 359 and xv.shape == (359, 1, 8, 8)
    assert xt.shape[1:] == (1, 8, 8) and xt.dtype == torch.float32
    assert float(xt.min()) == 0.0 and float(xt.max()) == 1.0
    assert yt.dtype == torch.int64 and set(yt.tolist()) == set(range(10))
    src = DigitsBatches(16, 0, 1, 0)
    x, y = src.batch(0)
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert len(torch.unique(x.flatten(1), dim=0)) == 16  # sampled without replacement


def test_digits_deterministic_sharded_and_eval() -> None:
    a, b = DigitsBatches(8, 1, 2, 3), DigitsBatches(8, 1, 2, 3)
    assert torch.equal(a.batch(4)[0], b.batch(4)[0])
    other = DigitsBatches(8, 0, 2, 3)
    assert not torch.equal(other.batch(4)[0], a.batch(4)[0])
    assert len(a.x) + len(other.x) == len(load_digits_split()["train"][1])
    # Rank 1's images are all drawn from its own shard.
    x, _ = a.batch(7)
    shard = a.x.flatten(1)
    for img in x.flatten(1):
        assert (shard == img).all(dim=1).any()
    ev = a.eval_batches(100)
    assert len(ev) == 359 // 8
    val_x, _ = load_digits_split()["val"]
    assert torch.equal(ev[0][0], val_x[:8])
    assert torch.equal(ev[1][0], other.eval_batches(2)[1][0])


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        DigitsBatches(0, 0, 1, 0)
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        DigitsBatches(8, 0, 1, 0, split="test")
    with pytest.raises(ValueError, match="batch_size=5000"):
        DigitsBatches(5000, 0, 1, 0)
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        DigitsBatches(8, 0, 0, 0)


def test_synthetic_tokens() -> None:
    a, b = SyntheticTokens(50, 3, 7, 0, 2, 5), SyntheticTokens(50, 3, 7, 0, 2, 5)
    x, y = a.batch(2)
    assert x.shape == (3, 7) and x.dtype == torch.int64
    assert torch.equal(x, b.batch(2)[0]) and torch.equal(x[:, 1:], y[:, :-1])
    assert int(x.max()) < 50
    assert not torch.equal(x, SyntheticTokens(50, 3, 7, 1, 2, 5).batch(2)[0])
    ev = a.eval_batches(2)
    assert len(ev) == 2 and torch.equal(ev[1][0], SyntheticTokens(50, 3, 7, 1, 2, 5).eval_batches(2)[1][0])
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 0"):
        SyntheticTokens(0, 3, 7, 0, 1, 0)


def test_build_data() -> None:
    common = {"batch_size": 4, "seq_len": 16, "vocab_size": 256, "rank": 0, "world_size": 2, "seed": 0}
    lm = build_data("stdlib-bytes", **common, max_bytes=SMALL_BYTES)
    digits = build_data("digits", **common)
    synth = build_data("synthetic", **common)
    for src in (lm, digits, synth):
        assert isinstance(src, BatchSource)
        x, y = src.batch(0)
        assert len(x) == len(y) == 4
    assert isinstance(lm, LMBatches) and lm.eval_batches(1)[0][0].shape == (4, 16)
    assert digits.batch(0)[0].shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="choose one of: stdlib-bytes, digits, synthetic"):
        build_data("imagenet", **common)
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        build_data("stdlib-bytes", **{**common, "vocab_size": 100}, max_bytes=SMALL_BYTES)

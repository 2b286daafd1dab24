"""What checksumming costs a checkpoint: the 25M-parameter GPT's rank file saved with and without it.

The trainer's rank file (model, AdamW state after one step, RNG streams) is written the way
``Checkpointer.save`` writes it — temporary name, fsync, rename — once plainly and once through
the digesting writer that takes its SHA-256 as it goes; and then verified as a resume does
(read back and hashed). Interleaved repeats, medians; a markdown table on stdout.

    python benchmarks/checkpoint_overhead.py [--repeats 5] [--dir /tmp] [--set model.d_model=512 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dreamddp.ops.checkpoint import capture_rng, file_digest, save_atomic
from dreamddp.ops.files import atomic_write
from dreamddp.training.config import load_config
from dreamddp.training.models import build_model
from dreamddp.training.strategies import build_optimizer

GPT_25M = [
    'model.name="gpt"',
    "model.vocab_size=256",
    "model.block_size=32",
    "model.n_layer=8",
    "model.n_head=8",
    "model.d_model=512",
]


def _plain_save(obj: object, path: Path) -> None:
    with atomic_write(path, "wb", fsync_dir=True) as f:
        torch.save(obj, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, GPT_25M + args.set)
    model = build_model(cfg.model_name, cfg.model_options)
    optimizer = build_optimizer(cfg.train, model.parameters())
    model(torch.randint(0, 256, (2, 32)))[0].float().sum().backward()
    optimizer.step()  # AdamW's two moments exist, as in any checkpoint after the first iteration
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng()}
    params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"plain": [], "checksummed": [], "verify": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "rank-00000.pt"
        for _ in range(args.repeats):
            start = time.perf_counter()
            _plain_save(state, path)
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            save_atomic(state, path)
            times["checksummed"].append(time.perf_counter() - start)
            start = time.perf_counter()
            file_digest(path)
            times["verify"].append(time.perf_counter() - start)
        size = path.stat().st_size
    plain, summed, verify = (statistics.median(times[k]) for k in ("plain", "checksummed", "verify"))
    print(f"GPT {cfg.model_options}: {params / 1e6:.1f} M parameters, rank file {size / 2**20:.0f} MiB;")
    print(f"{args.repeats} interleaved repeats, medians.\n")
    print("| | seconds | share of the plain save |")
    print("|---|---:|---:|")
    print(f"| save, plain (atomic + fsync) | {plain:.3f} | 100% |")
    print(f"| save, checksummed as written | {summed:.3f} | {100 * summed / plain:.0f}% |")
    print(f"| checksum overhead on the save | {summed - plain:+.3f} | {100 * (summed - plain) / plain:+.1f}% |")
    print(f"| verify on resume (read + SHA-256) | {verify:.3f} | {100 * verify / plain:.0f}% |")


if __name__ == "__main__":
    main()

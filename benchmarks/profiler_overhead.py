"""How much profiling slows an iteration: profile_compute's hooks vs the same loop without them.

Single process, the tiny GPT of configs/gpt-tiny.toml, interleaved repeats; reports the
ratio of median iteration times (target: at most 1.2x).

    python benchmarks/profiler_overhead.py [--iters 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dreamddp.training.config import load_config
from dreamddp.training.data import build_data
from dreamddp.training.loss import loss_for_task
from dreamddp.training.models import build_model, model_task
from dreamddp.training.strategies import build_optimizer
from profiler import profile_compute

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt-tiny.toml"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    model = build_model(cfg.model_name, cfg.model_options)
    optimizer = build_optimizer(cfg.train, model.parameters())
    data = build_data(
        cfg.data.name,
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        vocab_size=256,
        rank=0,
        world_size=1,
        seed=0,
        max_bytes=cfg.data.max_bytes,
    )
    loss_fn = loss_for_task(model_task(cfg.model_name))

    warmup, plain, profiled = 3, [], []
    for rep in range(args.repeats):
        start = time.perf_counter()
        for step in range(warmup + args.iters):
            x, y = data.batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            optimizer.step()
        plain.append((time.perf_counter() - start) / (warmup + args.iters))
        start = time.perf_counter()
        profile_compute(model, data.batch, loss_fn, iters=args.iters, warmup=warmup, optimizer=optimizer)
        profiled.append((time.perf_counter() - start) / (warmup + args.iters))
        print(
            f"repeat {rep + 1}: plain {plain[-1] * 1e3:.1f} ms/it, profiled {profiled[-1] * 1e3:.1f} ms/it", flush=True
        )
    ratio = statistics.median(profiled) / statistics.median(plain)
    print(
        f"\nprofiled / plain iteration time (wall, same loop, same batches): {ratio:.3f}x "
        f"(median of {args.repeats} interleaved repeats)"
    )


if __name__ == "__main__":
    main()

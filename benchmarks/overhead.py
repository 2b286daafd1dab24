"""DreamDDP's own overhead against torch DDP on a fast link (no simulated delay).

Runs, interleaved and repeated in one invocation so machine noise hits every method alike:
- ``ssgd``: torch DistributedDataParallel;
- ``dreamddp (every step)``: DreamDDP with ``Schedule.every_step`` — the same traffic as DDP,
  so any difference is the wrapper's own cost (hooks, bucketing, waits);
- ``dreamddp (H=4)``: DreamDDP with PLSGD's schedule, what a user would run;
- ``none``: no communication, the floor.
Reports median time per iteration and peak RSS (the largest over ranks) as ratios to DDP.

    python benchmarks/overhead.py [--nproc 2] [--repeats 3] [--steps 40] [--set model.d_model=512 ...]

Peak RSS of a small model is mostly the interpreter and torch; to see what each method
allocates, run a larger model too (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from dreamddp import Schedule, sync_units
from dreamddp.tools.runner import run_torchrun
from dreamddp.training.config import load_config
from dreamddp.training.models import build_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "gpt-tiny.toml"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "overhead.md"))
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()

    cfg = load_config(args.config, args.set)
    names = [u.name for u in sync_units(build_model(cfg.model_name, cfg.model_options))]
    with tempfile.TemporaryDirectory() as tmp:
        every = Path(tmp) / "every_step.json"
        Schedule.every_step(names).to_json(every)
        variants = {
            "ssgd (torch DDP)": ["train.algorithm=ssgd"],
            "dreamddp, every step": ["train.algorithm=dreamddp", f"train.schedule={every}", "train.period=1"],
            "dreamddp, H=4 (PLSGD groups)": ["train.algorithm=plsgd", "train.period=4"],
            "none (no communication)": ["train.algorithm=none"],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        rss: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(args.repeats):
            for name, overrides in variants.items():
                common = [f"train.steps={args.steps}", "train.progress=false", "train.link=", *args.set]
                s = run_torchrun(args.config, common + overrides, Path(tmp) / "log.jsonl", nproc=args.nproc)
                times[name].append(s["iter_s_median"])
                rss[name].append(s["peak_rss_mb"])
                print(
                    f"repeat {rep + 1}/{args.repeats} {name}: {s['iter_s_median']:.4f} s/it, peak RSS {s['peak_rss_mb']:.0f} MB",
                    flush=True,
                )

    base_t = statistics.median(times["ssgd (torch DDP)"])
    base_m = statistics.median(rss["ssgd (torch DDP)"])
    lines = [
        f"Fast link (no simulated delay), {args.nproc} workers, {cfg.model_name} {cfg.model_options}, "
        f"{args.steps} iterations x {args.repeats} interleaved repeats; medians.",
        "",
        "| method | time / iteration (s) | vs DDP | peak RSS (MB) | vs DDP | RSS above no-comm (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor_m = statistics.median(rss["none (no communication)"])
    for name in variants:
        t, m = statistics.median(times[name]), statistics.median(rss[name])
        lines.append(f"| {name} | {t:.4f} | {t / base_t:.3f}x | {m:.0f} | {m / base_m:.3f}x | {m - floor_m:+.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

"""Which outer optimizer settings keep quality: validation loss at equal iterations, no link needed.

``sync="delta"`` steps each unit's anchor with the mean pseudo-gradient through an outer
optimizer. DiLoCo's Nesterov (lr 0.7, momentum 0.9) was tuned for periods of hundreds of
steps; in steady state it moves an anchor lr/(1-momentum) = 7 times the ranks' mean progress
per sync, which at DreamDDP's short periods can overshoot. This sweeps outer settings against
plain averaging (outer SGD, lr 1) at given periods, on the planner-free PLSGD schedule, and
reports the validation loss at equal iterations — a quantity that does not depend on timing,
so the sweep may share the machine with other work. Every setting runs for ``--seeds`` seeds;
mean and spread (half the range) are reported. ``--ssgd`` also trains synchronous SGD (torch
DDP, every step) on the same seeds, once per seed, for a "vs S-SGD" column.

    python benchmarks/outer_sweep.py [--config configs/gpt-tiny.toml] [--steps 100] [--periods 4 32]
        [--settings sgd:1:0 nesterov:0.7:0.9 ...] [--compress none] [--seeds 3] [--ssgd]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from dreamddp.tools.runner import run_torchrun

OUT = Path(__file__).resolve().parent / "results" / "outer-sweep.md"
DEFAULT_SETTINGS = ["sgd:1:0", "nesterov:0.7:0.9", "nesterov:0.3:0.9", "nesterov:0.1:0.9", "nesterov:0.5:0.5"]


def overrides_for(setting: str, period: int, steps: int, seed: int, compress: str) -> list[str]:
    """``outer:lr:momentum`` as train.* keys (``sgd:1:0`` is plain averaging, run as delta sync)."""
    outer, lr, momentum = setting.split(":")
    return [
        "train.algorithm=plsgd",
        f"train.period={period}",
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.eval_every={steps}",
        "train.progress=false",
        "train.sync=delta",
        f"train.outer={outer}",
        f"train.outer_lr={lr}",
        f"train.outer_momentum={momentum}",
        f"train.compress={compress}",
    ]


def ssgd_overrides(steps: int, seed: int) -> list[str]:
    """The S-SGD reference: torch DDP, every step, same data and seed."""
    return [
        "train.algorithm=ssgd",
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.eval_every={steps}",
        "train.progress=false",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-tiny.toml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--periods", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, metavar="OUTER:LR:MOMENTUM")
    parser.add_argument("--compress", default="none")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ssgd", action="store_true", help="also train S-SGD on the same seeds (reference column)")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    losses: dict[tuple[int, str], list[float]] = {}
    ssgd: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):  # seeds outermost: drift hits every setting alike
            if args.ssgd:
                log = Path(tmp) / f"ssgd-s{seed}.jsonl"
                summary = run_torchrun(args.config, ssgd_overrides(args.steps, seed), log, env={"OMP_NUM_THREADS": "1"})
                ssgd.append(summary["val_loss"])
                print(f"ssgd seed {seed}: val loss {summary['val_loss']:.4f}", flush=True)
            for period in args.periods:
                for setting in args.settings:
                    log = Path(tmp) / f"h{period}-{setting.replace(':', '_')}-s{seed}.jsonl"
                    summary = run_torchrun(
                        args.config,
                        overrides_for(setting, period, args.steps, seed, args.compress),
                        log,
                        env={"OMP_NUM_THREADS": "1"},
                    )
                    losses.setdefault((period, setting), []).append(summary["val_loss"])
                    print(f"H={period} {setting} seed {seed}: val loss {summary['val_loss']:.4f}", flush=True)
    lines = [
        f"Validation loss after {args.steps} iterations, `{args.config}`, 2 ranks, PLSGD schedule, "
        f"delta sync (payload {args.compress}), {args.seeds} seeds: mean ± half the range.",
        "",
        "Command: `python benchmarks/outer_sweep.py " + " ".join(_argv(args)) + "`",
        "",
        "| H | outer (lr, momentum) | val loss | vs averaging |" + (" vs S-SGD |" if ssgd else ""),
        "|---:|---|---:|---:|" + ("---:|" if ssgd else ""),
    ]
    if ssgd:
        mean, spread = statistics.mean(ssgd), (max(ssgd) - min(ssgd)) / 2
        lines.append(f"| – | S-SGD (torch DDP) | {mean:.3f} ± {spread:.3f} | | |")
    for period in args.periods:
        base = statistics.mean(losses[(period, args.settings[0])])
        for setting in args.settings:
            values = losses[(period, setting)]
            mean, spread = statistics.mean(values), (max(values) - min(values)) / 2
            outer, lr, momentum = setting.split(":")
            versus = f" {mean / statistics.mean(ssgd) - 1:+.1%} |" if ssgd else ""
            lines.append(
                f"| {period} | {outer} ({lr}, {momentum}) | {mean:.3f} ± {spread:.3f} | {mean / base - 1:+.1%} |{versus}"
            )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _argv(args: argparse.Namespace) -> list[str]:
    return [
        f"--config {args.config}",
        f"--steps {args.steps}",
        "--periods " + " ".join(map(str, args.periods)),
        "--settings " + " ".join(args.settings),
        f"--compress {args.compress}",
        f"--seeds {args.seeds}",
        *(["--ssgd"] if args.ssgd else []),
    ]


if __name__ == "__main__":
    main()

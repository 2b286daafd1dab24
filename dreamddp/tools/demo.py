"""``make demo``: S-SGD, Local SGD and DreamDDP side by side over a simulated slow link.

Profiles the tiny GPT on the cluster (``dreamddp profile``, over the same link), plans
DreamDDP's schedule from that profile (``dreamddp.plan``, for whichever of the wrapper's
overlap modes it predicts faster), then runs the model on the standard-library byte corpus
with torchrun per algorithm — same model, same data, same link (default 100 Mbit/s, 20 ms per
collective) — plus a run with no communication at all, the compute-only reference. Each is
run ``--repeats`` times, round-robin, and the run with the median time is reported: a noisy
stretch on a shared machine then hits every algorithm alike instead of inverting the table. PLSGD (equal-bytes contiguous groups, no profile) is shown too,
so the planner's contribution is visible on its own, and ``dreamddp-int8``: the same planned
schedule's syncs sent as int8 deltas with error feedback (``train.sync=delta``): a quarter of
the bytes. Then prints, per algorithm, the time per iteration,
the MB each rank sent per iteration, the link time it used per iteration, the share of that
link time hidden behind computation, and the final validation loss.

Hidden share = 1 - exposed / link time, where exposed = (iteration time - compute-only
iteration time): one definition for every algorithm, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dreamddp.planning import plan, simulate
from dreamddp.planning.profile import Profile
from dreamddp.tools.runner import TrainRunFailed, median_run, run_torchrun, torchrun

REPO = Path(__file__).resolve().parents[2]  # dreamddp/tools/demo.py -> the checkout
DEFAULT_CONFIG = REPO / "configs" / "gpt-tiny.toml"
# Demo rows that run DreamDDP's planned schedule with other train.* keys.
VARIANTS = {"dreamddp-int8": ("train.sync=delta", "train.compress=int8")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamddp demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument(
        "--nproc",
        type=int,
        default=2,
        help="workers (torchrun --nproc-per-node). Keep it <= the number of cores: an oversubscribed "
        "CPU lends a waiting rank's core to the others, which flatters every algorithm that waits",
    )
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="runs per algorithm, interleaved; the median is shown")
    parser.add_argument("--period", type=int, default=4, help="H for the local methods")
    parser.add_argument("--link", default="100mbit,20ms", help="simulated link, e.g. 100mbit,20ms")
    parser.add_argument("--algorithms", default="ssgd,local_sgd,plsgd,dreamddp,dreamddp-int8")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args(argv)
    for flag in ("nproc", "steps", "period", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    return args


def plan_schedule(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """Profile on the live (simulated-link) cluster, then plan: the schedule DreamDDP trains with
    (``dreamddp``, and ``dreamddp-int8``, which sends the same syncs as int8 deltas)."""
    profile_path, schedule_path = out / "profile.json", out / "schedule.json"
    extra = [x for item in [f"train.link={args.link}", *args.set] for x in ("--set", item)]
    try:
        torchrun(
            [
                "dreamddp.cli",
                "profile",
                "--config",
                args.config,
                "--out",
                str(profile_path),
                "--iters",
                "10",
                "--warmup",
                "3",
                *extra,
            ],
            nproc=args.nproc,
        )
    except TrainRunFailed as err:
        raise SystemExit(f"dreamddp demo: profiling failed: {err}") from None
    profile = Profile.from_json(profile_path)
    # The planner's best mode: the schedule (and with it the wrapper's overlap) predicted fastest.
    candidates = [plan(profile, args.period, overlap=overlap) for overlap in ("backward", "forward")]
    schedule = min(candidates, key=lambda s: simulate(profile, s).iteration_s)
    schedule.to_json(schedule_path)
    predicted = simulate(profile, schedule).iteration_s
    print(
        f"  profiled {len(profile.units)} units and planned H={args.period} for {schedule.overlap} overlap "
        f"({schedule.syncs_per_period()} syncs per period; predicted {predicted:.3f} s/iteration)",
        flush=True,
    )
    return {"dreamddp": schedule_path, "dreamddp-int8": schedule_path}


def run_algorithm(
    args: argparse.Namespace, algorithm: str, out: Path, schedules: dict[str, Path] | None = None, repeat: int = 0
) -> dict[str, Any]:
    schedule = (schedules or {}).get(algorithm)
    overrides = [
        f"train.algorithm={'dreamddp' if algorithm in VARIANTS else algorithm}",
        f"train.steps={args.steps}",
        f"train.period={args.period}",
        f"train.link={args.link}",
        "train.progress=false",
        *([f"train.schedule={schedule}"] if schedule is not None else []),
        *VARIANTS.get(algorithm, ()),
        *args.set,
    ]
    try:
        summary = run_torchrun(args.config, overrides, out / f"{algorithm}-r{repeat}.jsonl", nproc=args.nproc)
    except TrainRunFailed as err:
        raise SystemExit(f"dreamddp demo: {algorithm} failed: {err}") from None
    summary.pop("records")
    return summary


def hidden_share(summary: dict[str, Any], compute_s: float) -> float | None:
    busy = summary.get("channel_busy_s_per_iter")
    if not busy:
        return None
    exposed = max(0.0, summary["iter_s"] - compute_s)
    return max(0.0, min(1.0, 1.0 - exposed / busy))


def format_table(results: dict[str, dict[str, Any]], compute_s: float) -> str:
    base = results.get("ssgd", {}).get("iter_s")
    rows = [
        "| algorithm | time / iteration (s) | speed-up vs S-SGD | MB / iteration | link time / iteration (s) "
        "| comm hidden | final val loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| compute only (no comm) | {compute_s:.3f} | | | | | |",
    ]
    for name, s in results.items():
        share = hidden_share(s, compute_s)
        speedup = f"{base / s['iter_s']:.2f}x" if base else ""
        hidden = "n/a" if share is None else f"{share:.0%}"
        rows.append(
            f"| {name} | {s['iter_s']:.3f} | {speedup} | {s['bytes_per_iter'] / 1e6:.3f} "
            f"| {s['channel_busy_s_per_iter']:.3f} | {hidden} | {s['val_loss']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Once each, and never "none": the compute-only reference is always run, as the table's first row.
    algorithms = list(dict.fromkeys(a.strip() for a in args.algorithms.split(",") if a.strip() and a.strip() != "none"))
    print(
        f"dreamddp demo: {args.nproc} workers, tiny GPT on stdlib bytes, simulated link {args.link}, "
        f"H={args.period}, {args.steps} iterations per run, {args.repeats} runs each (interleaved; medians shown)",
        flush=True,
    )
    planned = any(a == "dreamddp" or a in VARIANTS for a in algorithms)
    schedules = plan_schedule(args, out) if planned else None
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ["none", *algorithms]}
    for repeat in range(args.repeats):  # round-robin: drift on the machine hits every algorithm alike
        for algorithm in runs:
            summary = run_algorithm(args, algorithm, out, schedules, repeat)
            runs[algorithm].append(summary)
            label = "compute only" if algorithm == "none" else algorithm
            print(f"  {label}: {summary['iter_s']:.3f} s/iteration ({summary['wall_s']:.0f} s)", flush=True)
    reference = median_run(runs.pop("none"))
    compute_s = reference["iter_s"]
    results = {name: median_run(summaries) for name, summaries in runs.items()}
    table = format_table(results, compute_s)
    print()
    print(table)
    notes = [s["note"] for s in results.values() if s.get("note")]
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    (out / "summary.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"compute_only": reference, "results": results}, indent=2) + "\n")
    print(f"\nper-iteration logs and summary in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

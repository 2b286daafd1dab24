"""The WAN drops mid-run: a static schedule against live re-planning (``train.replan_every``).

On the emulated cluster (2 sites x 1 process, ``tc``-shaped uplinks), the model is profiled and
its schedule planned at the starting rate; then each variant trains for ``--steps`` iterations
while a watcher drops every uplink to ``--to`` (``dreamddp cluster shape``'s call) once the job
has logged iteration ``--drop-at``. Variants, run ``--repeats`` times interleaved (medians):

- ``static``: the schedule planned before the drop, kept;
- ``replan``: the same start, re-planned every ``--replan-every`` periods from the job's timings;
- ``replan-auto``: ``train.period = "auto"`` (H chosen from the profile, and again at each re-plan).

Reported: mean s/iteration before the drop (after warm-up) and after it (from the first full
period after the drop), and the s/iteration predicted for the planned schedule at each rate.

    python benchmarks/replan_wan_drop.py [--config configs/gpt-tiny.toml] [--steps 120] [--drop-at 40]
        [--from-rate 100mbit] [--to-rate 20mbit] [--delay 20ms] [--period 4] [--replan-every 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from dreamddp.emulation import netns
from dreamddp.emulation.link import LinkSpec
from dreamddp.planning import plan, simulate
from dreamddp.planning.cli import reprice
from dreamddp.planning.profile import Profile
from dreamddp.tools.bench.run import BenchConfig, Cluster
from dreamddp.tools.runner import read_summary

OUT = Path(__file__).resolve().parent / "results" / "replan-wan-drop.md"


def watch_and_drop(log: Path, drop_at: int, name: str, rate: str, stop: threading.Event) -> None:
    """Shape the cluster's uplinks to ``rate`` once ``log`` has a record of iteration ``drop_at``."""
    while not stop.is_set():
        if log.exists():
            for line in log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if record.get("step", -1) >= drop_at and "loss" in record:
                    netns.shape(name, rate)
                    return
        time.sleep(0.05)


def iteration_times(summary: dict) -> dict[int, float]:
    """step -> seconds, from a run's records (``read_summary``)."""
    return {r["step"]: r["iter_s"] for r in summary["records"] if "iter_s" in r and "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt-tiny.toml")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--drop-at", type=int, default=40)
    parser.add_argument("--from-rate", default="100mbit")
    parser.add_argument("--to-rate", default="20mbit")
    parser.add_argument("--delay", default="20ms")
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--replan-every", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default="runs/replan-wan-drop")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    link = f"{args.from_rate},{args.delay}"
    cfg = BenchConfig(configs=[args.config], links=[link], period=args.period, steps=args.steps, name="dreamddpr")
    cluster = Cluster(cfg, link, "netns", work)
    # After the drop: from the first re-plan that can have seen it (a period of the longest H we
    # expect, twice) on, so that re-planning is judged once it has had a chance to act.
    warmup, after_from = 3, args.drop_at + 2 * args.period * (1 + args.replan_every)
    times: dict[str, list[tuple[float, float]]] = {"static": [], "replan": [], "replan-auto": []}
    periods: dict[str, list[int]] = {name: [] for name in times}
    with cluster.up():
        profile_path, schedule_path = work / "profile.json", work / "schedule.json"
        cluster.run_module(["dreamddp.cli", "profile", "--config", args.config, "--out", str(profile_path)], "profile")
        profile = Profile.from_json(profile_path)
        schedule = plan(profile, args.period)
        schedule.to_json(schedule_path)
        dropped = reprice(profile, LinkSpec.parse(f"{args.to_rate},{args.delay}"))
        predicted = {
            "before": simulate(profile, schedule).iteration_s,
            "after, static": simulate(dropped, schedule).iteration_s,
            "after, planned for the new rate": simulate(dropped, plan(dropped, args.period)).iteration_s,
        }
        for repeat in range(args.repeats):
            for variant in times:
                netns.shape(cfg.name, args.from_rate)
                log = work / f"{variant}-r{repeat}.jsonl"
                log.unlink(missing_ok=True)
                overrides = [
                    f"train.steps={args.steps}",
                    'train.algorithm="dreamddp"',
                    f"train.log={log}",
                    "train.progress=false",
                ]
                if variant == "replan-auto":
                    overrides += ["train.period=auto"]
                else:
                    overrides += [f"train.period={args.period}", f"train.schedule={schedule_path}"]
                if variant.startswith("replan"):
                    overrides += [f"train.profile={profile_path}", f"train.replan_every={args.replan_every}"]
                stop = threading.Event()
                watcher = threading.Thread(
                    target=watch_and_drop, args=(log, args.drop_at, cfg.name, args.to_rate, stop), daemon=True
                )
                watcher.start()
                module = ["dreamddp.train", "--config", args.config]
                for item in overrides:
                    module += ["--set", item]
                try:
                    cluster.run_module(module, f"train-{variant}-r{repeat}")
                finally:
                    stop.set()
                    watcher.join()
                summary = read_summary(log)
                steps = iteration_times(summary)
                periods[variant].append(int(summary["period"]))
                before = statistics.mean(steps[s] for s in range(warmup, args.drop_at))
                after = statistics.mean(steps[s] for s in range(after_from, args.steps))
                times[variant].append((before, after))
                print(f"  {variant} r{repeat}: {before:.4f} s/it before the drop, {after:.4f} after", flush=True)
    lines = [
        f"# The WAN drops from {args.from_rate} to {args.to_rate} at iteration {args.drop_at} of {args.steps}",
        "",
        f"Config `{args.config}`, 2 sites x 1 process on the emulated cluster ({args.delay} per collective),",
        f"H = {args.period}; re-planning every {args.replan_every} period(s). Mean s/iteration before the drop",
        f"(iterations {warmup}-{args.drop_at - 1}) and after it (iterations {after_from}-{args.steps - 1}), median of",
        f"{args.repeats} interleaved repeats.",
        "",
        "| schedule | s/it before | s/it after | every repeat (after) | H at the end |",
        "|---|---|---|---|---|",
    ]
    for variant, pairs in times.items():
        before = statistics.median(p[0] for p in pairs)
        after = statistics.median(p[1] for p in pairs)
        every = ", ".join(f"{p[1]:.4f}" for p in pairs)
        lines.append(f"| {variant} | {before:.4f} | {after:.4f} | {every} | {', '.join(map(str, periods[variant]))} |")
    lines += [
        "",
        "Predicted from the profile (the drop priced by re-pricing the link): "
        + ", ".join(f"{k} {v:.4f} s/it" for k, v in predicted.items())
        + ".",
        "",
        "Command: `python benchmarks/replan_wan_drop.py "
        + f"--config {args.config} --steps {args.steps} --drop-at {args.drop_at} --from-rate {args.from_rate} "
        + f"--to-rate {args.to_rate} --delay {args.delay} --period {args.period} "
        + f"--replan-every {args.replan_every} --repeats {args.repeats}`",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""How good and how fast the searches are, against the exact optimum.

1. Random instances (per-unit costs as in the paper, and with the wrapper's coalescing): how
   often and by how much ``paper_dfs``, ``contiguous_optimal`` and ``plan`` miss the brute-force
   optimum — small instances (2-7 units; ``plan`` is exact there) and larger ones (11-13 units,
   where ``plan`` switches to local search).
2. Scale: 500 / 1,000 / 2,000 units at H 16 and 32 (random unit sizes, a 100 Mbit/s link with
   20 ms latency per all-reduce, 1 s of backward: the regime where the search matters):
   ``plan`` with fill-in, its time (target: under 2 s on 2,000 units at H 32) and exposed time,
   against the contiguous optimum, the certified lower bound, and the time-budgeted local search
   that ``plan`` used before (``--baseline REV``: that revision of the repository, run in a
   subprocess, at 0.5 s and ``--baseline-budget`` seconds).

    python benchmarks/scheduler_quality.py [--trials 300] [--seed 0] [--baseline 06f0770 --baseline-budget 60]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from dreamddp import plan
from dreamddp.planning import brute_force, contiguous_optimal, fill_in, paper_dfs, total_exposed
from profiler import CommModel, Profile

OUT = Path(__file__).resolve().parent / "results" / "scheduler.md"


def random_profile(rng: random.Random, n: int, coalesced: bool) -> Profile:
    backward = [rng.random() for _ in range(n)]
    if not coalesced:
        return Profile.synthetic(backward, [rng.random() * 1.5 for _ in range(n)])
    nbytes = [rng.randint(1, 4000) for _ in range(n)]
    return Profile.synthetic(backward, [0.0] * n, nbytes=nbytes).with_comm(
        CommModel(rng.random() * 0.5, rng.random() * 5e-4)
    )


def quality(rng: random.Random, trials: int, sizes: tuple[int, int], coalesced: bool) -> dict[str, str]:
    misses = {"paper_dfs": [], "contiguous_optimal": [], "plan": []}
    noncontiguous_wins = []
    for _ in range(trials):
        n, period = rng.randint(*sizes), rng.randint(2, 4)
        p = random_profile(rng, n, coalesced)
        optimum = total_exposed(p, brute_force(p, period))
        values = {
            "paper_dfs": total_exposed(p, paper_dfs(p, period)),
            "contiguous_optimal": total_exposed(p, contiguous_optimal(p, period)),
            "plan": total_exposed(p, plan(p, period, fill=False)),
        }
        for name, value in values.items():
            if value > optimum + 1e-9:
                misses[name].append((value - optimum) / value)
        if values["contiguous_optimal"] > optimum + 1e-9:
            noncontiguous_wins.append((values["contiguous_optimal"] - optimum) / values["contiguous_optimal"])
    row = {
        name: f"{len(m) / trials:.1%} worse, up to {max(m, default=0):.0%} more exposed than optimal"
        f" (median miss {statistics.median(m) if m else 0:.0%})"
        for name, m in misses.items()
    }
    row["non-contiguous optimum"] = (
        f"beats the best contiguous in {len(noncontiguous_wins) / trials:.1%}, by up to {max(noncontiguous_wins, default=0):.0%}"
    )
    return row


SCALE = ((500, 16), (500, 32), (1000, 16), (1000, 32), (2000, 16), (2000, 32))
ROOT = Path(__file__).resolve().parent.parent
# Run in the baseline's own tree: plan without fill-in (the search alone) and price it.
BASELINE_SNIPPET = """
import json, sys, time
from dreamddp.planning import plan, total_exposed
from dreamddp.planning.profile import Profile
p = Profile.from_json(sys.argv[1])
start = time.perf_counter()
s = plan(p, int(sys.argv[2]), fill=False, time_budget_s=float(sys.argv[3]))
print(json.dumps({"seconds": time.perf_counter() - start, "exposed": total_exposed(p, s)}))
"""


def scale_profile(n: int, seed: int) -> Profile:
    rng = random.Random(seed)
    nbytes = [rng.randint(1_000, 400_000) for _ in range(n)]
    backward = [rng.random() for _ in range(n)]
    total = sum(backward)
    return Profile.synthetic([b / total for b in backward], [0.0] * n, nbytes=nbytes).with_comm(
        CommModel(0.02, 8 / 100e6)
    )


def baseline_tree(rev: str, into: Path) -> Path:
    """The repository at ``rev`` (its dreamddp and profiler packages), extracted under ``into``."""
    archive = into / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "dreamddp", "profiler"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def run_baseline(tree: Path, profile_path: Path, period: int, budget_s: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_SNIPPET, str(profile_path), str(period), str(budget_s)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale_rows(seed: int, baseline: str | None, budget_s: float) -> list[str]:
    header = "| units | H | plan s (fill-in incl.) | exposed s/period | contiguous | lower bound | gap to bound |"
    rule = "|---|---|---|---|---|---|---|"
    if baseline:
        header += f" before ({baseline}) 0.5 s | before {budget_s:g} s |"
        rule += "---|---|"
    lines = [header, rule]
    with tempfile.TemporaryDirectory() as tmp:
        tree = baseline_tree(baseline, Path(tmp)) if baseline else None
        for n, period in SCALE:
            p = scale_profile(n, seed + n)
            start = time.perf_counter()
            planned = plan(p, period)  # what a user gets: search + fill-in
            seconds = time.perf_counter() - start
            search_only = plan(p, period, fill=False)
            exposed = total_exposed(p, search_only)
            assert total_exposed(p, fill_in(search_only, p)) <= exposed + 1e-9
            bound = search_only.metadata["lower_bound_exposed_s"]
            contiguous = total_exposed(p, contiguous_optimal(p, period))
            gap = f"{exposed / bound:.2f}x" if bound > 0 else "-"
            row = f"| {n} | {period} | {seconds:.2f} | {exposed:.3f} | {contiguous:.3f} | {bound:.3f} | {gap} |"
            if tree is not None:
                path = Path(tmp) / f"profile-{n}.json"
                p.to_json(path)
                quick, long = (run_baseline(tree, path, period, b)["exposed"] for b in (0.5, budget_s))
                row += f" {quick:.3f} | {long:.3f} |"
            lines.append(row)
            print(row, flush=True)
            del planned
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", help="a git revision whose plan (time-budgeted local search) to compare with")
    parser.add_argument("--baseline-budget", type=float, default=60.0, help="the baseline's longer budget, seconds")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    lines = [f"Random instances, {args.trials} per row (seed {args.seed}); misses are (found - optimum) / found.", ""]
    for coalesced in (False, True):
        for sizes in ((2, 7), (11, 13)):
            trials = args.trials if sizes[1] <= 7 else max(20, args.trials // 10)
            row = quality(rng, trials, sizes, coalesced)
            model = "coalesced buckets (alpha per bucket)" if coalesced else "per-unit messages (the paper's model)"
            lines.append(f"**{sizes[0]}-{sizes[1]} units, period 2-4, {model}, {trials} instances**")
            lines += [f"- {name}: {text}" for name, text in row.items()] + [""]
            print("\n".join(lines[-6:]), flush=True)
    lines += ["", "**Scale** (100 Mbit/s, 20 ms per all-reduce, 1 s backward; exposed s per period, search alone)", ""]
    lines += scale_rows(args.seed, args.baseline, args.baseline_budget)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {OUT}")


if __name__ == "__main__":
    main()

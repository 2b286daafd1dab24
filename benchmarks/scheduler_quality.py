"""How good and how fast the searches are, against the exact optimum.

1. Random instances (per-unit costs as in the paper, and with the wrapper's coalescing): how
   often and by how much ``paper_dfs``, ``contiguous_optimal`` and ``plan`` miss the brute-force
   optimum — small instances (2-7 units; ``plan`` is exact there) and larger ones (11-13 units,
   where ``plan`` switches to local search).
2. Speed: ``plan`` on 500 units with period 32 (target: under 1 s).

    python benchmarks/scheduler_quality.py [--trials 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from dreamddp import plan
from dreamddp.planning import brute_force, contiguous_optimal, paper_dfs, total_exposed
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


def speed(rng: random.Random) -> float:
    n = 500
    p = Profile.synthetic(
        [rng.random() * 1e-3 for _ in range(n)], [0.0] * n, nbytes=[rng.randint(1_000, 400_000) for _ in range(n)]
    ).with_comm(CommModel(0.002, 8e-9))
    start = time.perf_counter()
    plan(p, 32)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
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
    seconds = speed(rng)
    lines.append(f"`plan` on 500 units, period 32, fill-in included: {seconds:.2f} s")
    print(lines[-1])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {OUT}")


if __name__ == "__main__":
    main()

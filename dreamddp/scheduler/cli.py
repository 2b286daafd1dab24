"""``dreamddp plan``: a schedule from a profile, with the predicted time of every method.

    dreamddp plan --profile profile.json --period 8 --out schedule.json [--link 100mbit,20ms]

``--link`` re-prices communication for another link without re-profiling (alpha = its delay,
beta from its rate and the ring all-reduce's traffic at the profile's world size).
``--period auto`` picks the smallest H whose predicted DreamDDP iteration time is within 5%
of the lower bound (up to H = 64).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from profiler import CommModel, Profile

from ..comm import LinkSpec
from . import plan, simulate, simulate_method

__all__ = ["main", "predictions", "reprice"]

AUTO_LIMIT = 64


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamddp plan", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="profile JSON from `dreamddp profile`")
    parser.add_argument("--period", required=True, help="H, or 'auto'")
    parser.add_argument("--out", required=True, help="where to write the schedule JSON")
    parser.add_argument("--link", help="re-price comm for this link, e.g. 100mbit,20ms")
    parser.add_argument("--method", default="dreamddp", choices=["dreamddp", "contiguous", "paper", "plsgd", "local_sgd"])
    parser.add_argument("--no-fill", action="store_true", help="no extra syncs in idle link time")
    parser.add_argument("--trace", help="also write the predicted timeline as a Chrome/Perfetto trace")
    return parser.parse_args(argv)


def reprice(profile: Profile, link: LinkSpec) -> Profile:
    world = int(profile.metadata.get("world_size", 2))
    ring = 2.0 * (world - 1) / world if world > 1 else 0.0
    return profile.with_comm(CommModel(link.latency_s, ring * 8.0 / link.bandwidth_bps, None, (), str(link)))


def predictions(profile: Profile, period: int) -> list[tuple[str, float]]:
    """Predicted seconds per iteration of each method at this period."""
    rows = [
        ("ssgd (torch DDP)", simulate_method(profile, "ssgd", 1).iteration_s),
        ("local_sgd", simulate_method(profile, "local_sgd", period).iteration_s),
        ("plsgd", simulate(profile, plan(profile, period, "plsgd")).iteration_s),
        ("paper (contiguous DFS)", simulate(profile, plan(profile, period, "paper", fill=False)).iteration_s),
        ("dreamddp, no fill-in", simulate(profile, plan(profile, period, fill=False)).iteration_s),
        ("dreamddp + fill-in", simulate(profile, plan(profile, period)).iteration_s),
    ]
    lower = simulate(profile, plan(profile, period, fill=False)).lower_bound_s / period
    return rows + [("lower bound", lower)]


def auto_period(profile: Profile) -> int:
    for period in range(1, AUTO_LIMIT + 1):
        t = simulate(profile, plan(profile, period, fill=False))
        if t.iteration_s <= 1.05 * t.lower_bound_s / period:
            return period
    return AUTO_LIMIT


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profile = Profile.from_json(args.profile)
        if args.link:
            profile = reprice(profile, LinkSpec.parse(args.link))
        if args.period == "auto":
            period = auto_period(profile)
        else:
            try:
                period = int(args.period)
            except ValueError:
                raise ValueError(f"--period must be an integer >= 1 or 'auto', got {args.period!r}") from None
        schedule = plan(profile, period, args.method, fill=not args.no_fill)
    except ValueError as err:
        print(f"dreamddp plan: error: {err}", file=sys.stderr)
        return 2
    schedule.to_json(args.out)
    rows = predictions(profile, period)
    ssgd = rows[0][1]
    link = args.link or profile.metadata.get("link", "as profiled")
    print(f"predicted time per iteration, H = {period}{' (auto)' if args.period == 'auto' else ''}, link {link}:")
    print(f"{'method':<26} {'s / iteration':>14} {'speed-up vs ssgd':>17}")
    for name, seconds in rows:
        print(f"{name:<26} {seconds:>14.4f} {ssgd / seconds if seconds > 0 else float('inf'):>16.2f}x")
    print(f"\n{args.method} schedule ({schedule.syncs_per_period()} syncs per period) written to {args.out}")
    if args.trace:
        simulate(profile, schedule).write_chrome_trace(args.trace)
        print(f"predicted timeline written to {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

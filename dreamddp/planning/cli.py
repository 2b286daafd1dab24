"""``dreamddp plan``: a schedule from a profile, with the predicted time of every method.

    dreamddp plan --profile profile.json --period 8 --out schedule.json [--link 100mbit,20ms]
                  [--overlap backward|forward] [--max-delay D]

``--link`` re-prices communication for another link without re-profiling (alpha = its delay,
beta from its rate and the ring all-reduce's traffic at the profile's world size).
``--overlap`` is the wrapper's mode the schedule is planned for: ``backward`` (the paper: all
averages waited for before the step) or ``forward`` (each unit's average waited for before
its next forward); ``--max-delay D`` (forward only) lets averages land up to D iterations
later where that saves time, for a parameter snapshot each. The table predicts every method
under both modes, with each time's ratio to the lower bound.
``--period auto`` picks the smallest H whose predicted DreamDDP iteration time (for the chosen
overlap) is within 5% of the lower bound (up to H = 64); 1% with an outer optimizer's momentum.

``--sync delta`` (with ``--outer``, ``--compress``, ``--compress-block``) plans for delta sync:
each byte is priced as the compressed collective carries it, plus the codec's measured compute.
A second table predicts DreamDDP for every payload (average, delta with none / bf16 / int8).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from dreamddp.core.compress import COMPRESSORS
from dreamddp.core.schedule import Schedule
from dreamddp.core.sync_options import SyncOptions
from dreamddp.emulation.link import LinkSpec
from dreamddp.ops.outputs import check_writable
from dreamddp.planning import METHODS, auto_period, fill_in, plan, simulate, simulate_method
from dreamddp.planning.compression import auto_within, priced_for, wire_fraction
from dreamddp.planning.profile import CommModel, Profile
from dreamddp.planning.two_level import TwoLevel, priced_two_level, two_level_of
from dreamddp.validation import non_negative_int

__all__ = ["Prediction", "main", "predictions", "reprice"]

FILLED_METHODS = ("dreamddp", "contiguous", "paper")  # the methods plan() fills in (not plsgd, local_sgd)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamddp plan", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="profile JSON from `dreamddp profile`")
    parser.add_argument("--period", required=True, help="H, or 'auto'")
    parser.add_argument("--out", required=True, help="where to write the schedule JSON")
    parser.add_argument("--link", help="re-price comm for this link, e.g. 100mbit,20ms")
    parser.add_argument("--method", default="dreamddp", choices=METHODS)
    parser.add_argument("--no-fill", action="store_true", help="no extra syncs in idle link time")
    parser.add_argument(
        "--overlap",
        default="backward",
        choices=["backward", "forward"],
        help="the wrapper's overlap mode to plan for (default: backward, the paper's)",
    )
    parser.add_argument(
        "--max-delay",
        type=int,
        default=0,
        metavar="D",
        help="forward overlap: averages may land up to D iterations late (default 0: off)",
    )
    parser.add_argument("--sync", default="average", help="average (the paper) or delta (train.sync)")
    parser.add_argument("--outer", default="sgd", help="delta: the outer optimizer, sgd or nesterov")
    parser.add_argument("--compress", default="none", help="delta: the payload, none, bf16 or int8")
    parser.add_argument("--compress-block", type=int, default=256, help="int8: elements per scale")
    parser.add_argument(
        "--hierarchy",
        default="auto",
        choices=["auto", "flat", "hierarchical"],
        help="plan for two-level sync (auto: when the profile measured sites of several ranks)",
    )
    parser.add_argument("--trace", help="also write the predicted timeline as a Chrome/Perfetto trace")
    return parser.parse_args(argv)


def reprice(profile: Profile, link: LinkSpec) -> Profile:
    """The profile on another link; a two-level profile's cross-site model too (its site network stays)."""
    world = int(profile.metadata.get("world_size", 2))
    ring = 2.0 * (world - 1) / world if world > 1 else 0.0
    repriced = profile.with_comm(CommModel(link.latency_s, ring * 8.0 / link.bandwidth_bps, None, (), str(link)))
    two_level = two_level_of(profile)
    if two_level is None:
        return repriced
    sites, g = two_level.sites, two_level.ranks_per_site
    # G shard rings of the sites run at once and share each site's uplink.
    cross = CommModel(link.latency_s, g * 2.0 * (sites - 1) / sites * 8.0 / link.bandwidth_bps, None, (), str(link))
    moved = dataclasses.replace(two_level, cross=cross)
    return dataclasses.replace(repriced, metadata={**repriced.metadata, "two_level": moved.to_dict()})


def two_level_predictions(
    flat: Profile, two_level: TwoLevel, period: int, overlap: str, written: Schedule | None = None
) -> list[tuple[str, float]]:
    """(method, predicted s/iteration) of the flat and two-level methods on a cluster of sites.

    ``flat`` is priced for one ring over every rank; two-level DreamDDP is planned on the
    two-level price (``written``: the schedule already planned so, whose row it then is).
    ``hier_local_sgd`` is the site's gradients every step plus a flat average every H.
    """
    priced = priced_two_level(flat, two_level)
    with_site_gradients = dataclasses.replace(flat, optimizer_s=priced.optimizer_s)
    schedule = written or plan(priced, period, fill=False, overlap=overlap)
    return [
        ("ssgd (torch DDP, all ranks)", simulate_method(flat, "ssgd", 1).iteration_s),
        ("local_sgd (flat)", simulate_method(flat, "local_sgd", period).iteration_s),
        ("hier_local_sgd", simulate_method(with_site_gradients, "local_sgd", period).iteration_s),
        ("dreamddp flat", simulate(flat, plan(flat, period, fill=False, overlap=overlap)).iteration_s),
        ("dreamddp two-level", simulate(priced, schedule).iteration_s),
    ]


@dataclass(frozen=True)
class Prediction:
    """One row of the table: a method's predicted seconds per iteration under each overlap mode."""

    name: str
    backward_s: float | None  # with the paper's backward overlap; None where the mode does not apply
    forward_s: float | None  # with forward overlap


def predictions(
    profile: Profile, period: int, max_delay: int = 0, planned: dict[str, Schedule] | None = None
) -> list[Prediction]:
    """Predicted seconds per iteration of each method at this period, S-SGD first and the lower
    bound last.

    plsgd and the paper's schedule are the same schedule in both columns; dreamddp is planned
    for each mode. The baselines as trained always block, so they have no forward figure.
    ``planned`` maps an overlap mode to a DreamDDP schedule already planned for it (without
    fill-in; under "delayed", as written): its rows are that schedule and its fill-in, so that the
    table shows what was written.
    """

    def both(schedule: Schedule) -> tuple[float, float]:
        return (
            simulate(profile, schedule, overlap="backward").iteration_s,
            simulate(profile, schedule, overlap="forward").iteration_s,
        )

    known = planned or {}
    backward = known.get("backward") or plan(profile, period, fill=False)
    forward = known.get("forward") or plan(profile, period, fill=False, overlap="forward")
    rows = [
        Prediction("ssgd (torch DDP)", simulate_method(profile, "ssgd", 1).iteration_s, None),
        Prediction("local_sgd", simulate_method(profile, "local_sgd", period).iteration_s, None),
        Prediction("plsgd", *both(plan(profile, period, "plsgd"))),
        Prediction("paper (contiguous DFS)", *both(plan(profile, period, "paper", fill=False))),
        Prediction(
            "dreamddp, no fill-in", simulate(profile, backward).iteration_s, simulate(profile, forward).iteration_s
        ),
        Prediction(
            "dreamddp + fill-in",
            simulate(profile, fill_in(backward, profile)).iteration_s,
            simulate(profile, fill_in(forward, profile)).iteration_s,
        ),
    ]
    if max_delay:
        delayed = known.get("delayed") or plan(profile, period, overlap="forward", max_delay=max_delay)
        rows.append(Prediction(f"dreamddp, delays <= {max_delay}", None, simulate(profile, delayed).iteration_s))
    lower = simulate(profile, backward).lower_bound_s / period
    return [*rows, Prediction("lower bound", lower, lower)]


def payload_predictions(
    profile: Profile, period: int, overlap: str, options: SyncOptions, written: Schedule | None = None
) -> list[tuple[str, float, float]]:
    """(sync, predicted s/iteration, MB sent per period) for averaging and each delta payload.

    ``options`` gives the outer optimizer and int8 block; the payload varies. MB are priced
    bytes: what the collective really carries, as the all-reduce with the same traffic.
    ``written``: the schedule already planned for ``options`` (before fill-in): its row is that
    schedule, so the table shows what was written.
    """
    rows = []
    choices = [SyncOptions()] + [
        dataclasses.replace(options, mode="delta", compress=c, prefix="plan") for c in COMPRESSORS
    ]
    for choice in choices:
        priced = priced_for(profile, choice)
        mine = written is not None and choice == dataclasses.replace(options, mode="delta", prefix="plan")
        base = written if mine and written is not None else plan(priced, period, fill=False, overlap=overlap)
        schedule = fill_in(base, priced)
        fraction = wire_fraction(profile, choice)
        nbytes = {u.name: u.nbytes for u in profile.units}
        sent = sum(nbytes[name] * len(its) for name, its in schedule.assignment.items()) * fraction
        label = (
            "average"
            if not choice.delta
            else f"delta {choice.outer}" + (f" + {choice.compress}" if choice.compress != "none" else "")
        )
        rows.append((label, simulate(priced, schedule).iteration_s, sent / 1e6))
    return rows


def _cells(seconds: float | None, ssgd: float, lower: float) -> str:
    if seconds is None:
        return f"{'-':>10} {'-':>8} {'-':>8}"
    speedup = ssgd / seconds if seconds > 0 else float("inf")
    ratio = seconds / lower if lower > 0 else 1.0
    return f"{seconds:>10.4f} {ratio:>7.2f}x {speedup:>7.2f}x"


def _two_level_in(profile: Profile, path: str) -> TwoLevel | None:
    """The profile's two-level measurements; damaged ones are an error naming the file."""
    try:
        return two_level_of(profile)
    except ValueError as err:
        raise ValueError(f"profile file {path!r}: {err}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        profile = Profile.from_json(args.profile)
        for flag in ("out", "trace"):
            if getattr(args, flag):
                check_writable(f"--{flag}", getattr(args, flag))  # before planning, which may take a while
        if args.link:
            profile = reprice(profile, LinkSpec.parse(args.link))
        options = SyncOptions(
            mode=args.sync, outer=args.outer, compress=args.compress, compress_block=args.compress_block, prefix="plan"
        )
        two_level = _two_level_in(profile, args.profile) if args.hierarchy != "flat" else None
        if args.hierarchy == "hierarchical" and two_level is None:
            raise ValueError(
                f"--hierarchy hierarchical needs a profile measured with sites of several ranks; {args.profile!r} "
                "has no two-level measurements (profile under the cluster with train.ranks_per_site or DREAMDDP_SITE)"
            )
        if two_level is not None and options.delta:
            raise ValueError("--sync delta with two-level synchronization is not supported yet: use --hierarchy flat")
        flat = profile  # one ring over every rank, for the flat-vs-two-level table
        if two_level is not None:
            profile = priced_two_level(profile, two_level)
        averaged = profile  # priced as an average, for the per-payload table
        profile = priced_for(profile, options)
        non_negative_int("--max-delay", args.max_delay)
        if args.max_delay and args.overlap != "forward":
            raise ValueError(
                "--max-delay needs --overlap forward: with backward overlap every average is waited for before the step"
            )
        if args.period == "auto":
            period = auto_period(profile, args.overlap, args.max_delay, within=auto_within(options))
        else:
            try:
                period = int(args.period)
            except ValueError:
                raise ValueError(f"--period must be an integer >= 1 or 'auto', got {args.period!r}") from None
        # One search: the written schedule is this one (filled in unless --no-fill), and the
        # table's DreamDDP rows are priced from it, not from separate plan calls.
        base = plan(profile, period, args.method, fill=False, overlap=args.overlap, max_delay=args.max_delay)
        schedule = base if args.no_fill or args.method not in FILLED_METHODS else fill_in(base, profile)
        world = profile.metadata.get("world_size")
        if options.delta:
            schedule = dataclasses.replace(
                schedule, metadata={**schedule.metadata, "planned_for_sync": options.describe()}
            )
        if isinstance(world, int) and "world_size" not in schedule.metadata:
            # The trainer refuses a schedule planned for another world size; it can only if this is recorded.
            schedule = dataclasses.replace(schedule, metadata={**schedule.metadata, "world_size": world})
    except ValueError as err:
        print(f"dreamddp plan: error: {err}", file=sys.stderr)
        return 2
    schedule.to_json(args.out)
    planned = {}
    if args.method == "dreamddp" and not options.delta:  # the table prices averages; a delta plan is below it
        if args.max_delay:
            planned["delayed"] = schedule
        else:
            planned[args.overlap] = base
    # Two-level: this table is the flat world (one ring over every rank); the written schedule's row
    # is in the flat-vs-two-level table below it.
    rows = (
        predictions(flat, period, args.max_delay, {})
        if two_level
        else predictions(averaged, period, args.max_delay, planned)
    )
    ssgd, lower = rows[0].backward_s, rows[-1].backward_s
    assert ssgd is not None and lower is not None  # S-SGD and the bound have a backward figure
    link = args.link or profile.metadata.get("link", "as profiled")
    scope = "every rank one replica, " if two_level is not None else ""
    print(
        f"predicted time per iteration, {scope}H = {period}{' (auto)' if args.period == 'auto' else ''}, link {link}:"
    )
    print(f"{'':<26} {'backward overlap (paper)':>28} {'forward overlap':>28}")
    header = f"{'s / iter':>10} {'/ bound':>8} {'vs ssgd':>8}"
    print(f"{'method':<26} {header} {header}")
    for row in rows:
        print(f"{row.name:<26} {_cells(row.backward_s, ssgd, lower)} {_cells(row.forward_s, ssgd, lower)}")
    if options.delta:
        written = base if args.method == "dreamddp" and not args.max_delay else None
        print(f"\nper payload ({args.overlap} overlap, DreamDDP planned for each):")
        print(f"{'sync':<26} {'s / iter':>10} {'MB / period':>12}")
        for label, payload_s, megabytes in payload_predictions(averaged, period, args.overlap, options, written):
            print(f"{label:<26} {payload_s:>10.4f} {megabytes:>12.2f}")
    if two_level is not None:
        written = base if args.method == "dreamddp" and not args.max_delay else None
        print(f"\nflat vs two-level ({two_level.describe()}), {args.overlap} overlap:")
        print(f"{'method':<30} {'s / iter':>10} {'vs ssgd':>8}")
        table = two_level_predictions(flat, two_level, period, args.overlap, written)
        for label, seconds in table:
            print(f"{label:<30} {seconds:>10.4f} {table[0][1] / seconds:>7.2f}x")
    predicted = simulate(profile, schedule)
    print(
        f"\n{args.method} schedule for {args.overlap} overlap, sync {options.describe()}"
        f"{f', two-level {two_level.describe()}' if two_level is not None else ''} "
        f"({schedule.syncs_per_period()} syncs per period"
        f"{f', {len(schedule.delays)} units delayed' if schedule.delays else ''}): predicted "
        f"{predicted.iteration_s:.4f} s / iteration, {predicted.bound_ratio:.2f}x the lower bound"
        f"{f', peak snapshot {predicted.peak_snapshot_bytes / 2**20:.2f} MiB' if schedule.delays else ''};"
        f" written to {args.out}"
    )
    if args.trace:
        simulate(profile, schedule).write_chrome_trace(args.trace)
        print(f"predicted timeline written to {args.trace}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dreamddp profile``: profile a configured model on the live cluster and write a Profile.

    torchrun --nproc-per-node 2 -m dreamddp.cli profile --config configs/gpt-tiny.toml --out profile.json

Every rank profiles its own compute; per unit the slowest rank's time is kept. The comm
sweep runs on the job's process group over the configured link (``train.link`` for a
simulated one). Rank 0 writes the JSON and prints the heaviest units and the comm model.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch
import torch.distributed as dist

from dreamddp.core.topology import discover
from dreamddp.emulation.link import describe_link, link_from_settings
from dreamddp.planning.profile import CommModel, Profile, UnitProfile
from dreamddp.planning.two_level import TwoLevel, site_cpu_per_byte, site_cpu_s, two_level_of
from dreamddp.training.config import load_config
from dreamddp.training.data import build_data
from dreamddp.training.distributed import init_process_group
from dreamddp.training.lora import apply_lora
from dreamddp.training.loss import loss_for_task
from dreamddp.training.models import build_model, model_task
from dreamddp.training.strategies import build_optimizer
from profiler.codec import profile_codecs
from profiler.comm import DEFAULT_SIZES, profile_comm
from profiler.comm_cpu import profile_comm_cpu
from profiler.compute import profile_compute
from profiler.site_cost import SiteGradientCost, profile_site_gradients

__all__ = ["main", "format_profile"]

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamddp profile", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config (the model, data and link to profile)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", required=True, help="where rank 0 writes the profile JSON")
    parser.add_argument("--iters", type=int, default=20, help="measured iterations")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured iterations first")
    parser.add_argument(
        "--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="all-reduce sizes, bytes, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=5, help="back-to-back all-reduces per size")
    parser.add_argument("--top", type=int, default=10, help="units shown in the table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError as err:
        print(f"dreamddp profile: error: {err}", file=sys.stderr)
        return 2
    if args.iters < 1 or args.warmup < 0 or args.repeats < 1:
        print(
            f"dreamddp profile: error: need --iters >= 1, --warmup >= 0, --repeats >= 1 "
            f"(got {args.iters}, {args.warmup}, {args.repeats})",
            file=sys.stderr,
        )
        return 2
    device = init_process_group(cfg)
    try:
        profile = run(cfg, device, args.iters, args.warmup, sizes, args.repeats)
        if dist.get_rank() == 0:
            profile.to_json(args.out)
            print(format_profile(profile, args.top))
            print(f"\nwritten to {args.out}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def run(cfg, device: torch.device, iters: int, warmup: int, sizes: list[int], repeats: int) -> Profile:
    rank, world = dist.get_rank(), dist.get_world_size()
    cpu_before = psutil.cpu_times()
    torch.manual_seed(cfg.train.seed)
    model = apply_lora(build_model(cfg.model_name, cfg.model_options).to(device), cfg.train.lora)  # units as trained
    data = build_data(
        cfg.data.name,
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        vocab_size=cfg.model.get("vocab_size", 256),
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        max_bytes=cfg.data.max_bytes,
    )
    loss_fn = loss_for_task(model_task(cfg.model_name))

    def make_batch(step: int):
        x, y = data.batch(step)
        return x.to(device), y.to(device)

    local = profile_compute(model, make_batch, loss_fn, iters, warmup, build_optimizer(cfg.train, model.parameters()))
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, local.to_dict())
    compute = _slowest(local, [Profile.from_dict(d) for d in everyone])
    link = link_from_settings(cfg.train.link, world)
    comm = profile_comm(sizes=sizes, repeats=repeats, link=link, device=device)
    two_level = _profile_two_level(
        cfg,
        sizes,
        repeats,
        link,
        device,
        compute,
        lambda group: profile_site_gradients(
            model, make_batch, loss_fn, group, iters=max(iters // 2, 3), warmup=min(warmup, 2) or 1
        ),
    )
    comm_cpu = _profile_comm_cpu(model, make_batch, loss_fn, compute, comm, iters)
    codecs = profile_codecs(device, world=world)  # delta sync's payload compute, priced by the planner
    cpu_after = psutil.cpu_times()
    busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    metadata = {
        **compute.metadata,
        "world_size": world,
        "backend": str(dist.get_backend()),
        "link": describe_link(link),
        "model": cfg.model,
        "data": cfg.data.name,
        "batch_size": cfg.data.batch_size,
        "codec_s_per_byte": codecs,
        **({"two_level": two_level.to_dict()} if two_level is not None else {}),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "cpus": psutil.cpu_count(),
            "cpu_busy_s": busy,
            "load_avg": list(os.getloadavg()),
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "memory_total_mb": psutil.virtual_memory().total / 2**20,
            "memory_available_mb": psutil.virtual_memory().available / 2**20,
        },
    }
    return Profile(
        units=compute.units,
        forward_s=compute.forward_s,
        backward_s=compute.backward_s,
        optimizer_s=compute.optimizer_s,
        metadata=metadata,
        spreads=compute.spreads,
        comm_cpu_s_per_byte=comm_cpu,
    ).with_comm(comm)


def _profile_comm_cpu(model, make_batch, loss_fn, compute: Profile, comm: CommModel, iters: int) -> float:
    """Compute an all-reduce in flight takes per byte (``profiler.comm_cpu``), the slowest rank's.

    The transfer is what the link carries in 80% of a forward+backward (at most the model's
    bytes), so that all of it is in flight while compute runs. Only where the sites compute on
    the cores that drive their network: on CUDA the copies and reductions are the device's, and
    the host threads do not slow the kernels, so it is not measured there (0).
    """
    if next(model.parameters()).device.type == "cuda":
        return 0.0
    window = 0.8 * (compute.forward_s + compute.backward_s)
    model_bytes = sum(u.nbytes for u in compute.units)
    nbytes = int(min(model_bytes, window / comm.beta_s_per_byte if comm.beta_s_per_byte > 0 else model_bytes))
    cost = profile_comm_cpu(model, make_batch, loss_fn, max(nbytes, 4), iters=max(iters // 2, 4))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, cost.s_per_byte)
    per_byte = max(everyone)
    logger.info(
        "an all-reduce in flight: forward+backward %.1f ms alone, %.1f ms with %.2f MB; %.3f ns/byte taken (slowest rank)",
        cost.alone_s * 1e3,
        cost.with_transfer_s * 1e3,
        cost.nbytes / 1e6,
        per_byte * 1e9,
    )
    return per_byte


def _profile_two_level(
    cfg,
    sizes: list[int],
    repeats: int,
    link,
    device: torch.device,
    compute: Profile,
    measure_site: Callable[[dist.ProcessGroup], SiteGradientCost],
) -> TwoLevel | None:
    """With sites of several ranks (and train.hierarchy not flat): both networks' α–β models,
    and the CPU the site's gradient all-reduce takes from compute.

    The cross-site groups (one per local index) are swept at the same time, as two-level
    DreamDDP uses them, so their shared uplink is in the fit; every rank then adopts the
    slowest group's times, so that every rank writes the same profile. The site's gradients
    are timed against the same iterations without them (``profiler.site_cost``); the slowest
    rank's difference, less the intra model's predicted exposure, is the CPU share.
    """
    if cfg.train.hierarchy == "flat":
        return None
    topology = discover(ranks_per_site=cfg.train.ranks_per_site or None)
    if not topology.hierarchical:
        return None
    cross = _slowest_fit(profile_comm(topology.cross, sizes, repeats, link=link, device=device), repeats)
    intra = _slowest_fit(profile_comm(topology.intra, sizes, repeats, device=device), repeats)
    cost = measure_site(topology.intra)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (cost.extra_s, cost.gradient_bytes))
    extra_s, gradient_bytes = max(everyone)
    cpu = site_cpu_per_byte(compute, intra, extra_s, gradient_bytes)
    logger.info(
        "site gradients: +%.1f ms per iteration measured, %.1f ms of it CPU taken from compute",
        extra_s * 1e3,
        cpu * gradient_bytes * 1e3,
    )
    return TwoLevel(topology.sites, topology.ranks_per_site, cross, intra, cpu)


def _slowest_fit(mine: CommModel, repeats: int) -> CommModel:
    """The fit through every group's slowest time per size (groups measured separately differ)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (list(mine.points), mine.burst_s))
    points = [(size, max(theirs[0][k][1] for theirs in everyone)) for k, (size, _) in enumerate(mine.points)]
    burst = max(theirs[1] for theirs in everyone)
    return CommModel.fit(points, link=mine.link, burst_s=burst, repeats=repeats)


def _slowest(mine: Profile, everyone: list[Profile]) -> Profile:
    """Rank 0's unit order; every time the maximum over ranks (the slowest rank sets the pace)."""
    reference = everyone[0]
    by_name = [{u.name: u for u in p.units} for p in everyone]
    units = tuple(
        UnitProfile(
            name=u.name,
            nbytes=u.nbytes,
            forward_s=max(p[u.name].forward_s for p in by_name),
            backward_s=max(p[u.name].backward_s for p in by_name),
            forward_spread=u.forward_spread,
            backward_spread=u.backward_spread,
        )
        for u in reference.units
    )
    return Profile(
        units=units,
        forward_s=max(p.forward_s for p in everyone),
        backward_s=max(p.backward_s for p in everyone),
        optimizer_s=max(p.optimizer_s for p in everyone),
        metadata=mine.metadata,
        spreads=reference.spreads,
    )


def format_profile(profile: Profile, top: int = 10) -> str:
    """The heaviest units (by predicted all-reduce time) and the totals, as a text table."""
    lines = [f"{'unit':<28} {'bytes':>10} {'fwd ms':>8} {'bwd ms':>8} {'bwd p10-p90':>13} {'comm ms':>8}"]
    for u in sorted(profile.units, key=lambda u: (-u.comm_s, -u.nbytes))[:top]:
        spread = f"{u.backward_spread.p10 * 1e3:.2f}-{u.backward_spread.p90 * 1e3:.2f}" if u.backward_spread else ""
        lines.append(
            f"{u.name[:28]:<28} {u.nbytes:>10} {u.forward_s * 1e3:>8.2f} {u.backward_s * 1e3:>8.2f} {spread:>13} {u.comm_s * 1e3:>8.2f}"
        )
    total_bytes = sum(u.nbytes for u in profile.units)
    total_comm = sum(u.comm_s for u in profile.units)
    lines.append(
        f"{len(profile.units)} units, {total_bytes / 2**20:.2f} MiB; iteration: forward {profile.forward_s * 1e3:.1f} ms, "
        f"backward {profile.backward_s * 1e3:.1f} ms, optimizer {profile.optimizer_s * 1e3:.1f} ms; "
        f"all units' comm {total_comm * 1e3:.1f} ms"
    )
    if profile.comm is not None:
        c = profile.comm
        lines.append(
            f"comm model ({profile.metadata.get('link', '')}): alpha = {c.alpha_s * 1e3:.3f} ms, "
            f"beta = {c.beta_s_per_byte * 1e9:.3f} ns/byte ({c.bandwidth_bps / 1e6:.1f} Mbit/s effective), "
            f"R^2 = {c.r2:.4f} over {len(c.points)} sizes; burst after idle {c.burst_s * 1e3:.1f} ms"
        )
    lines.append(f"compute an all-reduce in flight takes: {profile.comm_cpu_s_per_byte * 1e9:.3f} ns/byte")
    two_level = two_level_of(profile)
    if two_level is not None:
        for name, m in (("cross-site shard", two_level.cross), ("inside a site", two_level.intra)):
            lines.append(
                f"two-level ({two_level.describe()}), {name}: alpha = {m.alpha_s * 1e3:.3f} ms, "
                f"beta = {m.beta_s_per_byte * 1e9:.3f} ns/byte"
            )
        lines.append(
            f"two-level ({two_level.describe()}), CPU the site's gradient all-reduce takes from compute: "
            f"{site_cpu_s(profile, two_level) * 1e3:.1f} ms per iteration"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Flat vs two-level vs DDP on paper, in the paper's setting: 4 sites x 8 GPUs, 1 Gbit/s WAN, GPT-2 small.

    python benchmarks/two_level_paper.py [--periods 8 32] [--delay-ms 30] [--markdown]

Nothing here runs a GPU: the profile is synthetic and every figure is the planner's
prediction (``dreamddp.planning``), so it shows what the cost model says about a setting this
machine cannot build. The inputs, stated once:

- units: GPT-2 small's modules (124M parameters, fp32, tied embeddings ready last), backward
  order; compute proportional to each unit's parameters, 0.1 s of backward and 0.05 s of
  forward per iteration (about 16 x 1024 tokens per GPU on an A100 at ~40% of peak);
- WAN: 1 Gbit/s per site uplink, ``--delay-ms`` one way. A flat ring over all 32 ranks pays the
  delay on each of its 2(N-1) steps (every step waits for its WAN edges); the two-level
  cross-site ring has 2(S-1) steps, and the G shard rings of a site share its uplink;
- inside a site: NVLink-class, 150 GB/s and 10 us per ring step.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreamddp.planning.cli import two_level_predictions  # noqa: E402
from dreamddp.planning.profile import CommModel, Profile  # noqa: E402
from dreamddp.planning.two_level import TwoLevel, two_level_of  # noqa: E402

SITES, GPUS = 4, 8
WAN_BPS = 1e9
NVLINK_BYTES_PER_S = 150e9
NVLINK_STEP_S = 10e-6
BACKWARD_S, FORWARD_S, OPTIMIZER_S = 0.1, 0.05, 0.005


def gpt2_small_units(
    layers: int = 12, d: int = 768, vocab: int = 50257, positions: int = 1024
) -> list[tuple[str, int]]:
    """(name, parameters) of GPT-2 small's modules in backward order (the tied embedding last)."""
    block = [
        ("mlp.c_proj", 4 * d * d + d),
        ("mlp.c_fc", d * 4 * d + 4 * d),
        ("ln_2", 2 * d),
        ("attn.c_proj", d * d + d),
        ("attn.c_attn", d * 3 * d + 3 * d),
        ("ln_1", 2 * d),
    ]
    units = [("ln_f", 2 * d)]
    for layer in reversed(range(layers)):
        units += [(f"h.{layer}.{name}", n) for name, n in block]
    return [*units, ("wpe", positions * d), ("wte", vocab * d)]


def paper_profile(delay_ms: float = 30.0) -> Profile:
    """The synthetic profile with the flat world's comm model and the two-level measurements."""
    units = gpt2_small_units()
    total = sum(n for _, n in units)
    world = SITES * GPUS
    delay = delay_ms / 1e3
    flat = CommModel(2 * (world - 1) * delay, 2 * (world - 1) / world * 8 / WAN_BPS, None, (), "1gbit flat ring")
    cross = CommModel(2 * (SITES - 1) * delay, GPUS * 2 * (SITES - 1) / SITES * 8 / WAN_BPS, None, (), "1gbit")
    intra = CommModel(2 * (GPUS - 1) * NVLINK_STEP_S, 2 * (GPUS - 1) / GPUS / NVLINK_BYTES_PER_S, None, (), "nvlink")
    profile = Profile.synthetic(
        backward_s=[BACKWARD_S * n / total for _, n in units],
        comm_s=[0.0] * len(units),
        forward_s=[FORWARD_S * n / total for _, n in units],
        optimizer_s=OPTIMIZER_S,
        nbytes=[4 * n for _, n in units],
    )
    named = tuple(dataclasses.replace(u, name=name) for u, (name, _) in zip(profile.units, units, strict=True))
    two_level = TwoLevel(SITES, GPUS, cross, intra)
    metadata = {"synthetic": True, "world_size": world, "two_level": two_level.to_dict(), "link": "1gbit"}
    return dataclasses.replace(profile, units=named, metadata=metadata).with_comm(flat)


def predictions(profile: Profile, period: int) -> list[tuple[str, float]]:
    two_level = two_level_of(profile)
    assert two_level is not None
    return two_level_predictions(profile, two_level, period, "backward")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--delay-ms", type=float, default=30.0)
    args = parser.parse_args(argv)
    profile = paper_profile(args.delay_ms)
    table = {period: predictions(profile, period) for period in args.periods}
    names = [name for name, _ in table[args.periods[0]]]
    print(f"| method | {' | '.join(f'H={p} s/it (vs DDP)' for p in args.periods)} |")
    print(f"|---|{'---:|' * len(args.periods)}")
    for k, name in enumerate(names):
        cells = [f"{table[p][k][1]:.3f} ({table[p][0][1] / table[p][k][1]:.1f}x)" for p in args.periods]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

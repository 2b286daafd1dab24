"""What the harness and the report share: the algorithms compared and the result formats.

The algorithm names are the trainer's (``dreamddp.training.config.ALGORITHMS``); the planned
DreamDDP variants are defined here, once. The harness reads them to know what to plan and
train, the report to order its rows and to know which rows use forward overlap; the harness
stamps its files with the formats below and the report refuses any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dreamddp.core.sync_options import SyncOptions
from dreamddp.training.config import ALGORITHMS

__all__ = [
    "BENCH_ALGORITHMS",
    "CONVERGENCE_FORMAT",
    "DEFAULT_ALGORITHMS",
    "FORWARD_VARIANTS",
    "PLANNED",
    "PlannedVariant",
    "REFERENCE",
    "RESULTS_FORMAT",
    "TWO_LEVEL_ONLY",
]

RESULTS_FORMAT = "dreamddp.bench/1"  # results.json: the link x algorithm grid
CONVERGENCE_FORMAT = "dreamddp.convergence/1"  # convergence.json: loss against time


@dataclass(frozen=True)
class PlannedVariant:
    """How one DreamDDP variant's schedule is planned; it trains as algorithm ``dreamddp``."""

    fill: bool = False  # add syncs in the link's idle time
    overlap: str = "backward"  # the wrapper mode planned (and then trained) for
    max_delay: int | None = 0  # forward overlap: iterations an average may land late; None = H - 1
    sync: tuple[tuple[str, str], ...] = ()  # train.* keys of the sync (sync="delta" and its options)
    hierarchy: str = "auto"  # train.hierarchy: "flat" keeps every rank its own replica even with sites of several

    @property
    def sync_options(self) -> SyncOptions:
        """What the variant's syncs do: the planner prices its payload, the trainer runs it."""
        keys: dict[str, Any] = dict(self.sync)
        if "sync" in keys:
            keys["mode"] = keys.pop("sync")  # train.sync is SyncOptions.mode
        return SyncOptions(**keys, prefix="train") if keys else SyncOptions()

    def train_overrides(self) -> list[str]:
        keys = [*self.sync, *((("hierarchy", self.hierarchy),) if self.hierarchy != "auto" else ())]
        return [f"train.{key}={value}" for key, value in keys]

    def plan_options(self, period: int) -> dict[str, Any]:
        """Keyword arguments of ``dreamddp.planning.plan`` for period ``period``."""
        max_delay = max(0, period - 1) if self.max_delay is None else self.max_delay
        return {"fill": self.fill, "overlap": self.overlap, "max_delay": max_delay}


# "dreamddp" is the planned schedule alone (the paper's backward overlap); "+fill" adds syncs in the
# link's idle time; "-forward" plans and trains with overlap="forward" (averages land before each
# unit's next forward); "-delayed" also lets units without a window land up to H-1 iterations late.
# The delta variants (sync="delta", issue 17) plan as "dreamddp" does, priced for their payload:
# "-nesterov" steps each unit's anchor with DiLoCo's outer Nesterov; "-int8" sends int8 deltas
# with error feedback (outer SGD, lr 1: averaging's arithmetic); "-nesterov-int8" both.
# "-flat" (issue 15) runs the same schedule with train.hierarchy=flat: with several processes per
# site, "dreamddp" is two-level (gradients every step inside a site) and "-flat" is every rank alone.
_DELTA = (("sync", "delta"),)
PLANNED: dict[str, PlannedVariant] = {
    "dreamddp": PlannedVariant(),
    "dreamddp+fill": PlannedVariant(fill=True),
    "dreamddp-forward": PlannedVariant(overlap="forward"),
    "dreamddp-delayed": PlannedVariant(overlap="forward", max_delay=None),
    "dreamddp-nesterov": PlannedVariant(sync=(*_DELTA, ("outer", "nesterov"))),
    "dreamddp-int8": PlannedVariant(sync=(*_DELTA, ("compress", "int8"))),
    "dreamddp-nesterov-int8": PlannedVariant(sync=(*_DELTA, ("outer", "nesterov"), ("compress", "int8"))),
    "dreamddp-flat": PlannedVariant(hierarchy="flat"),
}
# Only meaningful with several processes per site (the two-level axis): run on request.
TWO_LEVEL_ONLY = ("hier_local_sgd", "dreamddp-flat")


def _delta(name: str) -> bool:
    return name in PLANNED and bool(PLANNED[name].sync)


# Every name the benchmark accepts, in the order tables and plots list them.
BENCH_ALGORITHMS = (*ALGORITHMS, *(name for name in PLANNED if name not in ALGORITHMS))
# The compute-only run the grid interleaves with the methods, to check predictions at the runs' speed.
REFERENCE = "none"
# "none" (no communication at all) is a reference floor, not a contender; the delta
# variants are another axis (the payload), run on request (`--algorithms`).
DEFAULT_ALGORITHMS = tuple(
    name for name in BENCH_ALGORITHMS if name != "none" and not _delta(name) and name not in TWO_LEVEL_ONLY
)
# The variants beyond the paper, which the report holds to their own targets.
FORWARD_VARIANTS = tuple(name for name, variant in PLANNED.items() if variant.overlap == "forward")

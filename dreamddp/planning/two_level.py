"""Price two-level synchronization for the planner: sharded cross-site averages and the site's gradients.

With several ranks per site (``dreamddp.core.hierarchy``) a scheduled bucket of B bytes is
averaged as G shards of B/G, each all-reduced across sites by one rank of the site — the G
shard all-reduces run at once and share the site's uplink — and then all-gathered inside the
site. So one bucket costs ``cross(B/G) + gather(B)`` on the wrapper's serial channel, where
``cross`` is the α–β model the profiler fits on the cross-site groups *while all of them run*
(so the shared uplink is in β) and the all-gather moves about half an all-reduce's bytes:
``intra.alpha + intra.beta * B / 2``. Both are linear in B, so the priced profile is the
profile with one effective comm model, and the search, the simulator and the wrapper's bucket
plan are the same as for flat DreamDDP: a prediction and a run cannot drift apart.

The site's gradients are all-reduced every iteration on the fast network, launched as units
become ready and waited for at the end of backward. Their exposed time — the LAN channel run
over the gradient buckets (``pack_in_order``, the wrapper's rule) past the end of backward —
is added to the step: serially, so an upper bound where it overlaps the cross-site wait.

Where the site's network is driven by the cores that compute (a loopback here, any CPU-only
site), the reduction also takes CPU from forward and backward. The profiler measures that:
the same iterations with and without the site's gradient all-reduce
(``profiler.site_cost``); what the measured difference has beyond the modelled exposure is
the CPU the reduction took, kept per byte reduced (``TwoLevel.site_cpu_s_per_byte``) and
charged to every iteration in proportion to the profile's bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dreamddp.core.buckets import pack_in_order
from dreamddp.planning.profile import CommModel, Profile
from dreamddp.validation import require

__all__ = ["TwoLevel", "priced_two_level", "site_cpu_per_byte", "site_cpu_s", "site_gradient_s", "two_level_of"]

GRADIENT_CAP_BYTES = 25 * 2**20  # the wrapper's default bucket cap, which its gradient buckets use too


@dataclass(frozen=True)
class TwoLevel:
    """The two networks of a job with several ranks per site, as the profiler measured them."""

    sites: int
    ranks_per_site: int
    cross: CommModel  # one shard all-reduce across sites, with every local index's running at once
    intra: CommModel  # one all-reduce inside a site
    site_cpu_s_per_byte: float = 0.0  # compute the site's gradient all-reduce slows, per byte reduced

    def __post_init__(self) -> None:
        for what in ("sites", "ranks_per_site"):
            value = getattr(self, what)
            require(isinstance(value, int) and value >= 2, f"two_level {what}", "an integer >= 2", value)
        cpu = self.site_cpu_s_per_byte
        require(
            isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and math.isfinite(cpu) and cpu >= 0,
            "two_level site_cpu_s_per_byte",
            "a finite number >= 0",
            cpu,
        )

    def describe(self) -> str:
        return f"{self.sites} sites x {self.ranks_per_site} ranks"

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": self.sites,
            "ranks_per_site": self.ranks_per_site,
            "cross": _comm_dict(self.cross),
            "intra": _comm_dict(self.intra),
            "site_cpu_s_per_byte": self.site_cpu_s_per_byte,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> TwoLevel:
        if not isinstance(raw, Mapping):
            raise ValueError(f"profile metadata two_level must be an object, got {type(raw).__name__}")
        try:
            return cls(
                int(raw["sites"]),
                int(raw["ranks_per_site"]),
                _comm(raw["cross"]),
                _comm(raw["intra"]),
                raw.get("site_cpu_s_per_byte", 0.0),  # profiles from before it was measured: none
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"profile metadata two_level is malformed ({type(err).__name__}: {err})") from None


def two_level_of(profile: Profile) -> TwoLevel | None:
    """The profile's two-level measurements (None: measured with one rank per site, or flat)."""
    raw = profile.metadata.get("two_level")
    return None if raw is None else TwoLevel.from_dict(raw)


def site_gradient_s(profile: Profile, intra: CommModel, cap_bytes: int = GRADIENT_CAP_BYTES) -> float:
    """Exposed time of one iteration's site gradient all-reduce past the end of backward."""
    ready, total = [], 0.0
    for unit in profile.units:
        total += unit.backward_s
        ready.append(total)
    end = max(profile.backward_s, total)
    free = 0.0
    for bucket in pack_in_order([u.nbytes for u in profile.units], cap_bytes):
        free = max(ready[bucket[-1]], free) + intra.predict(sum(profile.units[i].nbytes for i in bucket))
    return max(0.0, free - end)


def site_cpu_s(profile: Profile, two_level: TwoLevel) -> float:
    """Compute time the site's gradient all-reduce takes from one iteration on shared cores."""
    return two_level.site_cpu_s_per_byte * sum(u.nbytes for u in profile.units)


def site_cpu_per_byte(profile: Profile, intra: CommModel, measured_extra_s: float, gradient_bytes: int) -> float:
    """The measured cost of the site's gradients beyond their modelled exposure, per byte reduced."""
    if gradient_bytes <= 0:
        return 0.0
    return max(0.0, measured_extra_s - site_gradient_s(profile, intra)) / gradient_bytes


def priced_two_level(profile: Profile, two_level: TwoLevel) -> Profile:
    """``profile`` as two-level DreamDDP runs it: the sharded cross-site price per byte, and the
    site's gradient all-reduce (its exposure and the CPU it takes) added to the step."""
    g = two_level.ranks_per_site
    comm = CommModel(
        two_level.cross.alpha_s + two_level.intra.alpha_s,
        two_level.cross.beta_s_per_byte / g + two_level.intra.beta_s_per_byte / 2,
        None,
        (),
        f"two-level {two_level.describe()}",
        two_level.cross.burst_s,  # the WAN's bucket; the site's own links are not shaped
    )
    priced = profile.with_comm(comm)
    return dataclasses.replace(
        priced,
        optimizer_s=profile.optimizer_s + site_gradient_s(profile, two_level.intra) + site_cpu_s(profile, two_level),
        metadata={**priced.metadata, "priced_for_sites": two_level.describe()},
    )


def _comm_dict(comm: CommModel) -> dict[str, Any]:
    return {
        "alpha_s": comm.alpha_s,
        "beta_s_per_byte": comm.beta_s_per_byte,
        "r2": comm.r2,
        "link": comm.link,
        "burst_s": comm.burst_s,
    }


def _comm(raw: Any) -> CommModel:
    return CommModel(
        raw["alpha_s"], raw["beta_s_per_byte"], raw.get("r2"), (), raw.get("link", ""), raw.get("burst_s", 0.0)
    )

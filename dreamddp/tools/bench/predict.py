"""Each benchmarked algorithm's predicted s/iteration from a profile, and the same at the
compute speed a run really had.

Why the second: on a shared machine the same forward and backward drift between the profile
and the runs, and between runs minutes apart. Measured on this project's 2-core machine: a
grid whose profile said 0.385 s of compute per iteration ran its methods at 0.34-0.52 s, the
compute-only reference itself 0.42 and 0.52 s in two repeats. So a raw prediction error mixes
the cost model's error with the machine's. Every run therefore reports its median forward
(its waits for averages excluded, ``dreamddp.training.summary.forward_compute_s``): in
backward mode nothing is in flight during a forward, so it is the machine's speed during that
run, whatever the run sends. The profile with its compute scaled by that run's forward over
the profile's gives the prediction at the run's speed; what is left is the cost model's own
error. The raw figure is reported too, and the interleaved compute-only run (``none``)
checks the compute-only prediction itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from dreamddp.core.schedule import Schedule
from dreamddp.planning import Timeline, plan, simulate, simulate_method
from dreamddp.planning.compression import priced_for
from dreamddp.planning.jitter import expected_iteration_s
from dreamddp.planning.profile import Profile
from dreamddp.planning.two_level import priced_two_level, two_level_of
from dreamddp.tools.bench.names import PLANNED, REFERENCE, PlannedVariant

__all__ = ["REFERENCE", "compute_only_s", "priced_variants", "predict_methods", "with_compute_scaled"]


def _base(profile: Profile, variant: PlannedVariant) -> Profile:
    """Two-level pricing where the profile was measured on sites of several ranks (and not flat)."""
    two_level = two_level_of(profile)
    return priced_two_level(profile, two_level) if two_level and variant.hierarchy != "flat" else profile


def priced_variants(profile: Profile) -> dict[str, Profile]:
    """The profile each planned variant is planned and predicted on (its payload, its levels)."""
    return {name: priced_for(_base(profile, variant), variant.sync_options) for name, variant in PLANNED.items()}


def predict_methods(profile: Profile, schedules: Mapping[str, Schedule], period: int) -> dict[str, float]:
    """Predicted s/iteration of every algorithm the bench runs, the planned ones on ``schedules``.

    Each is the expected time with every rank's compute varying as profiled
    (``dreamddp.planning.jitter``): synchronising ranks wait for the slowest.
    """
    world = int(profile.metadata.get("world_size", 2))

    def expected(priced: Profile, timeline: Timeline | None) -> float:
        return expected_iteration_s(priced, timeline, world)

    priced = priced_variants(profile)
    local = expected(profile, simulate_method(profile, "local_sgd", period))
    plain = _base(profile, PlannedVariant())
    predicted = {
        "ssgd": expected(profile, simulate_method(profile, "ssgd", 1)),
        "local_sgd": local,
        "post_local_sgd": local,  # torch's averager: every parameter after the step, every H
        "plsgd": expected(plain, simulate(plain, plan(plain, period, "plsgd"))),
        REFERENCE: expected(profile, None),
        **{name: expected(priced[name], simulate(priced[name], s)) for name, s in schedules.items()},
    }
    two_level = two_level_of(profile)
    if two_level is not None:  # the site's gradients every step, then a flat average every H
        site_step = priced_two_level(profile, two_level).optimizer_s
        with_site = dataclasses.replace(profile, optimizer_s=site_step)
        predicted["hier_local_sgd"] = expected(with_site, simulate_method(with_site, "local_sgd", period))
    return predicted


def compute_only_s(profile: Profile) -> float:
    """The compute-only reference's expected s/iteration: what the runs' drift is measured against."""
    return expected_iteration_s(profile, None, int(profile.metadata.get("world_size", 2)))


def with_compute_scaled(profile: Profile, factor: float) -> Profile:
    """``profile`` with every compute time (per unit and per iteration) times ``factor``; links unchanged."""
    if not factor > 0:
        raise ValueError(f"compute scale must be > 0, got {factor!r}")
    units = tuple(
        dataclasses.replace(u, forward_s=u.forward_s * factor, backward_s=u.backward_s * factor) for u in profile.units
    )
    return dataclasses.replace(
        profile,
        units=units,
        forward_s=profile.forward_s * factor,
        backward_s=profile.backward_s * factor,
        optimizer_s=profile.optimizer_s * factor,
        metadata={**profile.metadata, "compute_scaled_by": factor},
    )

"""Each benchmarked algorithm's predicted s/iteration from a profile, and the same at the
compute speed the runs really had.

Why the second: on a shared machine the same forward and backward drift between the profile
and the runs. Measured on this project's 2-core machine: a grid whose profile said 0.385 s of
compute per iteration ran its methods at 0.38-0.48 s of compute, so a raw prediction error
mixes the cost model's error with the machine's. The grid therefore runs ``none`` (no
communication) interleaved with the methods: its median over the profile's compute is the
drift, and the profile with its compute scaled by that drift gives the prediction at the
runs' speed. What is left is the cost model's own error. The raw figure is reported too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from dreamddp.core.schedule import Schedule
from dreamddp.planning import plan, simulate, simulate_method
from dreamddp.planning.compression import priced_for
from dreamddp.planning.profile import Profile
from dreamddp.planning.two_level import priced_two_level, two_level_of
from dreamddp.tools.bench.names import PLANNED, REFERENCE, PlannedVariant

__all__ = ["REFERENCE", "priced_variants", "predict_methods", "with_compute_scaled"]


def _base(profile: Profile, variant: PlannedVariant) -> Profile:
    """Two-level pricing where the profile was measured on sites of several ranks (and not flat)."""
    two_level = two_level_of(profile)
    return priced_two_level(profile, two_level) if two_level and variant.hierarchy != "flat" else profile


def priced_variants(profile: Profile) -> dict[str, Profile]:
    """The profile each planned variant is planned and predicted on (its payload, its levels)."""
    return {name: priced_for(_base(profile, variant), variant.sync_options) for name, variant in PLANNED.items()}


def predict_methods(profile: Profile, schedules: Mapping[str, Schedule], period: int) -> dict[str, float]:
    """Predicted s/iteration of every algorithm the bench runs, the planned ones on ``schedules``."""
    priced = priced_variants(profile)
    local = simulate_method(profile, "local_sgd", period).iteration_s
    plain = _base(profile, PlannedVariant())
    predicted = {
        "ssgd": simulate_method(profile, "ssgd", 1).iteration_s,
        "local_sgd": local,
        "post_local_sgd": local,  # torch's averager: every parameter after the step, every H
        "plsgd": simulate(plain, plan(plain, period, "plsgd")).iteration_s,
        REFERENCE: profile.compute_s,
        **{name: simulate(priced[name], s).iteration_s for name, s in schedules.items()},
    }
    two_level = two_level_of(profile)
    if two_level is not None:  # the site's gradients every step, then a flat average every H
        site_step = priced_two_level(profile, two_level).optimizer_s
        predicted["hier_local_sgd"] = simulate_method(
            dataclasses.replace(profile, optimizer_s=site_step), "local_sgd", period
        ).iteration_s
    return predicted


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

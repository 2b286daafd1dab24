"""Price a sync's payload for the planner: compressed bytes on the wire plus the codec's compute.

``sync="delta"`` sends Δ, possibly compressed (``dreamddp.core.compress``). Buckets are still
packed on the weights' own bytes — the wrapper packs them so, and the planner shares its
rule — so compression changes the *price* of a byte, not the buckets: β is scaled by the
fraction of bytes the compressed collective really carries (int8's all-gather included), and
the codec's measured compute per byte (``profiler.codec``, in the profile's metadata) is added
to the same channel time: encoding delays a bucket's launch, decoding its landing.
"""

from __future__ import annotations

import dataclasses
import logging

from dreamddp.core.compress import compressed_fraction
from dreamddp.core.sync_options import SyncOptions
from dreamddp.planning.profile import Profile

__all__ = ["FALLBACK_CODEC_S_PER_BYTE", "auto_within", "codec_seconds_per_byte", "priced_for", "wire_fraction"]

logger = logging.getLogger(__name__)


# For profiles written before the profiler measured codecs: this machine's measurement (2 CPU
# cores, 1 Mi elements, `profiler.codec.profile_codecs`), rounded up. A constant, not a fresh
# measurement, so that the same profile always gives the same schedule.
FALLBACK_CODEC_S_PER_BYTE = {"none": 1e-9, "bf16": 1.5e-9, "int8": 3e-9}


def codec_seconds_per_byte(profile: Profile, compress: str) -> float:
    """The profile's measured codec cost (``FALLBACK_CODEC_S_PER_BYTE`` for profiles without one)."""
    measured = profile.metadata.get("codec_s_per_byte")
    if isinstance(measured, dict) and isinstance(measured.get(compress), (int, float)):
        return float(measured[compress])
    logger.info(
        "profile has no codec measurement: pricing %s at %.1e s/byte", compress, FALLBACK_CODEC_S_PER_BYTE[compress]
    )
    return FALLBACK_CODEC_S_PER_BYTE[compress]


def wire_fraction(profile: Profile, options: SyncOptions) -> float:
    """Bytes the sync's collective carries per byte of the weights (1 when averaging)."""
    if not options.delta:
        return 1.0
    return compressed_fraction(options.compress, options.compress_block, _world(profile))


def priced_for(profile: Profile, options: SyncOptions) -> Profile:
    """``profile`` with communication priced for ``options``' payload (unchanged when averaging)."""
    if not options.delta or profile.comm is None:
        return profile
    fraction = wire_fraction(profile, options)
    comm = dataclasses.replace(
        profile.comm,
        beta_s_per_byte=profile.comm.beta_s_per_byte * fraction + codec_seconds_per_byte(profile, options.compress),
        r2=None,
        points=(),
    )
    priced = profile.with_comm(comm)
    return dataclasses.replace(priced, metadata={**priced.metadata, "priced_for": options.describe()})


def auto_within(options: SyncOptions) -> float:
    """How close to the lower bound ``period="auto"`` must predict: closer (a longer H) with outer momentum."""
    from dreamddp.planning import AUTO_WITHIN, AUTO_WITHIN_OUTER

    return AUTO_WITHIN_OUTER if options.delta and options.momentum > 0 else AUTO_WITHIN


def _world(profile: Profile) -> int:
    world = profile.metadata.get("world_size", 2)
    return world if isinstance(world, int) and world >= 1 else 2

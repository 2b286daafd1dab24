"""Measure what the scheduler needs: per-unit compute times and the cost of an all-reduce.

- ``profile_compute``: per sync unit, in backward order, forward time and backward window,
  from hooks on the plain model (no device syncs inside hooks);
- ``profile_comm``: an alpha-beta fit of all-reduce time on the live process group;
- ``Profile``: both together, as versioned JSON (``dreamddp.profile/1``);
- ``refresh`` / ``compare``: re-measure a profile from a running job's observed timings.
"""

from dreamddp.planning.profile import PROFILE_FORMAT, CommModel, Profile, Spread, UnitProfile
from profiler.comm import profile_comm
from profiler.compute import profile_compute
from profiler.observed import compare, refresh

__all__ = [
    "PROFILE_FORMAT",
    "CommModel",
    "Profile",
    "Spread",
    "UnitProfile",
    "compare",
    "profile_comm",
    "profile_compute",
    "refresh",
]

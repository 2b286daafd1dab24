"""dreamddp: layer-wise scheduled partial synchronisation for data-parallel training on slow links.

The public API, and nothing else: the wrapper, the schedule, the model's sync units, and
planning a schedule from a profile (``plan``) and predicting its timeline (``simulate``).
"""

from .ddp import DreamDDP, IterationStats
from .schedule import Schedule
from .units import SyncUnit, sync_units

__all__ = ["DreamDDP", "IterationStats", "Schedule", "SyncUnit", "plan", "simulate", "sync_units"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``plan`` and ``simulate`` load on first use: the scheduler reads profiler.Profile, and the
    profiler itself imports dreamddp's units, so an eager import here would be circular."""
    if name in ("plan", "simulate"):
        from . import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'dreamddp' has no attribute {name!r}")

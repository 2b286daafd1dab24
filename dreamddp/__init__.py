"""dreamddp: layer-wise scheduled partial synchronisation for data-parallel training on slow links.

The public API, and nothing else: the wrapper, the schedule, the model's sync units, and
planning a schedule from a profile (``plan``) and predicting its timeline (``simulate``).
"""

from dreamddp.core.ddp import DreamDDP, IterationStats
from dreamddp.core.schedule import Schedule
from dreamddp.core.units import SyncUnit, sync_units
from dreamddp.planning import plan, simulate

__all__ = ["DreamDDP", "IterationStats", "Schedule", "SyncUnit", "plan", "simulate", "sync_units"]
__version__ = "0.1.0"

"""dreamddp: layer-wise scheduled partial synchronisation for data-parallel training on slow links.

The public API, and nothing else: the wrapper, the schedule, and the model's sync units.
"""

from .ddp import DreamDDP, IterationStats
from .schedule import Schedule
from .units import SyncUnit, sync_units

__all__ = ["DreamDDP", "IterationStats", "Schedule", "SyncUnit", "sync_units"]
__version__ = "0.1.0"

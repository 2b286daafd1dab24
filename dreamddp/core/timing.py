"""Timestamps that never serialise a run, and what the wrapper observed in real iterations.

On CPU a mark is ``time.perf_counter_ns()``; on CUDA it is a ``torch.cuda.Event`` recorded
on the current stream, read only after one final synchronisation. Hooks take marks; nothing
inside a hook ever waits for the device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Clock", "ObservedBucket", "ObservedIteration"]


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter_ns()

    def seconds(self, start: Any, end: Any) -> float:
        if self.cuda:
            return start.elapsed_time(end) / 1e3
        return (end - start) / 1e9

    def settle(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class ObservedBucket:
    """One all-reduce of a real iteration: its units, bytes, and launch/finish times (s)."""

    units: list[str]
    nbytes: int
    launch_s: float
    done_s: float


@dataclass
class ObservedIteration:
    """Times in seconds since the wrapper's forward returned (≈ when backward started)."""

    iteration: int
    phase: int
    ready_s: dict[str, float] = field(default_factory=dict)  # unit -> gradients complete
    buckets: list[ObservedBucket] = field(default_factory=list)
    backward_end_s: float = 0.0  # the end-of-backward callback ran
    origin_ns: int | None = None  # perf_counter_ns() of the origin on CPU (None on CUDA: device time)

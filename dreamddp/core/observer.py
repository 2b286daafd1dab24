"""The timing observer behind ``DreamDDP(record_timings=True)``.

Hooks only take marks (``Clock``): a CUDA event or ``perf_counter_ns``. Marks are kept raw
per iteration and turned into seconds (``ObservedIteration``) only when someone asks, so a
training step never waits for the device because it is being watched.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dreamddp.core.buckets import Bucket
from dreamddp.core.collectives import BucketSync
from dreamddp.core.timing import Clock, ObservedBucket, ObservedIteration

__all__ = ["TIMINGS_KEPT", "TimingObserver"]

TIMINGS_KEPT = 1024  # iterations of observed timings a wrapper keeps (record_timings=True)


@dataclass
class _RawBucket:
    units: list[str]  # in registration order
    average: BucketSync  # its finish time (CPU) arrives on the average's future
    launch: Any  # mark


@dataclass
class _RawIteration:
    iteration: int
    phase: int
    origin: Any  # mark: the wrapper's forward returned (or the first launch, without one)
    ready: dict[str, Any]  # unit -> mark: gradients complete
    buckets: list[_RawBucket]
    end: Any  # mark: the end-of-backward callback finished waiting

    def landing(self) -> bool:
        """Some bucket's finish is not known yet (forward overlap: still on the wire)."""
        return any(b.average.done_ns is None for b in self.buckets)


class TimingObserver:
    """Marks of the current backward, and the last ``TIMINGS_KEPT`` iterations' worth."""

    def __init__(self, device: torch.device) -> None:
        self.clock = Clock(device)
        self._raw: collections.deque[_RawIteration] = collections.deque(maxlen=TIMINGS_KEPT)
        self._observed: collections.deque[ObservedIteration] = collections.deque(maxlen=TIMINGS_KEPT)
        self._forward: Any = None
        self._ready: dict[int, Any] = {}
        self._launches: list[Any] = []

    def forward_returned(self) -> None:
        self._forward = self.clock.mark()

    def backward_started(self) -> None:
        self._ready, self._launches = {}, []

    def unit_ready(self, unit_id: int) -> None:
        self._ready[unit_id] = self.clock.mark()

    def bucket_launched(self) -> None:
        self._launches.append(self.clock.mark())

    def backward_finished(
        self, iteration: int, phase: int, names: Sequence[str], launched: Sequence[tuple[Bucket, BucketSync]]
    ) -> None:
        """Keep this backward's raw marks; ``names``: unit id -> name."""
        end = self.clock.mark()
        buckets = [
            _RawBucket([names[i] for i in sorted(bucket.units)], average, launch)
            for (bucket, average), launch in zip(launched, self._launches)
        ]
        origin = self._forward if self._forward is not None else (self._launches or [end])[0]
        ready = {names[i]: mark for i, mark in self._ready.items()}
        self._raw.append(_RawIteration(iteration, phase, origin, ready, buckets, end))

    def observed(self, iteration: int) -> list[ObservedIteration]:
        """What the kept iterations did, in seconds; ``iteration``: the wrapper's counter now.

        Converting CUDA events needs one device synchronisation, done here, once, not in hooks.
        """
        if self._raw:
            self.clock.settle()
            while self._raw:
                # With forward overlap a bucket may still be landing: leave its iteration for
                # the next call (for at most two iterations; then its finish counts as unknown).
                raw = self._raw[0]
                if raw.landing() and not self.clock.cuda and raw.iteration >= iteration - 2:
                    break
                self._observed.append(self._convert(self._raw.popleft()))
        return list(self._observed)

    def _convert(self, raw: _RawIteration) -> ObservedIteration:
        clock = self.clock

        def seconds(mark: Any) -> float:
            return clock.seconds(raw.origin, mark)

        return ObservedIteration(
            iteration=raw.iteration,
            phase=raw.phase,
            ready_s={name: seconds(mark) for name, mark in raw.ready.items()},
            buckets=[
                ObservedBucket(
                    b.units,
                    b.average.nbytes,
                    seconds(b.launch),
                    seconds(b.average.done_ns if b.average.done_ns is not None and not clock.cuda else raw.end),
                )
                for b in raw.buckets
            ],
            backward_end_s=seconds(raw.end),
            origin_ns=None if clock.cuda else raw.origin,
        )

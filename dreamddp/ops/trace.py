"""A Chrome/Perfetto trace of real training iterations (``--trace out.json``).

The scheduler's simulator writes the *predicted* timeline in this format; this module writes
what really happened, so the two can be opened side by side (ui.perfetto.dev or
chrome://tracing) and compared: which all-reduces ran behind backward, and which were waited
for. Same event shape as ``Timeline.to_chrome_trace``: complete events (``"ph": "X"``) in
microseconds, a ``compute`` lane (tid 0) with ``forward`` / ``backward`` / ``wait`` /
``optimizer`` slices and ``args.phase``; communication on lanes from tid 1. Differences, because
reality has more detail: one process per rank (pid = rank), per-unit backward slices nested
inside ``backward`` (from the gradient-ready hooks), and one lane per bucket all-reduce
(``comm bucket k``) since buckets of one iteration may overlap on the wire.

Times are host ``perf_counter`` readings taken by the trainer and by DreamDDP's hooks (CPU).
On CUDA the hook times are device-event times aligned at the end of forward, so lanes within
a rank agree to the event resolution.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from dreamddp.core.timing import ObservedIteration
from dreamddp.ops.files import atomic_write

__all__ = ["IterationMarks", "TraceRecorder"]


@dataclass
class IterationMarks:
    """Host perf_counter_ns() marks the trainer takes around one iteration."""

    step: int
    phase: int
    start: int
    forward_end: int
    backward_end: int  # loss.backward() returned (DreamDDP's end-of-backward wait included)
    optimizer_end: int
    end: int  # after the strategy's after-step communication
    backward_wait_s: float = 0.0  # the part of backward spent waiting for all-reduces
    after_step_wait_s: float = 0.0  # time the after-step communication blocked
    # overlap="forward": (kind, units, start_ns, end_ns) waits and held-back steps inside forward
    forward_events: list[tuple[str, str, int, int]] = field(default_factory=list)


class TraceRecorder:
    """Collects ``limit`` iterations on each rank; ``write`` gathers them into one file."""

    def __init__(self, path: str, first_step: int, limit: int = 50) -> None:
        self.path = path
        self.first_step = first_step
        self.limit = limit
        self.marks: list[IterationMarks] = []

    def wants(self, step: int) -> bool:
        return self.first_step <= step < self.first_step + self.limit

    def add(self, marks: IterationMarks) -> None:
        self.marks.append(marks)

    def events(self, rank: int, observed: list[ObservedIteration], method: str) -> list[dict[str, Any]]:
        """This rank's events; ``observed`` are DreamDDP's hook timings (may be empty)."""
        if not self.marks:
            return []
        by_iteration = {o.iteration: o for o in observed}
        zero = self.marks[0].start
        us = lambda ns: (ns - zero) / 1e3  # noqa: E731 - tiny local converter
        events: list[dict[str, Any]] = []
        comm_lanes: set[int] = set()

        def slice_(name: str, tid: int, start_us: float, dur_us: float, **args: Any) -> None:
            if dur_us > 0:
                events.append(
                    {"name": name, "ph": "X", "pid": rank, "tid": tid, "ts": start_us, "dur": dur_us, "args": args}
                )

        for m in self.marks:
            wait_start = m.backward_end - int(m.backward_wait_s * 1e9)
            slice_("forward", 0, us(m.start), us(m.forward_end) - us(m.start), phase=m.phase, step=m.step)
            slice_("backward", 0, us(m.forward_end), us(wait_start) - us(m.forward_end), phase=m.phase, step=m.step)
            slice_("wait", 0, us(wait_start), us(m.backward_end) - us(wait_start), phase=m.phase, step=m.step)
            slice_(
                "optimizer", 0, us(m.backward_end), us(m.optimizer_end) - us(m.backward_end), phase=m.phase, step=m.step
            )
            slice_(
                "wait",
                0,
                us(m.optimizer_end),
                us(m.end) - us(m.optimizer_end),
                phase=m.phase,
                step=m.step,
                what="after-step communication",
            )
            for kind, units, start, end in m.forward_events:  # nested inside forward, as the simulator draws them
                slice_(
                    kind,
                    0,
                    us(start),
                    us(end) - us(start),
                    phase=m.phase,
                    step=m.step,
                    unit=units,
                    what="average landing before forward" if kind == "wait" else "held-back step",
                )
            seen = by_iteration.get(m.step)
            if seen is None:
                continue
            # Hook times are relative to the end of DreamDDP's forward; place them on this clock.
            origin = seen.origin_ns if seen.origin_ns is not None else m.forward_end
            at = functools.partial(_hook_time_us, origin, zero)
            previous = us(m.forward_end)
            for unit, ready in sorted(seen.ready_s.items(), key=lambda kv: kv[1]):
                slice_(unit, 0, previous, at(ready) - previous, phase=m.phase, what="backward of unit")
                previous = max(previous, at(ready))
            for k, bucket in enumerate(seen.buckets):
                comm_lanes.add(k)
                slice_(
                    "+".join(bucket.units),
                    1 + k,
                    at(bucket.launch_s),
                    at(bucket.done_s) - at(bucket.launch_s),
                    phase=m.phase,
                    bytes=bucket.nbytes,
                    step=m.step,
                )
        meta = [
            {"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank} ({method}, measured)"}},
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "compute"}},
        ]
        meta += [
            {"name": "thread_name", "ph": "M", "pid": rank, "tid": 1 + k, "args": {"name": f"comm bucket {k}"}}
            for k in sorted(comm_lanes)
        ]
        return meta + events

    def write(self, observed: list[ObservedIteration], method: str) -> None:
        """Collective: every rank's events are gathered and rank 0 writes the file."""
        rank = dist.get_rank()
        mine = self.events(rank, observed, method)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if rank != 0:
            return
        trace = {
            "traceEvents": [e for part in gathered for e in part],
            "displayTimeUnit": "ms",
            "metadata": {"method": method, "source": "measured", "world_size": len(gathered)},
        }
        with atomic_write(self.path, fsync=False) as f:  # a trace is looked at, never resumed from
            json.dump(trace, f)


def _hook_time_us(origin_ns: int, zero_ns: int, seconds: float) -> float:
    """A hook time (``seconds`` after ``origin_ns``) in trace microseconds since ``zero_ns``."""
    return (origin_ns + int(seconds * 1e9) - zero_ns) / 1e3

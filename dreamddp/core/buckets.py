"""The bucket plan: which units one all-reduce carries. Pure, so planner and wrapper share it.

The wrapper lays every unit's tensors out in flat buffers (one per dtype and device) in launch
order, so a run of units adjacent in a buffer is one in-place view: one all-reduce, no copy.
The planner prices the same all-reduces from a profile. Both used to pack buckets with their
own loop, and a prediction that packs differently from the execution is silently wrong; so
both describe their units as ``Segment``\\ s and call ``plan_buckets``:

- the wrapper: each unit's slices of the flat storage (elements), in launch order;
- the cost model: unit i of a profile as bytes ``[offset_i, offset_i + nbytes_i)`` of one
  buffer, in backward order — an unscheduled unit in between breaks adjacency exactly as its
  slice of the flat storage does;
- tensor lists that are copied into one buffer per bucket (``pack_in_order``): each item is
  laid right after the previous item of its key, so consecutive items of a key are adjacent.

The rule (the wrapper's since the start): walk the scheduled segments in order; a segment
joins the open bucket (the last one formed) when it is in the same buffer, starts where the
bucket ends, and the bucket stays within the cap; otherwise it opens a new bucket. So a
segment larger than the cap gets a bucket of its own (never split), and a unit spread over
several buffers (several dtypes) gives one bucket per buffer run — its next unit's slice in
the first buffer opens a new bucket even if adjacent, because the open bucket is elsewhere.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Bucket", "Segment", "pack_in_order", "plan_buckets"]


@dataclass(frozen=True)
class Segment:
    """A contiguous slice ``[start, end)`` of buffer ``key`` owned by one unit (elements or bytes)."""

    unit_id: int
    key: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Bucket:
    """One all-reduce: ``[start, end)`` of buffer ``key``, carrying ``units`` (in the order they joined)."""

    units: tuple[int, ...]
    key: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def plan_buckets(
    segments: Iterable[Segment],
    cap: float | Mapping[int, float],
    *,
    scheduled: Container[int] | None = None,
    first_cap: float | None = None,
) -> list[Bucket]:
    """Pack ``segments`` (launch order, a unit's own one after another) of the ``scheduled``
    units (all if None) into buckets.

    ``cap``: the largest bucket, in the segments' unit, for every buffer or per buffer key.
    ``first_cap``: a different cap for the first bucket only (torch DDP's small first bucket,
    which starts the first all-reduce early; used to model the S-SGD baseline).
    """
    buckets: list[Bucket] = []
    units: list[int] = []  # the open bucket, kept mutable: the planner calls this in its inner loops
    key = start = end = 0
    for seg in segments:
        if scheduled is not None and seg.unit_id not in scheduled:
            continue
        if units:
            limit = first_cap if first_cap is not None and not buckets else _cap_of(cap, seg.key)
            if key == seg.key and end == seg.start and seg.end - start <= limit:
                if units[-1] != seg.unit_id:  # a unit's segments come one after another
                    units.append(seg.unit_id)
                end = seg.end
                continue
            buckets.append(Bucket(tuple(units), key, start, end))
        units, key, start, end = [seg.unit_id], seg.key, seg.start, seg.end
    if units:
        buckets.append(Bucket(tuple(units), key, start, end))
    return buckets


def pack_in_order(
    sizes: Sequence[int],
    cap: float,
    *,
    keys: Sequence[Hashable] | None = None,
    first_cap: float | None = None,
) -> list[list[int]]:
    """Items (indices into ``sizes``) packed in the given order, as buckets that copy them together.

    Items of different ``keys`` (dtype and device) never share a bucket; consecutive items of
    one key do while the bucket stays within ``cap``. Nothing needs to be adjacent in memory:
    each item is laid right after the previous item of its key.
    """
    index: dict[Hashable, int] = {}
    ends: dict[int, int] = {}
    segments = []
    for i, size in enumerate(sizes):
        key = index.setdefault(keys[i] if keys is not None else None, len(index))
        start = ends.get(key, 0)
        segments.append(Segment(i, key, start, start + size))
        ends[key] = start + size
    return [list(b.units) for b in plan_buckets(segments, cap, first_cap=first_cap)]


def _cap_of(cap: float | Mapping[int, float], key: int) -> float:
    return cap[key] if isinstance(cap, Mapping) else cap

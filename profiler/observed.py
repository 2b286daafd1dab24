"""Refresh a Profile from what a running DreamDDP job observed, and compare the two.

``DreamDDP(..., record_timings=True)`` keeps, per iteration, when each unit's gradients were
ready and when each bucket's all-reduce was launched and finished. From those this module
recomputes each unit's backward window (median over iterations) and refits the comm model on
the bucket service times (finish minus the later of launch and the previous bucket's finish —
the link is a serial channel), so a long job can re-plan on what its cluster does today.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from dreamddp.core.timing import ObservedIteration
from dreamddp.planning.profile import CommModel, Profile

__all__ = ["refresh", "compare"]


def refresh(profile: Profile, observed: Sequence[ObservedIteration]) -> Profile:
    """``profile`` with backward windows and the comm model re-measured from ``observed``."""
    if not observed:
        raise ValueError("no observed iterations: build DreamDDP with record_timings=True and train a few steps")
    windows: dict[str, list[float]] = {}
    points: list[tuple[int, float]] = []
    for it in observed:
        previous = 0.0
        for name, ready in sorted(it.ready_s.items(), key=lambda kv: kv[1]):
            windows.setdefault(name, []).append(max(0.0, ready - previous))
            previous = ready
        channel_free = float("-inf")
        for k, bucket in enumerate(sorted(it.buckets, key=lambda b: b.launch_s)):
            start = max(bucket.launch_s, channel_free)
            seconds = max(0.0, bucket.done_s - start)
            if k == 0:  # the iteration's first bucket spent the shaper's burst: count it back in
                seconds += _burst_spent(profile, bucket.nbytes)
            points.append((bucket.nbytes, seconds))
            channel_free = bucket.done_s
    units = tuple(
        dataclasses.replace(u, backward_s=statistics.median(windows[u.name])) if u.name in windows else u
        for u in profile.units
    )
    refreshed = dataclasses.replace(
        profile,
        units=units,
        backward_s=sum(u.backward_s for u in units),
        metadata={**profile.metadata, "refreshed_from_iterations": len(observed)},
    )
    if len({b for b, _ in points}) >= 2:
        link = profile.comm.link if profile.comm is not None else ""
        fitted = CommModel.fit(points, link=link)
        refreshed = refreshed.with_comm(dataclasses.replace(fitted, burst_s=_burst_now(profile.comm, fitted)))
    return refreshed


def _burst_spent(profile: Profile, nbytes: int) -> float:
    """What the profile's burst saved an all-reduce of ``nbytes`` after idle."""
    comm = profile.comm
    return 0.0 if comm is None else comm.credit(comm.burst_s, nbytes)


def _burst_now(before: CommModel | None, now: CommModel) -> float:
    """The profile's burst on today's link: a bucket of bytes, so its time scales with beta."""
    if before is None or before.burst_s <= 0 or before.beta_s_per_byte <= 0:
        return 0.0
    return before.burst_s * now.beta_s_per_byte / before.beta_s_per_byte


def compare(predicted: Profile, observed: Profile) -> str:
    """A text table of predicted vs observed backward windows and comm times, per unit."""
    by_name = {u.name: u for u in observed.units}
    lines = [f"{'unit':<28} {'bwd pred ms':>11} {'bwd obs ms':>10} {'comm pred ms':>12} {'comm obs ms':>11}"]
    for u in predicted.units:
        o = by_name.get(u.name, u)
        lines.append(
            f"{u.name[:28]:<28} {u.backward_s * 1e3:>11.2f} {o.backward_s * 1e3:>10.2f} "
            f"{u.comm_s * 1e3:>12.2f} {o.comm_s * 1e3:>11.2f}"
        )
    return "\n".join(lines)

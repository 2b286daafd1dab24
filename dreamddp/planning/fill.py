"""Backward-mode fill-in in one sweep per iteration: extra syncs where the link is idle anyway.

The rule is the planner's since the start: for each iteration, the units not averaged there are
tried in backward order, and each is kept when that iteration's exposed time does not grow.
Pricing every trial from scratch is O(L) per trial and O(H L^2) in all: 6 s on 1,300 units.
Here a trial costs O(1) in the common case, because a unit added at position i changes only
the bucket it joins or opens: the buckets before it are already settled (the sweep goes in
backward order, so they hold the units kept so far), and the ones after it are the iteration's
original units, whose effect on the finish time is tabulated once per iteration as a function
of when the channel becomes free before them. Only a unit adjacent to the next original run
(it would merge into that run's buckets) re-packs that run.

Zero-byte units break the "adjacent means next" shortcut the tables rely on, so a profile with
any falls back to pricing each trial in full (small synthetic profiles only).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from dreamddp.planning.interleave import FastCost

__all__ = ["fill_groups"]

_EPS = 1e-12


class _Channel:
    """The serial channel's state while units are appended in backward order: settled buckets
    (only their end time matters) and the open bucket (bytes [start, end), last unit)."""

    __slots__ = ("free", "start", "end", "last")

    def __init__(self) -> None:
        self.free = 0.0  # when the settled buckets are done
        self.start = self.end = self.last = -1  # no open bucket

    def copy(self) -> _Channel:
        other = _Channel()
        other.free, other.start, other.end, other.last = self.free, self.start, self.end, self.last
        return other


class _Sweep:
    """Fill-in for one iteration's group: ``members`` ascending; ``cost`` prices a group exactly."""

    def __init__(self, cost: FastCost, members: Sequence[int]) -> None:
        self.c = cost
        self.members = list(members)
        self.base = cost(self.members)
        self._tabulate()

    # -- the channel rules, as in FastCost: adjacent bytes within the cap join the open bucket
    def _push(self, ch: _Channel, k: int) -> None:
        c = self.c
        if ch.last >= 0 and self._joins(ch, k):
            ch.end, ch.last = c.starts[k] + c.nbytes[k], k
            return
        self._close(ch)
        ch.start, ch.end, ch.last = c.starts[k], c.starts[k] + c.nbytes[k], k

    def _close(self, ch: _Channel) -> None:
        if ch.last < 0:
            return
        c = self.c
        r = c.ready[ch.last]
        ch.free = max(r, ch.free) + self._duration(ch)
        ch.last = -1

    def _tabulate(self) -> None:
        """For each original member m that starts a run: the durations from that run on (D) and
        the latest finish those buckets force on their own (Y), so that a channel free at F before
        the run finishes at max(F + D, Y)."""
        c, m = self.c, self.members
        runs: list[list[int]] = []
        for idx, k in enumerate(m):
            adjacent = idx > 0 and not c.per_unit and c.starts[m[idx - 1]] + c.nbytes[m[idx - 1]] == c.starts[k]
            if adjacent:
                runs[-1].append(k)
            else:
                runs.append([k])
        self.runs = runs
        self.D = [0.0] * (len(runs) + 1)
        self.Y = [float("-inf")] * (len(runs) + 1)
        for r in range(len(runs) - 1, -1, -1):
            finishes = self._buckets(runs[r])  # (release, duration) of each bucket
            total = sum(d for _, d in finishes)
            y, suffix = float("-inf"), 0.0
            for release, duration in reversed(finishes):
                suffix += duration
                y = max(y, release + suffix)
            self.D[r] = total + self.D[r + 1]
            self.Y[r] = max(y + self.D[r + 1], self.Y[r + 1])
        self.first_of_run = {run[0]: r for r, run in enumerate(runs)}

    def _buckets(self, units: Sequence[int]) -> list[tuple[float, float]]:
        """(release, duration) of each bucket ``units`` (one run) form on their own."""
        c, out = self.c, []
        ch = _Channel()
        for k in units:
            if ch.last >= 0 and not self._joins(ch, k):
                out.append((c.ready[ch.last], self._duration(ch)))
                ch.last = -1
            if ch.last >= 0:
                ch.end, ch.last = c.starts[k] + c.nbytes[k], k
            else:
                ch.start, ch.end, ch.last = c.starts[k], c.starts[k] + c.nbytes[k], k
        if ch.last >= 0:
            out.append((c.ready[ch.last], self._duration(ch)))
        return out

    def _joins(self, ch: _Channel, k: int) -> bool:
        """Whether unit ``k`` joins the open bucket: adjacent bytes, within the cap (plan_buckets' rule)."""
        c = self.c
        return not c.per_unit and c.starts[k] == ch.end and c.starts[k] + c.nbytes[k] - ch.start <= c.cap

    def _duration(self, ch: _Channel) -> float:
        c = self.c
        return c.comm[ch.last] if c.per_unit else (c.alpha + c.beta * (ch.end - ch.start))

    def _finish(self, ch: _Channel, next_run: int) -> float:
        """Finish time: the channel ``ch`` (open bucket included), then original runs from ``next_run``."""
        c = self.c
        if next_run < len(self.runs):
            first = self.runs[next_run][0]
            if ch.last >= 0 and not c.per_unit and c.starts[first] == ch.end:
                # The open bucket runs into the next original run: re-pack that run from here.
                ch = ch.copy()
                for k in self.runs[next_run]:
                    self._push(ch, k)
                next_run += 1
        ch = ch.copy()
        self._close(ch)
        if next_run >= len(self.runs):
            return ch.free
        return max(ch.free + self.D[next_run], self.Y[next_run])

    def run(self, n: int) -> list[int]:
        """The units kept: every member, plus each non-member whose addition keeps the cost."""
        c = self.c
        members = set(self.members)
        kept: list[int] = []
        ch = _Channel()
        next_run = 0
        allowed = self.base + _EPS  # the exposed time may not grow (compared as the slow rule does)
        for k in range(n):
            if k in members:
                if self.first_of_run.get(k) == next_run:
                    next_run += 1
                self._push(ch, k)
                kept.append(k)
                continue
            trial = ch.copy()
            self._push(trial, k)
            if max(0.0, self._finish(trial, next_run) - c.end) <= allowed:
                ch = trial
                kept.append(k)
        return kept


def fill_groups(cost: FastCost, groups: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Each group with the units added that cost it nothing, in backward order.

    With a shaper's burst (``cost.burst``) the tables above do not hold (the burst shortens
    whichever buckets come first), so the sweep runs on the burst-free price and its result is
    kept where the exact price did not grow; otherwise that group is filled trial by trial.
    """
    if not cost.per_unit and any(size == 0 for size in cost.nbytes):
        return [_fill_slow(cost, g, n) for g in groups]
    if cost.burst <= 0:
        return [_Sweep(cost, sorted(g)).run(n) for g in groups]
    plain = copy.copy(cost)
    plain.burst = 0.0
    filled = []
    for group in groups:
        members = sorted(group)
        swept = _Sweep(plain, members).run(n)
        filled.append(swept if cost(swept) <= cost(members) + _EPS else _fill_slow(cost, members, n))
    return filled


def _fill_slow(cost: FastCost, group: Sequence[int], n: int) -> list[int]:
    members = sorted(group)
    base = cost(members)
    for k in range(n):
        if k in members:
            continue
        trial = sorted([*members, k])
        if cost(trial) <= base + _EPS:
            members = trial
    return members

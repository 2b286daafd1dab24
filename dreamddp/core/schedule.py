"""Schedule: which sync units are averaged in which iteration of the period.

A schedule is a period H and, for every unit name, the iterations h in [0, H) at which that
unit's parameters are averaged. Iteration t of training uses h = t mod H. Every unit must be
averaged at least once per period — that is what bounds how far the ranks' models drift — and
may be averaged more often (the scheduler's fill-in does that where the link is idle).

Two optional fields record what the plan assumed about overlap (see
``dreamddp.planning.simulate``): ``overlap`` — ``"backward"`` (the paper: every average is
waited for at the end of backward) or ``"forward"`` (a unit's average is waited for just before
its next forward) — and, for forward overlap only, ``delays``: unit name -> d >= 0, letting a
unit's average land d whole iterations later still (it then steps locally at once and is
corrected when the average lands). A delay must be shorter than the gap to the unit's next
average, so that at most one average of a unit is ever in flight.

Schedules are plain data: built by the baseline constructors here, by the scheduler, or read
from a versioned JSON file, and validated against the model's units when DreamDDP is built.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dreamddp.core.units import SyncUnit
from dreamddp.ops.files import read_json, write_json_atomic
from dreamddp.validation import is_int, positive_int

__all__ = ["OVERLAPS", "SCHEDULE_FORMAT", "Schedule"]

SCHEDULE_FORMAT = "dreamddp.schedule/1"
OVERLAPS = ("backward", "forward")


@dataclass(frozen=True)
class Schedule:
    """Period ``period`` and ``assignment``: unit name -> sorted iterations in [0, period).

    ``delays`` (unit name -> iterations, zeros dropped) and ``overlap`` say how the plan
    expects the averages to be waited for; old code that passes neither gets the paper's mode.
    """

    period: int
    assignment: Mapping[str, tuple[int, ...]]
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)
    delays: Mapping[str, int] = field(default_factory=dict)
    overlap: str = "backward"

    def __post_init__(self) -> None:
        positive_int("schedule period", self.period)
        if not isinstance(self.assignment, Mapping):
            raise ValueError(
                f"schedule assignment must map unit names to iterations, got {type(self.assignment).__name__}"
            )
        normalised: dict[str, tuple[int, ...]] = {}
        for name, iterations in self.assignment.items():
            if not isinstance(name, str):
                raise ValueError(f"schedule unit names must be strings, got {name!r}")
            raw: Any = iterations  # from JSON or a caller: a single int is one iteration
            try:
                its = [raw] if is_int(raw) else list(raw)
            except TypeError:
                raise ValueError(f"schedule: unit {name!r} must list iterations, got {iterations!r}") from None
            for h in its:
                if not (is_int(h) and 0 <= h < self.period):
                    raise ValueError(f"schedule: unit {name!r} has iteration {h!r} outside [0, {self.period})")
            if not its:
                raise ValueError(
                    f"schedule: unit {name!r} is never averaged; every unit needs at least one "
                    f"iteration in [0, {self.period})"
                )
            normalised[name] = tuple(sorted(set(its)))
        object.__setattr__(self, "assignment", normalised)
        object.__setattr__(self, "metadata", dict(self.metadata))
        if self.overlap not in OVERLAPS:
            raise ValueError(f"schedule overlap must be 'backward' or 'forward', got {self.overlap!r}")
        object.__setattr__(self, "delays", self._checked_delays())

    def _checked_delays(self) -> dict[str, int]:
        """Validated delays without the zeros, so that {} and {"a": 0} are the same schedule."""
        if not isinstance(self.delays, Mapping):
            raise ValueError(f"schedule delays must map unit names to iterations, got {type(self.delays).__name__}")
        out: dict[str, int] = {}
        for name, d in self.delays.items():
            if name not in self.assignment:
                raise ValueError(f"schedule: delay {d!r} given for unit {name!r}, which the schedule does not average")
            if not (is_int(d) and d >= 0):
                raise ValueError(f"schedule: unit {name!r} has delay {d!r}; a delay must be an integer >= 0")
            if d == 0:
                continue
            if self.overlap != "forward":
                raise ValueError(
                    f"schedule: unit {name!r} has delay {d}, but delays need overlap='forward' "
                    f"(this schedule has overlap={self.overlap!r})"
                )
            gap = self.gap_of(name)
            if d >= gap:
                raise ValueError(
                    f"schedule: unit {name!r} has delay {d}, but it is averaged again {gap} "
                    f"iteration(s) later; its delay must be < {gap} (one average in flight at a time)"
                )
            out[name] = d
        return out

    # ----------------------------------------------------------------- queries
    @property
    def unit_names(self) -> list[str]:
        return list(self.assignment)

    def iterations_of(self, name: str) -> list[int]:
        """Iterations of the period at which unit ``name`` is averaged."""
        try:
            return list(self.assignment[name])
        except KeyError:
            raise KeyError(f"schedule has no unit {name!r}") from None

    def units_at(self, h: int) -> list[str]:
        """Units averaged at iteration ``h`` of the period, in the schedule's unit order."""
        return [name for name, its in self.assignment.items() if h in its]

    def delay_of(self, name: str) -> int:
        """Extra whole iterations unit ``name``'s average may take (0: needed at the next forward)."""
        return self.delays.get(name, 0)

    def gap_of(self, name: str) -> int:
        """Fewest iterations from one average of unit ``name`` to its next (cyclically; H if once)."""
        its = self.iterations_of(name)
        return min(b - a for a, b in zip(its, its[1:] + [its[0] + self.period]))

    def syncs_per_period(self) -> int:
        return sum(len(its) for its in self.assignment.values())

    def check_units(self, unit_names: Sequence[str]) -> None:
        """Raise ValueError unless the schedule covers exactly these units."""
        known = set(unit_names)
        unknown = [n for n in self.assignment if n not in known]
        if unknown:
            raise ValueError(
                f"schedule names unit {unknown[0]!r}, which the model does not have ({len(unknown)} unknown in all)"
            )
        missing = [n for n in unit_names if n not in self.assignment]
        if missing:
            raise ValueError(
                f"schedule misses unit {missing[0]!r}: every unit must be averaged at least once per"
                f" period ({len(missing)} missing in all)"
            )

    # ------------------------------------------------------------ constructors
    @classmethod
    def every_step(cls, names: Iterable[str]) -> Schedule:
        """Average every unit every iteration (period 1): the S-SGD-like extreme."""
        return cls(period=1, assignment={n: (0,) for n in names}, metadata={"method": "every_step"})

    @classmethod
    def local_sgd(cls, names: Iterable[str], period: int) -> Schedule:
        """Average every unit once per period, all in the period's last iteration."""
        _check_period(period)
        return cls(
            period=period,
            assignment={n: (period - 1,) for n in names},
            metadata={"method": "local_sgd"},
        )

    @classmethod
    def plsgd(cls, units: Sequence[SyncUnit], period: int) -> Schedule:
        """Partial local SGD without profiling: ``period`` contiguous groups of about equal bytes.

        Groups follow backward order (the reverse of ``units``), so iteration 0 averages the
        output-side units, whose all-reduce has the most backward left to hide behind.
        """
        _check_period(period)
        backward = list(reversed(units))
        groups = split_equal_bytes([u.nbytes for u in backward], period)
        assignment = {backward[i].name: (h,) for h, group in enumerate(groups) for i in group}
        ordered = {u.name: assignment[u.name] for u in units}
        return cls(period=period, assignment=ordered, metadata={"method": "plsgd"})

    # --------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCHEDULE_FORMAT,
            "period": self.period,
            "assignment": {n: list(its) for n, its in self.assignment.items()},
            "overlap": self.overlap,
            "delays": dict(self.delays),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "schedule") -> Schedule:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt != SCHEDULE_FORMAT:
            raise ValueError(f"{source}: format {fmt!r} is not {SCHEDULE_FORMAT!r}")
        for key in ("period", "assignment"):
            if key not in data:
                raise ValueError(f"{source}: missing field {key!r}")
        try:
            return cls(
                period=data["period"],
                assignment=data["assignment"],
                metadata=data.get("metadata") or {},
                delays=data.get("delays") or {},
                overlap=data.get("overlap", "backward"),
            )
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the schedule atomically, so readers never see half a file."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Schedule:
        return cls.from_dict(read_json(path, "schedule"), source=f"schedule file {os.fspath(path)!r}")


def split_equal_bytes(sizes: Sequence[int], groups: int) -> list[list[int]]:
    """Split indices 0..n-1 into ``groups`` contiguous runs whose byte totals are near equal.

    Group g ends at the first index whose running total reaches (g+1)/groups of the whole,
    so no group is more than one unit away from its share. With fewer units than groups the
    trailing groups are empty.
    """
    total = sum(sizes)
    result: list[list[int]] = [[] for _ in range(groups)]
    running = 0
    g = 0
    for i, size in enumerate(sizes):
        result[g].append(i)
        running += size
        units_left, groups_left = len(sizes) - i - 1, groups - g - 1
        # Close the group at its share of the bytes, or early enough that no later group is
        # left empty while there are units to fill it.
        if groups_left and (running >= total * (g + 1) / groups or units_left <= groups_left):
            g += 1
    return result


def _check_period(period: int) -> None:
    positive_int("period", period)

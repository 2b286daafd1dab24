"""The Profile: what the scheduler needs to know about a model on a cluster.

Per sync unit, in **backward order** (the order their gradients become ready): bytes, forward
time, backward time (from the previous unit's gradients being ready to this unit's — exactly
the window its all-reduce can hide behind) and predicted all-reduce time; iteration totals
(forward, backward, optimizer step); the fitted communication model; and metadata saying
where it was measured. Stored as versioned JSON (``"format": "dreamddp.profile/1"``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dreamddp.ops.files import read_json, write_json_atomic
from dreamddp.validation import is_number, non_negative_int, require

__all__ = ["PROFILE_FORMAT", "CommModel", "Profile", "Spread", "UnitProfile"]

PROFILE_FORMAT = "dreamddp.profile/1"


@dataclass(frozen=True)
class Spread:
    """Median and the 10th/90th percentiles of a measured time, in seconds."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        if not samples:
            return cls(0.0, 0.0, 0.0)
        ordered = sorted(samples)
        return cls(_quantile(ordered, 0.5), _quantile(ordered, 0.1), _quantile(ordered, 0.9))

    @classmethod
    def exact(cls, value: float) -> Spread:
        return cls(value, value, value)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of already sorted samples."""
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class CommModel:
    """All-reduce time = alpha + beta * bytes, fitted on the live process group.

    ``points`` are the measured (bytes, seconds) pairs; ``r2`` the fit's coefficient of
    determination (None for a model that was given, not fitted).

    ``burst_s``: link time a message after an idle gap gets for free. A token-bucket shaper
    (``tc tbf``, and many provider rate limits) lets its bucket through at line rate after the
    link has idled, so the first all-reduce of an iteration is faster than a back-to-back sweep
    says: by up to this much, and by no more than the idle time before it or its own transfer
    time. 0 for a plain pipe, and for profiles written before it was measured.
    """

    alpha_s: float
    beta_s_per_byte: float
    r2: float | None = None
    points: tuple[tuple[int, float], ...] = ()
    link: str = ""
    burst_s: float = 0.0

    def __post_init__(self) -> None:
        _check_time("comm alpha_s", self.alpha_s)
        _check_time("comm beta_s_per_byte", self.beta_s_per_byte)
        _check_time("comm burst_s", self.burst_s)

    def predict(self, nbytes: int) -> float:
        return self.alpha_s + self.beta_s_per_byte * nbytes

    def credit(self, tokens_s: float, nbytes: float) -> float:
        """Seconds an all-reduce of ``nbytes`` saves from ``tokens_s`` of accumulated burst."""
        return min(tokens_s, self.beta_s_per_byte * nbytes)

    @property
    def bandwidth_bps(self) -> float:
        """Effective all-reduce bandwidth in bits per second (payload bytes / beta)."""
        return 8.0 / self.beta_s_per_byte if self.beta_s_per_byte > 0 else math.inf

    @classmethod
    def fit(
        cls, points: Sequence[tuple[int, float]], link: str = "", burst_s: float = 0.0, repeats: int = 1
    ) -> CommModel:
        """The line through (bytes, seconds) with the least *relative* squared error.

        Relative, because the sizes a schedule sends span three decades: an ordinary least
        squares fit is the line through the largest message, and at 20 Mbit/s that put a
        0.3 MB bucket 10% off. ``burst_s`` and ``repeats``: each point is the mean of
        ``repeats`` back-to-back all-reduces after an idle gap, so the first of them had the
        burst; the points are corrected for it before fitting. alpha and beta clipped at zero.
        """
        if len(points) < 2 or len({b for b, _ in points}) < 2:
            raise ValueError(f"a comm model needs at least two distinct message sizes, got {len(points)} points")
        xs = [float(b) for b, _ in points]
        measured = [float(t) for _, t in points]
        alpha, beta = _relative_line(xs, measured)
        ys = measured
        for _ in range(100 if burst_s > 0 else 0):  # the correction depends on beta: iterate to a fixed point
            ys = [t + min(burst_s, repeats * beta * x) / repeats for x, t in zip(xs, measured)]
            previous, (alpha, beta) = beta, _relative_line(xs, ys)
            if abs(beta - previous) <= 1e-12 * beta:
                break
        my = sum(ys) / len(ys)
        ss_tot = sum((y - my) ** 2 for y in ys)
        ss_res = sum((y - (alpha + beta * x)) ** 2 for x, y in zip(xs, ys))
        r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
        return cls(alpha, beta, r2, tuple((int(b), float(t)) for b, t in points), link, burst_s)


def _relative_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) >= 0 minimising sum(((alpha + beta x - y) / y)^2): weighted normal equations."""
    ws = [1.0 / (y * y) if y > 0 else 1.0 for y in ys]
    sw = sum(ws)
    swx = sum(w * x for w, x in zip(ws, xs))
    swy = sum(w * y for w, y in zip(ws, ys))
    swxx = sum(w * x * x for w, x in zip(ws, xs))
    swxy = sum(w * x * y for w, x, y in zip(ws, xs, ys))
    det = sw * swxx - swx * swx
    beta = (sw * swxy - swx * swy) / det if det > 0 else 0.0
    if beta < 0:
        beta = 0.0
    alpha = (swy - beta * swx) / sw
    if alpha < 0:  # through the origin instead
        alpha, beta = 0.0, max(0.0, swxy / swxx) if swxx > 0 else 0.0
    return alpha, beta


@dataclass(frozen=True)
class UnitProfile:
    """One sync unit's measurements; times are medians, spreads alongside."""

    name: str
    nbytes: int
    forward_s: float
    backward_s: float
    comm_s: float = 0.0
    forward_spread: Spread | None = None
    backward_spread: Spread | None = None

    def __post_init__(self) -> None:
        non_negative_int(f"unit {self.name!r}: nbytes", self.nbytes)
        for what in ("forward_s", "backward_s", "comm_s"):
            _check_time(f"unit {self.name!r} {what}", getattr(self, what))


@dataclass(frozen=True)
class Profile:
    """Units in backward order, iteration totals, the comm model, and where it was measured."""

    units: tuple[UnitProfile, ...]
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0
    comm: CommModel | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    spreads: Mapping[str, Spread] = field(default_factory=dict)
    # Compute a byte of all-reduce in flight takes from forward/backward on the same cores
    # (gloo's threads, the kernel's TCP path): ``profiler.comm_cpu``. 0: free, or not measured.
    comm_cpu_s_per_byte: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        if not self.units:
            raise ValueError("a profile needs at least one unit (the model has no parameters?)")
        names = [u.name for u in self.units]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ValueError(f"profile lists unit {duplicate!r} twice")
        for what in ("forward_s", "backward_s", "optimizer_s", "comm_cpu_s_per_byte"):
            _check_time(f"profile {what}", getattr(self, what))
        object.__setattr__(self, "metadata", dict(self.metadata))
        object.__setattr__(self, "spreads", dict(self.spreads))

    # ---------------------------------------------------------------- views
    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def compute_s(self) -> float:
        """One iteration's compute: forward, backward and the optimizer step."""
        return self.forward_s + self.backward_s + self.optimizer_s

    def with_comm(self, comm: CommModel) -> Profile:
        """The same compute profile with every unit's comm time predicted by ``comm``."""
        units = tuple(dataclasses.replace(u, comm_s=comm.predict(u.nbytes)) for u in self.units)
        return dataclasses.replace(self, units=units, comm=comm)

    # ------------------------------------------------------------ synthetic
    @classmethod
    def synthetic(
        cls,
        backward_s: Sequence[float],
        comm_s: Sequence[float],
        forward_s: float | Sequence[float] = 0.0,
        optimizer_s: float = 0.0,
        nbytes: Sequence[int] | None = None,
    ) -> Profile:
        """A profile from given per-unit times in backward order (tests, what-if planning).

        ``forward_s`` is the iteration's forward time, or one time per unit.
        """
        n = len(backward_s)
        if len(comm_s) != n:
            raise ValueError(f"backward_s has {n} units but comm_s has {len(comm_s)}")
        per_unit_fwd = list(forward_s) if isinstance(forward_s, Sequence) else [float(forward_s) / max(n, 1)] * n
        if len(per_unit_fwd) != n:
            raise ValueError(f"backward_s has {n} units but forward_s has {len(per_unit_fwd)}")
        sizes = list(nbytes) if nbytes is not None else [0] * n
        if len(sizes) != n:
            raise ValueError(f"backward_s has {n} units but nbytes has {len(sizes)}")
        units = tuple(
            UnitProfile(f"u{i}", int(sizes[i]), float(per_unit_fwd[i]), float(backward_s[i]), float(comm_s[i]))
            for i in range(n)
        )
        return cls(
            units=units,
            forward_s=float(sum(per_unit_fwd)),
            backward_s=float(sum(backward_s)),
            optimizer_s=float(optimizer_s),
            metadata={"synthetic": True},
        )

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "units": [
                {
                    "name": u.name,
                    "bytes": u.nbytes,
                    "forward_s": u.forward_s,
                    "backward_s": u.backward_s,
                    "comm_s": u.comm_s,
                    **({"forward_spread": dataclasses.asdict(u.forward_spread)} if u.forward_spread else {}),
                    **({"backward_spread": dataclasses.asdict(u.backward_spread)} if u.backward_spread else {}),
                }
                for u in self.units
            ],
            "iteration": {
                "forward_s": self.forward_s,
                "backward_s": self.backward_s,
                "optimizer_s": self.optimizer_s,
                "spreads": {k: dataclasses.asdict(v) for k, v in self.spreads.items()},
                "comm_cpu_s_per_byte": self.comm_cpu_s_per_byte,
            },
            "comm": None
            if self.comm is None
            else {
                "alpha_s": self.comm.alpha_s,
                "beta_s_per_byte": self.comm.beta_s_per_byte,
                "r2": self.comm.r2,
                "points": [list(p) for p in self.comm.points],
                "link": self.comm.link,
                "burst_s": self.comm.burst_s,
            },
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> Profile:
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{source}: format {data.get('format')!r} is not {PROFILE_FORMAT!r}")
        try:
            units = tuple(
                UnitProfile(
                    name=str(u["name"]),
                    nbytes=u["bytes"],
                    forward_s=u["forward_s"],
                    backward_s=u["backward_s"],
                    comm_s=u.get("comm_s", 0.0),
                    forward_spread=Spread(**u["forward_spread"]) if "forward_spread" in u else None,
                    backward_spread=Spread(**u["backward_spread"]) if "backward_spread" in u else None,
                )
                for u in data["units"]
            )
            it = data.get("iteration", {})
            comm = data.get("comm")
            return cls(
                units=units,
                forward_s=it.get("forward_s", 0.0),
                backward_s=it.get("backward_s", 0.0),
                optimizer_s=it.get("optimizer_s", 0.0),
                comm=None
                if comm is None
                else CommModel(
                    comm["alpha_s"],
                    comm["beta_s_per_byte"],
                    comm.get("r2"),
                    tuple((int(b), float(t)) for b, t in comm.get("points", [])),
                    comm.get("link", ""),
                    comm.get("burst_s", 0.0),
                ),
                metadata=data.get("metadata", {}),
                spreads={k: Spread(**v) for k, v in it.get("spreads", {}).items()},
                comm_cpu_s_per_byte=it.get("comm_cpu_s_per_byte", 0.0),  # profiles from before it was measured: 0
            )
        except KeyError as err:
            raise ValueError(
                f"{source}: malformed profile: missing field {err.args[0]!r} (a profile lists "
                "units, each with name, bytes, forward_s and backward_s; `dreamddp profile` writes "
                "one)"
            ) from None
        except (TypeError, AttributeError) as err:
            raise ValueError(f"{source}: malformed profile ({type(err).__name__}: {err})") from None
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_json(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Profile:
        return cls.from_dict(read_json(path, "profile"), f"profile file {os.fspath(path)!r}")


def _check_time(what: str, value: Any) -> None:
    require(is_number(value) and math.isfinite(value) and value >= 0, what, "a finite number >= 0", value)

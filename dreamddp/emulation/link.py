"""A software-simulated slow link, and the link specification shared with ``tc``.

``SimulatedLink`` makes a laptop behave like sites joined by a slow wide-area link: each
collective occupies a serial channel for ``latency + wire_bytes / bandwidth`` from the moment
it is issued (or the channel frees up), and waiting for it returns no earlier than that.
Compute that runs meanwhile hides the delay exactly as it would hide a real transfer, so
overlap shows up in wall-clock time. Real kernel throttling (``tc``) is ``dreamddp.emulation.netns``.

A link whose rate is ``inf`` (``"inf,20ms"``) adds latency only, on top of whatever the real
network does: that is how ``dreamddp cluster`` adds the WAN delay on kernels without
``netem``, where ``tc`` can shape the rate but not delay packets. ``cluster run`` also names
the cluster's state file, so the link knows the rate ``tc`` shapes to (``RealRate``) and can
tell a real transfer from time spent waiting for a peer that issued later.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "LinkSpec",
    "SimulatedLink",
    "Booking",
    "SOFTWARE_DELAY_ENV",
    "CLUSTER_STATE_ENV",
    "RealRate",
    "link_from_settings",
    "describe_link",
    "sleep_until",
]

logger = logging.getLogger(__name__)

_RATE_UNITS = {  # tc's spelling: "bit" suffixes are bits/s, "bps" suffixes are bytes/s
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
}
MIN_RATE_BPS = 1e3  # 1kbit: slower links would take hours per average
MAX_DELAY_S = 60.0  # per collective; a WAN's is milliseconds
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class LinkSpec:
    """A link's bandwidth (bits per second) and latency per collective (seconds).

    ``bandwidth_bps`` may be ``math.inf``: a latency-only link, for adding delay on top of a
    network whose rate is already real (``tc``-shaped).
    """

    bandwidth_bps: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise ValueError(f"link bandwidth must be > 0 bit/s, got {self.bandwidth_bps!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"link latency must be >= 0 s, got {self.latency_s!r}")

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """Parse ``"100mbit,20ms"`` (tc units: bit/kbit/mbit/gbit, or kbps/mbps/... for bytes/s).

        The latency part is optional (``"1gbit"``) and takes s/ms/us. A rate of ``inf`` means
        latency only (``"inf,20ms"``).
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"malformed link {text!r}: expected 'RATE[,DELAY]' such as '100mbit,20ms'")
        parts = [p.strip() for p in text.split(",")]
        if len(parts) > 2:
            raise ValueError(f"malformed link {text!r}: expected 'RATE[,DELAY]' such as '100mbit,20ms'")
        latency_only = parts[0].lower() in ("inf", "unlimited")
        if latency_only:
            bandwidth = math.inf
        else:
            bandwidth = _parse_quantity(parts[0], _RATE_UNITS, "rate", text)
        latency = _parse_quantity(parts[1], _TIME_UNITS, "delay", text) if len(parts) == 2 else 0.0
        if bandwidth <= 0:
            raise ValueError(f"malformed link {text!r}: rate must be > 0")
        # Beyond these a run would hang for hours or overflow a timer mid-run (1e400ms is inf).
        if not latency_only and not MIN_RATE_BPS <= bandwidth < math.inf:
            raise ValueError(
                f"malformed link {text!r}: rate {parts[0]!r} is out of range; use a finite rate of at least "
                "1kbit (or 'inf' for latency only)"
            )
        if not 0 <= latency <= MAX_DELAY_S:
            raise ValueError(f"malformed link {text!r}: delay {parts[1]!r} is out of range; use 0 to {MAX_DELAY_S:g}s")
        return cls(bandwidth_bps=bandwidth, latency_s=latency)

    @property
    def latency_only(self) -> bool:
        return math.isinf(self.bandwidth_bps)

    def __str__(self) -> str:
        return f"{_format_rate(self.bandwidth_bps)},{self.latency_s * 1e3:g}ms"


def _parse_quantity(part: str, units: dict[str, float], what: str, text: str) -> float:
    match = _QUANTITY.match(part)
    allowed = "/".join(units)
    if not match:
        raise ValueError(f"malformed link {text!r}: {what} {part!r} is not a number with a unit ({allowed})")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in units:
        raise ValueError(f"malformed link {text!r}: unknown {what} unit {match.group(2)!r} (use {allowed})")
    return value * units[unit]


def _format_rate(bps: float) -> str:
    if math.isinf(bps):
        return "inf"
    for unit, scale in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


class _DeadlineThread:
    """One daemon thread that runs callbacks at given monotonic times (for DDP comm hooks)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="dreamddp-simulated-link", daemon=True)
        self._thread.start()

    def call_at(self, deadline: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (deadline, next(self._counter), fn))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                deadline, _, fn = self._heap[0]
                delay = deadline - time.perf_counter()
                if delay > 0:
                    self._cv.wait(timeout=delay)
                    continue
                heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # one bad callback must not stop every later future on the link
                logger.exception("a simulated-link callback failed; later collectives go on")


@dataclass
class LinkStats:
    collectives: int = 0
    bytes: int = 0  # payload bytes handed to collectives on this rank
    busy_s: float = 0.0  # channel time: simulated transfer, or added latency plus measured transfer


class Booking:
    """One collective on a link: when it was issued, and when its result may be used.

    ``release`` is known once the real collective has completed and ``SimulatedLink.complete``
    has run; ``wait_release`` blocks until then (the completion callback may run on the
    backend's thread a moment after ``work.wait()`` returns).
    """

    __slots__ = ("seq", "issued", "nbytes", "deadline", "finished", "release", "_done", "_callbacks", "_cb_lock")

    def __init__(self, seq: int, issued: float, nbytes: int, deadline: float | None) -> None:
        self.seq = seq
        self.finished: float | None = None
        self.issued = issued
        self.nbytes = nbytes
        self.deadline = deadline  # bandwidth-simulating links: known when issued
        self.release: float | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[float], None]] = []
        self._cb_lock = threading.Lock()

    def _set_release(self, release: float) -> None:
        with self._cb_lock:
            self.release = release
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(release)
        self._done.set()  # after the callbacks: a waiter then sees what they recorded

    def when_released(self, fn: Callable[[float], None]) -> None:
        """Call ``fn(release)`` once the release time is known (now, if it already is)."""
        with self._cb_lock:
            if self.release is None:
                self._callbacks.append(fn)
                return
        fn(self.release)

    def wait_release(self) -> float:
        self._done.wait()
        assert self.release is not None
        return self.release


@dataclass
class SimulatedLink:
    """A serial channel with a bandwidth and a latency, applied to collectives in software.

    With a finite bandwidth, an all-reduce of ``n`` payload bytes among ``world_size`` ranks
    occupies the channel for ``latency + 2 (w-1)/w * n * 8 / bandwidth`` — the per-rank
    traffic of a ring all-reduce — starting when it is issued or when the previous collective
    leaves the channel, whichever is later; its result is usable at that deadline or when the
    real collective completes, whichever is later.

    With ``bandwidth = inf`` (latency only) the transfer time is the real one, measured: the
    result of collective ``i`` is usable at ``max(issued_i, release_{i-1}) + latency + (real
    transfer time of i)``, and never before its real completion plus the latency, so every
    collective pays the latency after its real transfer and back-to-back collectives pay it in
    series, as they would on a link with that delay.

    The measured transfer runs from issue (or the previous real completion) to completion, and
    on the rank that issued first that includes waiting for its peers. Were that wait priced as
    transfer and the latency added after it, the early rank would be released later than its
    peers, be the late one next iteration, and the ranks would swing against each other. With
    ``real_rate`` (the rate the real link is shaped to) the transfer is priced at most at its
    wire time at that rate, which no peer wait inflates, so every rank computes the same release.
    The wire time assumes a ring whose traffic crosses each uplink once (one rank per site, or a
    ring that visits a site's ranks in a row); an uplink shared more widely has a longer real
    transfer, and the release then rests on the real completion plus the delay. A two-level
    sync's shard is priced with the whole world's ring, above its wire time: the measured
    transfer is used, as without a rate.

    One rank needs no link: with ``world_size == 1`` every collective is free.
    """

    spec: LinkSpec
    world_size: int
    stats: LinkStats = field(default_factory=LinkStats)
    real_rate: Callable[[], float | None] | None = None  # latency-only links: bits/s tc shapes to

    def __post_init__(self) -> None:
        self._channel_free = 0.0
        self._next_seq = 0  # next booking to hand out
        self._next_done = 0  # next booking whose completion is applied
        self._finished: dict[int, Booking] = {}  # completed out of order, waiting for earlier ones
        self._last_real_done = 0.0
        self._last_release = 0.0
        self._lock = threading.Lock()
        self._timer: _DeadlineThread | None = None

    def wire_bytes(self, nbytes: int) -> float:
        """Bytes each rank sends in a ring all-reduce of ``nbytes``."""
        return 2.0 * (self.world_size - 1) / self.world_size * nbytes

    def all_reduce_seconds(self, nbytes: int) -> float:
        """Simulated channel time of one all-reduce (the transfer part is 0 on a latency-only link)."""
        if self.world_size <= 1:
            return 0.0
        return self.spec.latency_s + self.wire_bytes(nbytes) * 8.0 / self.spec.bandwidth_bps

    def book(self, nbytes: int) -> Booking:
        """Record an all-reduce of ``nbytes`` issued now; ``complete`` it when the real one is done."""
        now = time.perf_counter()
        with self._lock:
            seq, self._next_seq = self._next_seq, self._next_seq + 1
            self.stats.collectives += 1
            self.stats.bytes += nbytes
            if self.spec.latency_only or self.world_size <= 1:
                return Booking(seq, now, nbytes, None)
            seconds = self.all_reduce_seconds(nbytes)
            start = max(now, self._channel_free)
            self._channel_free = start + seconds
            self.stats.busy_s += seconds
            return Booking(seq, now, nbytes, self._channel_free)

    def complete(self, booking: Booking, finished: float | None = None) -> float | None:
        """The real collective behind ``booking`` finished at ``finished`` (default: now).

        Releases are decided in issue order, as on a serial channel: gloo may finish two
        collectives out of order (it runs them on two threads), and then the later one waits
        here for the earlier one. Returns the release time, or None while an earlier booking
        is still outstanding (``booking.wait_release()`` then waits for it).
        """
        booking.finished = time.perf_counter() if finished is None else finished
        released: list[tuple[Booking, float]] = []
        with self._lock:
            self._finished[booking.seq] = booking
            while self._next_done in self._finished:
                ready = self._finished.pop(self._next_done)
                self._next_done += 1
                ready.release = self._release_time(ready)
                released.append((ready, ready.release))
        for ready, release in released:
            ready._set_release(release)
        return booking.release

    def _release_time(self, booking: Booking) -> float:
        finished = booking.finished
        assert finished is not None
        if self.world_size <= 1:
            release = finished
        elif booking.deadline is not None:
            release = max(finished, booking.deadline)
        else:
            transfer = max(0.0, finished - max(booking.issued, self._last_real_done))
            rate = self.real_rate() if self.real_rate is not None else None
            if rate:  # a peer's lateness is not wire time
                transfer = min(transfer, self.wire_bytes(booking.nbytes) * WIRE_FRAMING * 8.0 / rate)
            start = max(booking.issued, self._last_release)
            release = max(start + transfer, finished) + self.spec.latency_s
            self.stats.busy_s += self.spec.latency_s + transfer
        self._last_real_done = max(self._last_real_done, finished)
        self._last_release = max(self._last_release, release)
        return release

    def track(self, work: dist.Work, booking: Booking) -> None:
        """Complete ``booking`` from ``work``'s own completion callback (exact completion time)."""

        def on_done(_fut: torch.futures.Future) -> None:
            self.complete(booking)

        work.get_future().add_done_callback(on_done)

    def delay_future(
        self, fut: torch.futures.Future, booking: Booking, device: torch.device | None = None
    ) -> torch.futures.Future:
        """A future with ``fut``'s result that completes no earlier than ``booking``'s release.

        ``device``: where the result lives; a CUDA result needs a future that knows its device.
        """
        if self._timer is None:
            self._timer = _DeadlineThread()
        timer = self._timer
        devices: list[int | str | torch.device] | None = (
            [device] if device is not None and device.type == "cuda" else None
        )
        out: torch.futures.Future = torch.futures.Future(devices=devices)

        def on_done(done: torch.futures.Future) -> None:
            self.complete(booking)  # also on failure: later bookings must not wait for this one
            try:
                value = done.value()
            except Exception as err:  # surface the collective's own failure unchanged
                out.set_exception(err)
                return

            def finish() -> None:
                try:
                    out.set_result(value)
                except Exception as err:
                    out.set_exception(err)

            # The release may wait for an earlier booking; never block the backend's thread on it.
            booking.when_released(lambda release: timer.call_at(release, finish))

        fut.add_done_callback(on_done)
        return out


SOFTWARE_DELAY_ENV = "DREAMDDP_SOFTWARE_DELAY"
CLUSTER_STATE_ENV = "DREAMDDP_CLUSTER_STATE"
# tbf counts whole frames: at MTU 1500 a TCP segment (timestamps on) carries 1448 payload bytes
# in 1514 bytes of Ethernet frame.
WIRE_FRAMING = 1514 / 1448


class RealRate:
    """The WAN rate an emulated cluster's ``tc`` shapes to, from the cluster's state file.

    ``dreamddp cluster shape`` rewrites the file when it changes the rate under running jobs,
    so the file is looked at again at most every ``recheck_s`` and re-read only when it changed.
    An unreadable file gives ``None`` (the link then prices measured transfers, as without it).
    """

    def __init__(self, path: str | Path, recheck_s: float = 1.0) -> None:
        self.path = Path(path)
        self.recheck_s = recheck_s
        self._checked = -math.inf
        self._mtime: float | None = None
        self._bps: float | None = None

    def __call__(self) -> float | None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return self._bps
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                wan = json.loads(self.path.read_text())["spec"]["wan"]
                self._bps, self._mtime = LinkSpec.parse(wan).bandwidth_bps, mtime
        except (OSError, ValueError, KeyError, TypeError) as err:
            if self._bps is not None or self._mtime is None:
                logger.warning("cannot read the WAN rate from %s (%s); pricing measured transfers", self.path, err)
            self._bps, self._mtime = None, -1.0
        return self._bps


def link_from_settings(link: str, world_size: int) -> SimulatedLink | None:
    """The configured simulated link; else the software delay an emulated cluster asks for.

    ``dreamddp cluster run`` sets ``DREAMDDP_SOFTWARE_DELAY`` where the kernel cannot delay
    packets (no ``netem``): the rate is then real (``tc``) and only the latency is added here;
    ``DREAMDDP_CLUSTER_STATE`` names the file that says which rate ``tc`` shapes to.
    """
    if link:
        return SimulatedLink(LinkSpec.parse(link), world_size)
    delay = os.environ.get(SOFTWARE_DELAY_ENV, "").strip()
    if delay:
        try:
            spec = LinkSpec.parse(f"inf,{delay}")
        except ValueError as err:
            raise ValueError(f"{SOFTWARE_DELAY_ENV}={delay!r} is not a delay such as 20ms ({err})") from None
        state = os.environ.get(CLUSTER_STATE_ENV, "").strip()
        return SimulatedLink(spec, world_size, real_rate=RealRate(state) if state else None)
    return None


def describe_link(link: SimulatedLink | None) -> str:
    if link is None:
        return "real network"
    if link.spec.latency_only:
        return f"real network + {link.spec.latency_s * 1e3:g}ms software delay per collective"
    return f"simulated {link.spec}"


def sleep_until(deadline: float | None) -> None:
    if deadline is None:
        return
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)

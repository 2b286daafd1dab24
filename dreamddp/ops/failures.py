"""Turning a dead or hung rank into one clear line on every survivor.

When a peer dies, gloo fails the survivors' next collective with "Connection closed by peer";
when a peer hangs, the collective times out after the process group's timeout. Neither error
says *which* rank is at fault, and both arrive as a stack trace from deep inside torch. Here:

- every rank runs a ``Heartbeat``: a daemon thread that publishes (beat count, iteration) in
  the job's c10d store every ``interval`` seconds. The training loop only updates an integer;
  the thread does the I/O, so a slow WAN to the store never slows an iteration.
- a rank whose collective fails marks itself "gave up" in the store (so other survivors do not
  blame it), watches the heartbeats for two intervals, and names the ranks whose beat stopped
  (dead, or stopped) or whose iteration lags (alive but stuck).

``PeerFailure`` carries that one-line diagnosis; the trainer prints it and exits non-zero, which
is what ``torchrun --max-restarts`` needs to relaunch the job from its last checkpoint.

``DREAMDDP_FAULT`` (``kill@RANK:STEP`` or ``stop@RANK:STEP``) makes that rank SIGKILL or SIGSTOP
itself at that step on the job's first attempt: a real death or hang, for the failure tests
and for rehearsing recovery on a real cluster.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

__all__ = [
    "FaultPlan",
    "Heartbeat",
    "LauncherWatchdog",
    "PeerFailure",
    "Terminated",
    "install_sigterm",
    "is_communication_error",
    "launcher_died",
]

logger = logging.getLogger(__name__)

_COMM_ERROR_MARKERS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "closed by peer",
    "broken pipe",
    "reset by peer",
    "socket",
    "process group",
    "processgroup",
)


class PeerFailure(RuntimeError):
    """Another rank died or hung; the message names it and the iteration.

    ``blames``: whether a peer was found dead or stuck (False: the diagnosis found no culprit).
    """

    def __init__(self, message: str, blames: bool = False) -> None:
        super().__init__(message)
        self.blames = blames


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived (torchrun stops every rank when one fails; a user stops the job).

    BaseException, as KeyboardInterrupt is: no ``except Exception`` swallows it.
    """


_diagnosing = threading.Event()  # while set, SIGTERM only waits for the diagnosis to finish
_launcher_died = threading.Event()  # set by LauncherWatchdog before it stops this rank


_stopping = threading.Event()  # set by the first stop signal: later ones (torchrun forwards Ctrl-C again) are ignored


def install_sigterm() -> Callable[[], None]:
    """Turn SIGTERM and SIGINT into ``Terminated`` in the main thread, so the trainer can say why it stops.

    While a failure is being diagnosed, the signal is held back: torchrun sends SIGTERM to every
    survivor as soon as one rank dies, and the survivor's line naming the dead rank is worth
    the two seconds it takes (torchrun waits 30 s before it escalates to SIGKILL). Only the
    first signal raises: Ctrl-C reaches a worker twice (from the terminal and forwarded by
    torchrun), and a second ``Terminated`` in the middle of the clean-up would bury the line.
    Returns a function that restores the previous handlers (a caller that trains in-process).
    """

    def handler(signum: int, _frame) -> None:
        if _diagnosing.is_set() or _stopping.is_set():
            return
        _stopping.set()
        raise Terminated(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _stopping.clear()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def launcher_died() -> bool:
    """True once ``LauncherWatchdog`` saw this process's launcher die (no checkpoint may be committed then)."""
    return _launcher_died.is_set()


class LauncherWatchdog:
    """Stops this rank when the process that launched it (torchrun) dies.

    A SIGKILLed torchrun cannot stop its workers: they are re-parented and go on training,
    advancing ``latest`` in a checkpoint directory that a restarted job will share. The
    watchdog polls the parent pid (a Linux parent-death signal would fire on the death of the
    launcher's *thread* that forked the worker, which torchrun does not guarantee to keep);
    when it changes, it marks the launcher dead (so no checkpoint is committed), sends this
    process SIGTERM (the trainer then stops with one line), and exits hard after ``grace_s`` if
    the main thread is stuck in a collective that will never finish.
    """

    def __init__(self, poll_s: float = 0.5, grace_s: float = 10.0) -> None:
        self.launcher_pid = os.getppid()
        self.poll_s, self.grace_s = poll_s, grace_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dreamddp-launcher-watchdog", daemon=True)
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # only a torchrun worker has a launcher to lose
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if os.getppid() != self.launcher_pid:
                _launcher_died.set()
                os.kill(os.getpid(), signal.SIGTERM)
                if not self._stop.wait(self.grace_s):
                    logger.error(
                        "rank %s: launcher (pid %d) died and this rank did not stop within %g s; "
                        "exiting without a checkpoint",
                        os.environ.get("RANK", "?"),
                        self.launcher_pid,
                        self.grace_s,
                    )
                    os._exit(143)
                return

    def close(self) -> None:
        self._stop.set()


def is_communication_error(err: BaseException) -> bool:
    """Errors a failing peer causes: torch's DistError family, or a RuntimeError from a backend."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(marker in text for marker in _COMM_ERROR_MARKERS)


@dataclass(frozen=True)
class FaultPlan:
    """``kill@1:9``: rank 1 kills itself at step 9 (first attempt only)."""

    action: str
    rank: int
    step: int

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        text = os.environ.get("DREAMDDP_FAULT", "").strip()
        if not text:
            return None
        try:
            action, _, where = text.partition("@")
            rank, _, step = where.partition(":")
            plan = cls(action, int(rank), int(step))
        except ValueError:
            plan = None
        if plan is None or plan.action not in ("kill", "stop") or plan.rank < 0 or plan.step < 0:
            raise ValueError(f"DREAMDDP_FAULT {text!r} is malformed; expected kill@RANK:STEP or stop@RANK:STEP")
        return plan

    def maybe_fire(self, rank: int, step: int) -> None:
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        if first_attempt and rank == self.rank and step == self.step:
            os.kill(os.getpid(), signal.SIGKILL if self.action == "kill" else signal.SIGSTOP)


class Heartbeat:
    """Publishes this rank's liveness and iteration; diagnoses which peer failed."""

    def __init__(self, rank: int, world_size: int, interval_s: float = 1.0) -> None:
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.iteration = 0
        self._stop = threading.Event()
        self._store: dist.Store | None = None
        try:
            base = dist.distributed_c10d._get_default_store()
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            # A clone: a connection of its own, so the short timeout below does not become the
            # job's store timeout (set_timeout passes through a PrefixStore), and the heartbeat
            # thread does not share a client with the main thread.
            clone = base.clone()  # type: ignore[attr-defined]  # Store.clone exists at runtime; the stubs lag
            self._store = dist.PrefixStore(f"dreamddp/heartbeat/{attempt}", clone)
            self._store.set_timeout(timedelta(seconds=max(5.0, 3 * interval_s)))
        except Exception as err:  # noqa: BLE001 - no store: run without diagnosis rather than fail
            logger.debug("no c10d store for heartbeats (%s): a failed peer will not be named", err)
            self._store = None
        self._beats = 0
        self._thread = threading.Thread(target=self._run, name="dreamddp-heartbeat", daemon=True)
        if self._store is not None and world_size > 1:
            self._publish()
            self._thread.start()

    @property
    def _live_store(self) -> dist.Store:
        """The store; only used once ``__init__`` found one (no store: nothing is published or read)."""
        assert self._store is not None
        return self._store

    def _publish(self) -> None:
        self._beats += 1
        self._live_store.set(f"beat/{self.rank}", f"{self._beats} {self.iteration}")

    def _run(self) -> None:
        # Publish at least every interval, and soon after the iteration moves, so a diagnosis
        # can say where a dead rank was; at most 5 small writes a second, off the main thread.
        last_sent, last_time = self.iteration, time.monotonic()
        launcher = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None  # torchrun hosts the store
        while not self._stop.wait(min(0.2, self.interval_s)):
            if _launcher_died.is_set() or (launcher is not None and os.getppid() != launcher):
                return  # the store may have died with the launcher: a write now only prints C++ frames
            now = time.monotonic()
            if self.iteration == last_sent and now - last_time < self.interval_s:
                continue
            try:
                self._publish()
            except Exception as err:  # noqa: BLE001 - the store may be gone with a dead rank 0
                logger.debug("heartbeat of rank %d stopped: %s", self.rank, err)
                return
            last_sent, last_time = self.iteration, now

    def close(self) -> None:
        self._stop.set()

    def _read(self) -> dict[int, tuple[int, int] | None]:
        beats: dict[int, tuple[int, int] | None] = {}
        for r in range(self.world_size):
            try:
                if not self._live_store.check([f"beat/{r}"]):
                    beats[r] = None
                    continue
                count, iteration = self._live_store.get(f"beat/{r}").decode().split()
                beats[r] = (int(count), int(iteration))
            except Exception:  # noqa: BLE001
                beats[r] = None
        return beats

    def _gave_up(self) -> set[int]:
        out = set()
        for r in range(self.world_size):
            try:
                if self._live_store.check([f"gave_up/{r}"]):
                    out.add(r)
            except Exception:  # noqa: BLE001
                pass
        return out

    def diagnose(self, iteration: int, cause: BaseException | str) -> PeerFailure:
        """Who stopped, from the heartbeats; waits 2.5 beat intervals to see who still beats.

        ``cause`` is the error this rank saw, or a description (e.g. of a signal).
        """
        self.close()
        _diagnosing.set()
        try:
            return self._diagnose(iteration, cause)
        finally:
            _diagnosing.clear()

    def blame(self, iteration: int, cause: BaseException | str) -> PeerFailure | None:
        """``diagnose``, but None when no peer is found dead or stuck (a plain stop signal)."""
        failure = self.diagnose(iteration, cause)
        return failure if failure.blames else None

    def _diagnose(self, iteration: int, cause: BaseException | str) -> PeerFailure:
        if isinstance(cause, BaseException):
            first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
            first_line = re.sub(r"^\[[^\]]*\]\s*", "", first_line)[:160]  # drop gloo's source path
            cause_text = f"a collective failed: {first_line}"
        else:
            cause_text = cause
        prefix = f"rank {self.rank} stopped at iteration {iteration}"
        if self._store is None:
            return PeerFailure(f"{prefix} ({cause_text}); no store to tell which rank failed")
        try:
            self._store.set(f"gave_up/{self.rank}", str(iteration))
            before = self._read()
            time.sleep(2.5 * self.interval_s)
            after = self._read()
            gave_up = self._gave_up()
        except Exception:  # noqa: BLE001
            return PeerFailure(
                f"{prefix} ({cause_text}), and the job's store is unreachable too: the process hosting it "
                "(rank 0 or the launcher) is probably the one that died"
            )
        silent, behind = [], []
        alive_iters = [a[1] for r, a in after.items() if a is not None and r not in gave_up]
        for r in range(self.world_size):
            if r == self.rank or r in gave_up:
                continue
            b, a = before.get(r), after.get(r)
            if a is None or b is None or a[0] == b[0]:
                silent.append((r, a[1] if a else None))
            elif alive_iters and a[1] < max(alive_iters + [iteration]):
                behind.append((r, a[1]))
        if silent:
            who = ", ".join(
                f"rank {r} (last heartbeat at iteration {it})" if it is not None else f"rank {r}" for r, it in silent
            )
            verb = "stopped responding (died or was stopped)"
            return PeerFailure(f"{prefix}: {who} {verb} ({cause_text})", blames=True)
        if behind:
            who = ", ".join(f"rank {r} (alive, but at iteration {it})" for r, it in behind)
            return PeerFailure(f"{prefix}: {who} is stuck ({cause_text})", blames=True)
        return PeerFailure(f"{prefix} ({cause_text}); every other rank is still beating")

"""Checkpoints that a partial-local-SGD job can resume from exactly.

Under local SGD the ranks' models and optimizer states *differ* between averages, so a
checkpoint is one file per rank (``step-00000040/rank-00003.pt``), never rank 0's copy
broadcast on resume — that would silently average away every rank's local progress and move
the run off its trajectory. Beside the rank files, rank 0 writes ``meta.json`` *after* every
rank has written and fsynced its file (a barrier), then points ``latest`` at the directory.
``meta.json`` is the commit mark: a directory without it is an interrupted write and is never
resumed from.

Every file is written to a temporary name, fsynced and renamed into place, so a crash leaves
either the old file or the new one. Rank files hold only tensors and plain Python values and
are read back with ``torch.load(weights_only=True)``: a checkpoint cannot run code.

Atomic renames do not protect against what happens to a file *after* it is written (a flipped
bit, a truncated copy, a half-synced network file system), and ``torch.load`` happily returns a
tensor with damaged bytes in it. So every file's SHA-256 and size, taken while it is written,
go into the commit mark, and a file is verified before it is loaded. On resume the ranks agree
on the newest checkpoint whose every rank file verifies: a damaged latest checkpoint is
reported in one line and the one before it is used; only when none verifies is it an error.

The checkpoint records the model's sync units, the world size and the schedule; resuming with
a different model, world size or schedule is refused with one line naming the difference,
instead of loading state that does not belong to this run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist

from dreamddp.ops.failures import launcher_died
from dreamddp.ops.files import atomic_write, read_json, write_json_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpointer",
    "capture_rng",
    "check_file",
    "file_digest",
    "restore_rng",
    "save_atomic",
    "Verification",
    "unit_signatures",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dreamddp.checkpoint/1"
_LATEST = "latest"
_META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, with the reason in one line."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


class _DigestingWriter:
    """A file object that hashes what passes through it: the digest costs no second read."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self.size += len(view)
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()


def file_digest(path: Path) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": n}`` of a file as it is on disk."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def check_file(path: Path, expected: dict[str, Any]) -> str | None:
    """Why ``path`` is not the file its digest describes (missing, truncated, altered), or None."""
    try:
        actual = file_digest(path)
    except OSError as err:
        return f"{path.name} cannot be read ({err.strerror or type(err).__name__})"
    if actual["bytes"] != expected.get("bytes"):
        return f"{path.name} has {actual['bytes']} bytes, {expected.get('bytes')} were written"
    if actual["sha256"] != expected.get("sha256"):
        return f"{path.name} does not match its SHA-256 (its bytes changed after it was written)"
    return None


def save_atomic(obj: Any, path: Path) -> dict[str, Any]:
    """``torch.save`` to a temporary name, fsync, rename, fsync the directory: a crash leaves
    the old file or the new one, never half of one. Returns the file's digest (``file_digest``)."""
    try:
        with atomic_write(path, "wb", fsync_dir=True) as f:
            writer = _DigestingWriter(f)
            torch.save(obj, writer)  # type: ignore[arg-type]  # any object with write() will do
    except RuntimeError as err:
        # A write that failed (a full disk) or was interrupted (a stop signal) surfaces from torch's
        # zip writer as "unexpected pos"; what interrupted it is what the caller must see.
        cause = err.__context__
        while cause is not None and isinstance(cause, Exception) and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        raise cause from None
    return {"sha256": writer.sha256.hexdigest(), "bytes": writer.size}


def capture_rng() -> dict[str, Any]:
    """Every random stream a training step may draw from (dropout, data order, init)."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form: (name, keys, pos, has_gauss, cached)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's key array is stored as a tensor: weights_only loading accepts no ndarrays.
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants nested tuples; a loader may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


@dataclass(frozen=True)
class Checkpointer:
    """Writes and finds the checkpoints of one job in ``directory`` (shared by every rank).

    ``keep``: complete checkpoints kept; older ones are deleted by rank 0 after a newer one
    is committed, so a crash during a write never leaves the job without one.
    """

    directory: Path
    rank: int
    world_size: int
    keep: int = 2

    @classmethod
    def for_process_group(cls, directory: str | os.PathLike[str], keep: int = 2) -> Checkpointer:
        return cls(Path(directory), dist.get_rank(), dist.get_world_size(), keep)

    # ------------------------------------------------------------------- write
    def save(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], shared: dict[str, Any] | None = None
    ) -> Path:
        """Collective: every rank writes its part; returns the committed directory.

        ``state`` is this rank's; ``meta`` (JSON-able, rank 0's is written) describes the run;
        ``shared`` maps file names to objects rank 0 writes beside the rank files (the
        averaged model), before the commit mark like everything else. A rank that cannot write
        (disk full) fails every rank with CheckpointWriteError naming it; the half-written
        directory is removed and the checkpoints committed before stay as they were.
        """
        target = self.directory / _step_dir_name(step)
        payload = {"format": CHECKPOINT_FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size, **state}

        def write_parts() -> tuple[dict[str, Any], bool]:
            target.mkdir(parents=True, exist_ok=True)
            files = {_rank_file_name(self.rank): save_atomic(payload, target / _rank_file_name(self.rank))}
            if self.rank == 0:
                for name, obj in (shared or {}).items():
                    files[name] = save_atomic(obj, target / name)
            return files, launcher_died()

        # The gather doubles as the barrier: every rank's file is durable before the commit mark exists.
        parts = self._everyone(step, target, write_parts)
        if any(orphaned for _, orphaned in parts):
            # Decided on what every rank said, so all skip the commit alike: an orphaned job (its
            # launcher gone) must not advance a directory that a restarted job will share.
            if self.rank == 0:
                shutil.rmtree(target, ignore_errors=True)
            return target
        files = {name: digest for part, _ in parts for name, digest in part.items()}

        def commit() -> None:
            if self.rank != 0:
                return
            write_json_atomic(
                target / _META,
                {"format": CHECKPOINT_FORMAT, "step": step, "world_size": self.world_size, "files": files, **meta},
                fsync_dir=True,
            )
            with atomic_write(self.directory / _LATEST, fsync_dir=True) as f:
                f.write(target.name + "\n")

        self._everyone(step, target, commit)  # a failed commit stops every rank, not only rank 0
        if self.rank == 0:
            self._prune(keep_name=target.name)
        return target

    def _everyone(self, step: int, target: Path, part: Any) -> list[Any]:
        """Run ``part`` on every rank and gather the results; one rank's OSError fails all alike."""
        result, problem = None, None
        try:
            result = part()
        except OSError as err:
            where = err.filename or target
            problem = f"{err.strerror or type(err).__name__}: {where}"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (problem, result))
        for r, (p, _) in enumerate(gathered):
            if p is not None:
                if self.rank == 0:
                    shutil.rmtree(target, ignore_errors=True)  # never leave half a checkpoint
                raise CheckpointWriteError(
                    f"the checkpoint at iteration {step} could not be written (rank {r}: {p}); "
                    f"the checkpoints committed before it in {self.directory} are intact"
                )
        return [r for _, r in gathered]

    def _prune(self, keep_name: str) -> None:
        complete = sorted(p for p in self.directory.glob("step-*") if (p / _META).exists())
        for old in complete[: max(0, len(complete) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------- read
    def committed(self) -> list[Path]:
        """Committed checkpoint directories (those with a commit mark), newest first."""
        return sorted((p for p in self.directory.glob("step-*") if (p / _META).exists()), reverse=True)

    def metadata(self, step: int) -> dict[str, Any]:
        """The commit mark of the checkpoint at ``step`` (ValueError, one line, if unreadable)."""
        meta = read_json(self.directory / _step_dir_name(step) / _META, "checkpoint metadata")
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"checkpoint metadata {self.directory / _step_dir_name(step) / _META} is not an object"
            )
        return meta

    def verify(self, path: Path) -> tuple[str | None, str | None]:
        """(damage, mismatch) of this rank's part of ``path``: why it cannot be resumed from, or Nones.

        *Damage* (unreadable metadata, a file that does not match its checksum) is a reason to fall
        back to an older checkpoint. A *mismatch* (another world size, this rank's file missing)
        is not: every checkpoint of the directory would fail alike, and deleting them is not the fix.
        """
        try:
            meta = read_json(path / _META, "checkpoint metadata")
            int(meta["step"])
            world = int(meta["world_size"])
        except (ValueError, KeyError, TypeError) as err:
            return (str(err) if isinstance(err, ValueError) else f"{path / _META} has no step or world_size"), None
        if world != self.world_size:
            return None, (
                f"checkpoint {path} was written by {world} ranks, this job has {self.world_size}: local-SGD state "
                f"is per rank and cannot be re-split; resume with {world} ranks, or use another checkpoint directory"
            )
        name = _rank_file_name(self.rank)
        if not (path / name).exists():
            return None, (
                f"checkpoint {path} has no file for rank {self.rank} ({name}): is the checkpoint directory not "
                "shared by every node?"
            )
        files = meta.get("files")
        if files is None:
            logger.warning("checkpoint %s predates checksums: %s is loaded unverified", path, name)
            return None, None
        expected = files.get(name) if isinstance(files, dict) else None
        if not isinstance(expected, dict):
            return f"its metadata lists no checksum for {name}", None
        return check_file(path / name, expected), None

    def agreed_resume_step(self, device: torch.device) -> int | None:
        """Collective: the newest checkpoint whose every rank file verifies, the same on every rank.

        Rank 0 lists the candidates (the directory is shared; its view decides); each rank checks
        its own file. A damaged newer checkpoint is skipped with one warning naming it; when every
        checkpoint is damaged the error names each. A checkpoint that does not fit this job (world
        size, a node that does not see the directory) stops every rank with that line instead.
        """
        names: list[Any] = [[p.name for p in self.committed()] if self.rank == 0 else None]
        dist.broadcast_object_list(names, src=0, device=device if device.type == "cuda" else None)
        skipped: list[str] = []
        for name in names[0]:
            verdict = self.verify(self.directory / name)
            verdicts: list[Any] = [None] * self.world_size
            dist.all_gather_object(verdicts, verdict)
            for r, (_, mismatch) in enumerate(verdicts):
                if mismatch is not None:
                    raise CheckpointError(mismatch if r == self.rank else f"rank {r}: {mismatch}")
            bad = [(r, damage) for r, (damage, _) in enumerate(verdicts) if damage is not None]
            if not bad:
                if skipped and self.rank == 0:
                    logger.warning(
                        "checkpoint %s failed verification; resuming from %s instead", "; ".join(skipped), name
                    )
                return int(name.removeprefix("step-"))
            skipped.append(f"{name} (rank {bad[0][0]}: {bad[0][1]})")
        if skipped:
            raise CheckpointError(
                f"no checkpoint in {self.directory} verifies: {'; '.join(skipped)}; "
                "delete the damaged ones or use another checkpoint directory"
            )
        return None

    def newest_plausible(self) -> int | None:
        """The step a rerun would most likely resume from, without hashing (for a stop message):
        the newest committed checkpoint with this job's world size and this rank's file at its written size."""
        for path in self.committed():
            try:
                meta = read_json(path / _META, "checkpoint metadata")
                expected = meta.get("files", {}).get(_rank_file_name(self.rank), {})
                size = (path / _rank_file_name(self.rank)).stat().st_size
                if int(meta["world_size"]) == self.world_size and expected.get("bytes", size) == size:
                    return int(meta["step"])
            except (ValueError, KeyError, TypeError, AttributeError, OSError):
                continue
        return None

    def load(self, step: int, expect: dict[str, Any]) -> dict[str, Any]:
        """This rank's state at ``step``, checked against what this run is (``expect``).

        ``expect`` may hold ``units`` (the model's unit signatures), ``schedule`` and
        ``algorithm``; each that differs raises CheckpointError naming the difference.
        """
        path = self.directory / _step_dir_name(step) / _rank_file_name(self.rank)
        if not path.exists():
            raise CheckpointError(
                f"checkpoint {path.parent} has no file for rank {self.rank} ({path.name}): was it written by a "
                f"smaller job, or is the checkpoint directory not shared by every node?"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one line
            # torch's first sentence says what is wrong; the rest of its paragraph is advice.
            first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0].rstrip(".")
            raise CheckpointError(
                f"checkpoint file {path} cannot be read ({first}); delete {path.parent} to resume "
                "from the checkpoint before it, or use another checkpoint directory"
            ) from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"checkpoint file {path} is not a {CHECKPOINT_FORMAT} file")
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"checkpoint {path.parent} was written by {state['world_size']} ranks, this job has "
                f"{self.world_size}: local-SGD state is per rank and cannot be re-split; resume with "
                f"{state['world_size']} ranks, or use another checkpoint directory"
            )
        if "algorithm" in expect and state.get("algorithm") != expect["algorithm"]:
            raise CheckpointError(
                f"checkpoint {path.parent} was written by algorithm {state.get('algorithm')!r}, this run uses "
                f"{expect['algorithm']!r}"
            )
        if "units" in expect:
            _check_units(state.get("units", []), expect["units"], path.parent)
        if "schedule" in expect and state.get("schedule") != expect["schedule"]:
            raise CheckpointError(
                f"checkpoint {path.parent} was written with a different schedule "
                f"({_schedule_difference(state.get('schedule'), expect['schedule'])}); "
                "resume with the schedule it was made with, or use another checkpoint directory"
            )
        return state


@dataclass(frozen=True)
class Verification:
    """What ``dreamddp checkpoint verify`` found in one checkpoint directory."""

    resumable: bool  # a resume would use it: committed, and every rank file verifies (or predates checksums)
    problems: list[str]  # every problem, rank files and the rest (averaged.pt)
    unverified: bool = False  # written before checksums: nothing to verify against


def verify_checkpoint(path: Path) -> Verification:
    """Check every file of the checkpoint directory ``path`` against the checksums in its commit mark."""
    if not (path / _META).exists():
        return Verification(False, ["incomplete: no commit mark (meta.json), so it is never resumed from"])
    try:
        meta = read_json(path / _META, "checkpoint metadata")
        world = int(meta["world_size"])
    except ValueError as err:
        return Verification(False, [str(err)])
    except (KeyError, TypeError):
        return Verification(False, [f"{_META} has no world_size"])
    files = meta.get("files")
    rank_names = [_rank_file_name(r) for r in range(world)]
    if files is None:
        missing = [f"{name} is missing" for name in rank_names if not (path / name).exists()]
        return Verification(not missing, missing, unverified=True)
    if not isinstance(files, dict):
        return Verification(False, [f"{_META}'s files is not a table of checksums"])
    rank_problems = [f"its metadata lists no {name}" for name in rank_names if name not in files]
    other_problems: list[str] = []
    for name, expected in sorted(files.items()):
        if Path(name).name != name or not isinstance(expected, dict):
            problem: str | None = f"{_META} lists {name!r}, which is not a file of this directory"
        else:
            problem = check_file(path / name, expected)
        if problem is not None:
            (rank_problems if name in rank_names else other_problems).append(problem)
    return Verification(not rank_problems, rank_problems + other_problems)


_OTHER_MODEL = "resume with the model config it was written with, or use another checkpoint directory"


def _check_units(saved: list, current: list, where: Path) -> None:
    saved_map = {name: sig for name, sig in saved}
    current_map = {name: sig for name, sig in current}
    for name, sig in current_map.items():
        if name not in saved_map:
            raise CheckpointError(
                f"checkpoint {where} is from a different model: it has no unit {name!r}; {_OTHER_MODEL}"
            )
        if saved_map[name] != sig:
            raise CheckpointError(
                f"checkpoint {where} is from a different model: unit {name!r} is {saved_map[name]} there, "
                f"{sig} here; {_OTHER_MODEL}"
            )
    extra = [n for n in saved_map if n not in current_map]
    if extra:
        raise CheckpointError(
            f"checkpoint {where} is from a different model: it has unit {extra[0]!r}, this model "
            f"does not; {_OTHER_MODEL}"
        )


def _schedule_difference(saved: Any, current: Any) -> str:
    """What differs between two schedule records, key by key: ``overlap 'backward' → 'forward'``."""
    if not isinstance(saved, dict) or not isinstance(current, dict):
        there = "a schedule" if isinstance(saved, dict) else "none"
        here = "a schedule" if isinstance(current, dict) else "none"
        return f"{there} there, {here} here"
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            moved = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            first = moved[0]
            out.append(f"{key} differs for {len(moved)} unit(s), first {first!r}: {old.get(first)} → {new.get(first)}")
        else:
            out.append(f"{key} {old!r} → {new!r}")
    return "; ".join(out)


def unit_signatures(units) -> list[tuple[str, str]]:
    """(name, "shape:dtype, ...") per unit: enough to tell two models apart in a message."""
    return [
        (u.name, ", ".join(f"{list(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in u.tensors)) for u in units
    ]

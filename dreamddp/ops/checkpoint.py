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

The checkpoint records the model's sync units, the world size and the schedule; resuming with
a different model, world size or schedule is refused with one line naming the difference,
instead of loading state that does not belong to this run.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dreamddp.ops.files import atomic_write, read_json, write_json_atomic

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "Checkpointer",
    "capture_rng",
    "restore_rng",
    "save_atomic",
    "unit_signatures",
]

CHECKPOINT_FORMAT = "dreamddp.checkpoint/1"
_LATEST = "latest"
_META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, with the reason in one line."""


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name, fsync, rename, fsync the directory: a crash leaves
    the old file or the new one, never half of one."""
    with atomic_write(path, "wb", fsync_dir=True) as f:
        torch.save(obj, f)


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
        averaged model), before the commit mark like everything else.
        """
        target = self.directory / _step_dir_name(step)
        target.mkdir(parents=True, exist_ok=True)
        payload = {"format": CHECKPOINT_FORMAT, "step": step, "rank": self.rank, "world_size": self.world_size, **state}
        save_atomic(payload, target / _rank_file_name(self.rank))
        if self.rank == 0:
            for name, obj in (shared or {}).items():
                save_atomic(obj, target / name)
        dist.barrier()  # every rank's file is durable before the commit mark exists
        if self.rank == 0:
            write_json_atomic(
                target / _META,
                {"format": CHECKPOINT_FORMAT, "step": step, "world_size": self.world_size, **meta},
                fsync_dir=True,
            )
            with atomic_write(self.directory / _LATEST, fsync_dir=True) as f:
                f.write(target.name + "\n")
            self._prune(keep_name=target.name)
        return target

    def _prune(self, keep_name: str) -> None:
        complete = sorted(p for p in self.directory.glob("step-*") if (p / _META).exists())
        for old in complete[: max(0, len(complete) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------- read
    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or None (rank-local view of the directory)."""
        pointer = self.directory / _LATEST
        candidates = []
        if pointer.exists():
            candidates.append(self.directory / pointer.read_text(encoding="utf-8").strip())
        # ``latest`` may be missing (written last) or stale: fall back to the newest committed.
        candidates += sorted(self.directory.glob("step-*"), reverse=True)
        for path in candidates:
            if (path / _META).exists():
                try:
                    meta = read_json(path / _META, "checkpoint metadata")
                    return int(meta["step"])
                except (ValueError, KeyError, TypeError) as err:
                    reason = err if isinstance(err, ValueError) else f"{_META} has no step"
                    raise CheckpointError(
                        f"{reason}; delete {path} to resume from the checkpoint before it, "
                        "or use another checkpoint directory"
                    ) from None
        return None

    def agreed_latest_step(self, device: torch.device) -> int | None:
        """Rank 0's latest step, on every rank: all ranks must resume from the same one."""
        # Rank 0's answer or its error travel together: an unreadable meta.json must fail every
        # rank with rank 0's line, not leave the others waiting in the broadcast.
        answer: list[Any] = [None, None]
        if self.rank == 0:
            try:
                answer[0] = self.latest_step()
            except ValueError as err:
                answer[1] = str(err)
        dist.broadcast_object_list(answer, src=0, device=device if device.type == "cuda" else None)
        if answer[1] is not None:
            raise CheckpointError(answer[1] if self.rank == 0 else f"rank 0: {answer[1]}")
        return answer[0]

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
                f"checkpoint {path.parent} was written with a different schedule ({_describe_schedule(state.get('schedule'))}"
                f" vs this run's {_describe_schedule(expect['schedule'])}); resume with the schedule it was made with"
            )
        return state


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


def _describe_schedule(schedule: Any) -> str:
    if not isinstance(schedule, dict):
        return "none"
    return f"period {schedule.get('period')}, {sum(len(v) for v in schedule.get('assignment', {}).values())} syncs"


def unit_signatures(units) -> list[tuple[str, str]]:
    """(name, "shape:dtype, ...") per unit: enough to tell two models apart in a message."""
    return [
        (u.name, ", ".join(f"{list(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for t in u.tensors)) for u in units
    ]

"""``dreamddp checkpoint verify DIR``: check every checkpoint in a directory against its checksums.

Before copying a checkpoint directory off a cluster, or after a storage incident, this says
which checkpoints are intact and which one a resume would start from, without a process
group or a GPU. Exit status: 0 when every committed checkpoint verifies, 1 when one does not,
2 for a directory that holds no checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dreamddp.ops.checkpoint import verify_checkpoint

__all__ = ["main"]


def _verify(directory: Path) -> int:
    if not directory.is_dir():
        print(f"dreamddp checkpoint: error: {str(directory)!r} is not a directory", file=sys.stderr)
        return 2
    candidates = sorted(directory.glob("step-*"), reverse=True)
    if not candidates:
        print(
            f"dreamddp checkpoint: error: {str(directory)!r} holds no checkpoints (step-* directories)", file=sys.stderr
        )
        return 2
    resume_from, damaged = None, 0
    for path in candidates:
        found = verify_checkpoint(path)
        committed = (path / "meta.json").exists()
        if found.resumable and not found.problems:
            print(f"{path.name}: {'ok, written before checksums (not verified)' if found.unverified else 'ok'}")
        else:
            damaged += committed
            label = "DAMAGED" if committed else "skipped"
            if found.resumable:  # only a file a resume does not load (averaged.pt) is damaged
                label += " (its rank files verify: a resume may use it)"
            print(f"{path.name}: {label}: {'; '.join(found.problems)}")
        if found.resumable:
            resume_from = resume_from or path.name
    if resume_from:
        print(f"a resume starts from {resume_from}")
    else:
        print("no checkpoint verifies: a resume would fail")
    return 1 if damaged else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamddp checkpoint", description=(__doc__ or "").splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every checkpoint's files against the checksums in its meta.json")
    verify.add_argument("directory", type=Path, help="the run's train.checkpoint_dir")
    args = parser.parse_args(argv)
    return _verify(args.directory)


if __name__ == "__main__":
    sys.exit(main())

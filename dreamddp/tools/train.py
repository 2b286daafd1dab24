"""The training entry point: ``torchrun --nproc-per-node N -m dreamddp.train --config C.toml``.

The command line only: flags, the config they build, and one line per error with an exit
code a launcher can act on (2: bad input; 1: a peer failed, or a checkpoint could not be
written; 143: stopped by a signal). The training itself is ``dreamddp.training.trainer``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from dreamddp.ops.checkpoint import CheckpointWriteError
from dreamddp.ops.failures import FaultPlan, PeerFailure
from dreamddp.training.config import load_config
from dreamddp.training.trainer import Stopped, run

__all__ = ["main", "parse_args"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line like every other bad input, not usage plus error.

    Under torchrun every rank prints its errors; a usage block per rank buries the one line
    that says what was wrong.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


_SHORTCUTS = (
    ("--checkpoint-dir", "checkpoint_dir", "DIR", "write per-rank checkpoints here and resume from the latest"),
    ("--checkpoint-every", "checkpoint_every", "N", "iterations between checkpoints"),
    ("--metrics-port", "metrics_port", "PORT", "serve Prometheus metrics on PORT + LOCAL_RANK"),
    ("--trace", "trace", "OUT.json", "write a Chrome/Perfetto trace of real iterations"),
)
_PATH_SHORTCUTS = ("checkpoint_dir", "trace")  # quoted as TOML strings, whatever characters the path has


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="dreamddp train", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", help="TOML config file (configs/*.toml); defaults apply without one")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.algorithm=ssgd --set train.link=100mbit,20ms",
    )
    for flag, key, meta, text in _SHORTCUTS:
        parser.add_argument(flag, dest=key, metavar=meta, help=f"{text} (same as --set train.{key}=...)")
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` values, then the shortcut flags as the ``--set`` they stand for."""
    overrides = list(args.set)
    for _, key, _, _ in _SHORTCUTS:
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"train.{key}={json.dumps(value)}" if key in _PATH_SHORTCUTS else f"train.{key}={value}")
    return overrides


def _error(err: BaseException) -> None:
    print(f"dreamddp train: error: {err}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # The library's notices (a checkpoint fallen back from, a setting changed on resume) as one line
    # each; only dreamddp's own loggers, so another library's warnings are not printed as ours.
    library = logging.getLogger("dreamddp")
    if not library.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("dreamddp train: %(message)s"))
        library.addHandler(handler)
        library.setLevel(logging.WARNING)
        library.propagate = False
    try:
        cfg = load_config(args.config, _overrides(args))
        FaultPlan.from_env()  # a malformed DREAMDDP_FAULT is bad input, found before any process group
    except ValueError as err:
        _error(err)
        return 2
    try:
        run(cfg)
    except (PeerFailure, Stopped, CheckpointWriteError) as err:
        _error(err)
        return 143 if isinstance(err, Stopped) else 1
    except ValueError as err:  # bad input found once the job is up (paths, schedule, checkpoint, port)
        _error(err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dreamddp bench --convergence --resume``: add seeds (or finish an interrupted run) in place.

A convergence comparison with 3 seeds is an hour or more of a machine that must do nothing
else; it is often run a seed at a time, or cut short. With ``--resume`` the bench reads the
``convergence.json`` already in ``--out``, keeps every recorded run, S-SGD budget, profile and
schedule, and runs only what is missing — so seed 2 trains on the very schedules seeds 0 and 1
did. A file that describes a different comparison (another config, link, step count, cluster
shape or set of periods) is refused naming the field: mixing them would average runs that do
not measure the same thing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["CONVERGENCE_KEYS", "has_run", "load_prior", "prior_model"]

logger = logging.getLogger(__name__)

# What must match for two invocations to be one comparison.
CONVERGENCE_KEYS = ("format", "config", "overrides", "link", "steps", "sites", "procs_per_site", "periods")


def load_prior(path: Path, fresh: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded comparison at ``path`` if it is the one ``fresh`` (a new header) describes.

    None where there is nothing to resume (a notice is logged). Raises ``ValueError`` naming the
    first field that differs, or the file, if it is not a comparison.
    """
    if not path.exists():
        logger.warning("--resume: no %s yet; starting the comparison afresh", path)
        return None
    try:
        prior = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--resume: cannot read {str(path)!r} ({type(err).__name__}: {err})") from None
    if not isinstance(prior, dict) or not isinstance(prior.get("models"), list):
        raise ValueError(f"--resume: {str(path)!r} is not a convergence comparison (no 'models' list)")
    for key in CONVERGENCE_KEYS:
        if prior.get(key) != fresh.get(key):
            raise ValueError(
                f"--resume: {str(path)!r} was run with {key} {prior.get(key)!r}, this run asks for {fresh.get(key)!r}; "
                "use another --out for a different comparison"
            )
    return prior


def prior_model(prior: dict[str, Any] | None, config: str) -> dict[str, Any] | None:
    """The recorded entry for ``config`` (None: not run yet)."""
    if prior is None:
        return None
    return next((m for m in prior["models"] if m.get("config") == config), None)


def has_run(model: dict[str, Any], algorithm: str, period: int | None, seed: int) -> bool:
    """Whether ``model`` already records this run."""
    return any(
        r.get("algorithm") == algorithm and r.get("period") == period and r.get("seed") == seed for r in model["runs"]
    )

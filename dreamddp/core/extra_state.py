"""The wrapper's own part of a checkpoint: iteration, bucket order, delayed averages in flight, delta state.

``DreamDDP.state_dict()`` carries it as the module's extra state, so a checkpoint of the
wrapped model resumes the wrapper exactly. The bucket order is part of it because buckets
decide how a reduction is split: a resumed run must launch the same ones to continue bit for
bit. Delayed averages still in flight are finished on the wire and saved unapplied, with the
iteration that applies them.
"""

from __future__ import annotations

from typing import Any

from dreamddp.core.delta import DeltaState
from dreamddp.core.landing import Landing
from dreamddp.core.reducer import Reducer
from dreamddp.core.state import SyncState

__all__ = ["export_extra_state", "restore_extra_state"]


def export_extra_state(
    state: SyncState, landing: Landing, delta: DeltaState | None = None, sites: str | None = None
) -> dict[str, Any]:
    """Plain values only: the checkpoint is loaded with ``weights_only``. ``sites``: two-level's shape."""
    delayed = landing.export()  # first: finishing a delayed delta sync steps its anchors
    return {
        "delta": delta.export() if delta is not None else None,
        "iteration": state.iteration,
        "origin": state.origin,
        "period": state.schedule.period,
        "order": list(state.order),
        "delayed": delayed,
        "sites": sites,
    }


def restore_extra_state(
    saved: Any,
    state: SyncState,
    landing: Landing,
    reducer: Reducer,
    delta: DeltaState | None = None,
    sites: str | None = None,
) -> None:
    """Check ``saved`` against this wrapper (one-line ValueErrors), then adopt it."""
    period = state.schedule.period
    if not isinstance(saved, dict) or not isinstance(saved.get("iteration"), int) or saved["iteration"] < 0:
        raise ValueError(f"DreamDDP state has no valid iteration counter: {saved!r}")
    if saved.get("period") != period:
        raise ValueError(
            f"checkpoint was written with period {saved.get('period')!r}, this schedule has period {period}"
        )
    if isinstance(saved, dict) and saved.get("sites") != sites:
        # Two-level keeps a site's ranks identical; flat lets them drift: neither resumes the other.
        raise ValueError(
            f"checkpoint was written with {_sites_words(saved.get('sites'))}, this DreamDDP runs {_sites_words(sites)}"
        )
    order = saved.get("order")
    if order is not None:
        if sorted(order) != list(range(len(state.units))):
            raise ValueError(f"checkpoint's bucket order does not fit this model's {len(state.units)} units")
        if list(order) != state.order:
            state.lay_out(order)
        reducer.order_rebuilt = True
    origin = saved.get("origin", 0)  # absent from checkpoints written before a period could change
    if not isinstance(origin, int) or not 0 <= origin <= saved["iteration"]:
        raise ValueError(f"DreamDDP state has an invalid period origin {origin!r} (iteration {saved['iteration']})")
    state.iteration = saved["iteration"]
    state.origin = origin
    if delta is None and saved.get("delta") is not None:
        raise ValueError("checkpoint was written with sync='delta' (anchors, outer optimizer); this DreamDDP averages")
    landing.discard()  # finishes what is on the wire (stepping anchors) before they are replaced
    if delta is not None:
        delta.restore(saved.get("delta"))
    landing.restore(saved.get("delayed", []))


def _sites_words(sites: str | None) -> str:
    return f"two-level synchronization ({sites})" if sites else "flat synchronization"

"""Delta synchronization: per-unit anchors, an outer optimizer, compressed payloads with error feedback.

``SyncOptions(mode="delta")`` (see ``sync_options``). The reducer launches a bucket exactly as
for an average — from the same grad-ready hook, in the same order — but the collective is a
``BucketDelta``: every rank sends Δ = anchor − w for the bucket (plus its error-feedback
residual, encoded by ``compress``); ``wait()`` forms the mean Δ̄ (the same bits on every rank),
steps the anchor with the outer optimizer and writes the new anchor into the bucket's target,
which landing then treats exactly as an averaged bucket (``w = anchor`` for a unit whose step
was held back, ``w += anchor − snapshot`` for a delayed one).

``DeltaState`` keeps the anchors, outer momentum and residuals as *companions* of the flat
storage: one tensor per flat buffer, indexed like it, so a bucket's slice of each is a view.
When the storage is laid out again (a learned launch order, ``model.to()``), the companions
follow, unit segment by unit segment; a bucket launched before such a re-layout finds its
units' new place through the layout it was launched on.

Anchors and momentum are identical on every rank (same inputs, same operations); residuals are
each rank's own. All three go into the wrapper's extra state, so a resume is bit-exact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from dreamddp.core.buckets import Bucket
from dreamddp.core.collectives import BucketSync, average_op
from dreamddp.core.compress import Encoded, allreduce_equivalent_bytes, decode_data, with_feedback
from dreamddp.core.flat import FlatLayout
from dreamddp.core.landing import unit_slices
from dreamddp.core.state import SyncState
from dreamddp.core.sync_options import SyncOptions
from dreamddp.emulation.link import SimulatedLink

__all__ = ["BucketDelta", "DeltaState", "outer_step"]

logger = logging.getLogger(__name__)

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def outer_step(
    mean_delta: torch.Tensor, momentum: torch.Tensor | None, lr: float, mu: float, nesterov: bool
) -> torch.Tensor:
    """The step the anchor takes (it subtracts it): torch SGD's rule with Δ̄ as the gradient.

    ``momentum`` (None when ``mu == 0``) is updated in place: m ← μ·m + Δ̄; the step is
    lr·(Δ̄ + μ·m) with Nesterov, lr·m without. A zero initial buffer gives torch's first step.
    """
    if momentum is None:
        return mean_delta if lr == 1.0 else mean_delta * lr
    momentum.mul_(mu).add_(mean_delta)
    step = mean_delta.add(momentum, alpha=mu) if nesterov else momentum.clone()
    return step if lr == 1.0 else step.mul_(lr)


def anchor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Anchors of half-precision weights are kept in fp32, as DiLoCo keeps its outer model."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class DeltaState:
    """Anchors, outer momentum and error-feedback residuals, laid out like the flat storage."""

    def __init__(
        self, state: SyncState, options: SyncOptions, group: dist.ProcessGroup, weights_equal: bool = True
    ) -> None:
        self.options = options
        self.state = state
        self.layout = state.layout
        self.nesterov = options.outer == "nesterov"
        flats = self.layout.flats
        self.anchors = [self._companion(f, anchor_dtype(f.dtype)) for f in flats]
        for anchor, flat in zip(self.anchors, flats):
            anchor.copy_(flat)
        # The anchor is rank 0's weights, whatever each rank started from (a broadcast only when the
        # weights were not already made equal: across a WAN it costs a whole model).
        src = dist.get_global_rank(group, 0)
        for anchor in [] if weights_equal else self.anchors:
            on_wire = anchor if anchor.device == flats[0].device else anchor.to(flats[0].device)
            dist.broadcast(on_wire, src=src, group=group)
            if on_wire is not anchor:
                anchor.copy_(on_wire)
        self.momentum = [self._companion(a) for a in self.anchors] if options.momentum > 0 else None
        self.residuals = [self._companion(a) for a in self.anchors] if options.compress != "none" else None
        self._buffer_ranges = self._find_buffer_ranges()
        state.companions.append(self)

    # ------------------------------------------------------------------ memory and layout
    def _companion(self, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A zero tensor shaped like flat buffer ``like``, on the anchor device."""
        device = like.device if self.options.anchor_device == "param" else torch.device("cpu")
        pin = device.type == "cpu" and like.device.type == "cuda"
        return torch.zeros(like.numel(), dtype=dtype or like.dtype, device=device, pin_memory=pin)

    @property
    def nbytes(self) -> int:
        """Extra memory held: anchors, momentum, residuals."""
        held = [*self.anchors, *(self.momentum or []), *(self.residuals or [])]
        return sum(t.numel() * t.element_size() for t in held)

    def relayout(self, old: FlatLayout, new: FlatLayout) -> None:
        """The flat storage was laid out again: move every companion, unit segment by unit segment."""
        self._settle()

        def moved(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            out = [self._companion(flat, anchor_dtype(flat.dtype)) for flat in new.flats]  # as __init__ made them
            for unit_id, segments in new.segments.items():
                for was, now in zip(old.segments[unit_id], segments, strict=True):
                    out[now.key][now.start : now.end].copy_(tensors[was.key][was.start : was.end])
            return out

        self.anchors = moved(self.anchors)
        if self.momentum is not None:
            self.momentum = moved(self.momentum)
        if self.residuals is not None:
            self.residuals = moved(self.residuals)
        self.layout = new
        self._buffer_ranges = self._find_buffer_ranges()

    def _find_buffer_ranges(self) -> list[list[tuple[int, int]]]:
        """Per flat buffer, the element ranges holding module buffers (BatchNorm statistics).

        The outer optimizer steps parameters; a buffer is simply averaged (anchor − Δ̄), as in
        average mode, whatever the outer optimizer.
        """
        ranges: list[list[tuple[int, int]]] = [[] for _ in self.layout.flats]
        if self.options.plain_average:
            return ranges
        for unit in self.state.units:
            for buffer in unit.buffers:
                for key, flat in enumerate(self.layout.flats):
                    offset = (buffer.data_ptr() - flat.data_ptr()) // flat.element_size()
                    if buffer.device == flat.device and buffer.dtype == flat.dtype and 0 <= offset < flat.numel():
                        ranges[key].append((offset, offset + buffer.numel()))
                        break
        return ranges

    def _settle(self) -> None:
        """Anchors in host memory may still be receiving a device copy: wait before reading them."""
        if self.options.anchor_device == "cpu" and any(f.device.type == "cuda" for f in self.layout.flats):
            torch.cuda.synchronize()

    # ------------------------------------------------------------------ one bucket
    def delta_of(self, bucket: Bucket, weights: torch.Tensor) -> torch.Tensor:
        """Δ = anchor − w for ``bucket`` (a new tensor in the anchor's dtype, on the weights' device)."""
        anchor = self.anchors[bucket.key][bucket.start : bucket.end].to(weights.device, non_blocking=True)
        return anchor - weights.to(anchor.dtype)

    def encode(self, bucket: Bucket, delta: torch.Tensor) -> tuple[Encoded, torch.Tensor | None]:
        """``delta`` plus this rank's residual, encoded, and the new residual (error feedback).

        The new residual is kept only when the sync lands (``apply``): a backward that fails
        before then is retried from the same state.
        """
        opts = self.options
        residual = None
        if self.residuals is not None:
            residual = self.residuals[bucket.key][bucket.start : bucket.end].to(delta.device, non_blocking=True)
        return with_feedback(delta, residual, opts.compress, opts.compress_block)

    def apply(
        self,
        bucket: Bucket,
        launched_on: FlatLayout,
        mean_delta: torch.Tensor,
        target: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> None:
        """Step the anchors of ``bucket`` with Δ̄, write the new anchor into ``target``, keep ``residual``."""
        for lo, hi, key, start in self._pieces(bucket, launched_on):
            end = start + hi - lo
            if residual is not None and self.residuals is not None:
                self.residuals[key][start:end].copy_(residual[lo:hi], non_blocking=True)
            anchor_home = self.anchors[key][start:end]
            anchor = anchor_home.to(mean_delta.device, non_blocking=True)
            delta = mean_delta[lo:hi]
            momentum_home = self.momentum[key][start:end] if self.momentum is not None else None
            momentum = momentum_home.to(delta.device, non_blocking=True) if momentum_home is not None else None
            opts = self.options
            step = outer_step(delta, momentum, opts.lr, opts.momentum, self.nesterov)
            for b_lo, b_hi in self._buffer_ranges[key]:  # buffers are averaged, not stepped
                a, b = max(b_lo, start), min(b_hi, end)
                if a < b:
                    step = step.clone() if step is delta else step
                    step[a - start : b - start] = delta[a - start : b - start]
            anchor.sub_(step)
            if anchor is not anchor_home:
                anchor_home.copy_(anchor, non_blocking=True)
            if momentum is not None and momentum_home is not None and momentum is not momentum_home:
                momentum_home.copy_(momentum, non_blocking=True)
            target[lo:hi].copy_(anchor)

    def _pieces(self, bucket: Bucket, launched_on: FlatLayout) -> list[tuple[int, int, int, int]]:
        """(lo, hi) of the bucket's values and where they live now: (flat key, start)."""
        if launched_on is self.layout:
            return [(0, bucket.size, bucket.key, bucket.start)]
        pieces = []
        for unit_id, slices in unit_slices(bucket, launched_on).items():  # as landing finds a delayed unit
            for piece in slices:
                now = self.layout.segments[unit_id][piece.segment]
                pieces.append((piece.start, piece.end, now.key, now.start))
        return pieces

    # ------------------------------------------------------------------ checkpoints
    def export(self) -> dict[str, Any]:
        self._settle()
        return {
            "options": list(self.options.fingerprint()),
            "anchors": list(self.anchors),
            "momentum": list(self.momentum) if self.momentum is not None else None,
            "residuals": list(self.residuals) if self.residuals is not None else None,
        }

    def restore(self, saved: Any) -> None:
        """Adopt a checkpoint's anchors, momentum and residuals (one-line ValueErrors if they do not fit)."""
        if not isinstance(saved, dict) or "anchors" not in saved:
            raise ValueError(
                "this DreamDDP synchronizes deltas, but the checkpoint has no delta-sync state "
                "(it was written with sync='average')"
            )
        mine = list(self.options.fingerprint())
        if list(saved.get("options", [])) != mine:
            raise ValueError(
                f"checkpoint's delta-sync options {saved.get('options')!r} differ from this run's {mine!r}"
            )
        self._settle()
        for name in ("anchors", "momentum", "residuals"):
            ours: list[torch.Tensor] | None = getattr(self, name)
            theirs: Sequence[torch.Tensor] | None = saved.get(name)
            if ours is None:
                continue
            if theirs is None or [t.shape for t in theirs] != [t.shape for t in ours]:
                raise ValueError(f"checkpoint's delta-sync {name} do not fit this model's flat storage")
            for mine_t, saved_t in zip(ours, theirs):
                mine_t.copy_(saved_t)


class BucketDelta(BucketSync):
    """One bucket's delta sync in flight: Δ (encoded) on the wire; ``wait()`` steps the anchors.

    ``target`` receives the new anchor: the live weights (their step held back meanwhile) or a
    delayed bucket's copy. Δ is taken from it at launch.
    """

    def __init__(
        self,
        target: torch.Tensor,
        bucket: Bucket,
        store: DeltaState,
        group: dist.ProcessGroup,
        link: SimulatedLink | None = None,
        track_done: bool = False,
    ) -> None:
        self.target, self.bucket, self.store = target, bucket, store
        self.launched_on = store.layout
        opts = store.options
        self._world = dist.get_world_size(group)
        self._encoded, self._residual = store.encode(bucket, store.delta_of(bucket, target))
        data = self._encoded.data
        if opts.compress == "int8":  # quantized sums would overflow and mix scales: gather, sum locally
            self._gathered: torch.Tensor | None = torch.empty(
                self._world * data.numel(), dtype=data.dtype, device=data.device
            )
            work = _all_gather_single(self._gathered, data, group=group, async_op=True)
            self._divide = True
        else:
            self._gathered = None
            op, self._divide = average_op(group)
            work = dist.all_reduce(data, op=op, group=group, async_op=True)
        payload = data.numel() * data.element_size()
        nbytes = allreduce_equivalent_bytes(payload, opts.compress, self._world)
        super().__init__(work, nbytes, target.device, link, track_done)

    def wait(self) -> None:
        self.wait_wire()
        encoded = self._encoded
        dtype = self.store.anchors[self.bucket.key].dtype
        if self._gathered is not None:  # every rank's part, decoded and summed in rank order
            parts = self._gathered.view(self._world, -1)
            mean = decode_data(parts[0], encoded.method, encoded.numel, encoded.block, dtype)
            for r in range(1, self._world):
                mean += decode_data(parts[r], encoded.method, encoded.numel, encoded.block, dtype)
        else:
            mean = encoded.data.to(dtype)
        if self._divide:
            mean.div_(self._world)  # a fresh tensor, or the payload itself (no longer needed)
        self.store.apply(self.bucket, self.launched_on, mean, self.target, self._residual)

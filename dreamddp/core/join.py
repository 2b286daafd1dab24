"""torch's ``Join`` for DreamDDP: ranks that run out of data shadow the others' averages.

``with Join([ddp]): for batch in uneven_loader: ...`` (``torch.distributed.algorithms.join``,
as for torch's DistributedDataParallel; DreamDDP must be the first joinable). Without it, a
rank with fewer batches leaves the others' all-reduces without a partner: they meet whatever
that rank does next, and gloo aborts (or the group times out).

- A rank still training calls ``Join.notify_join_context`` once per synchronising backward,
  before its first bucket (``active_ranks``): an all-reduce of ones that ranks which have
  joined answer with zeros (Join's own loop). Its sum, the number of ranks still training, is
  the divisor of that iteration's averages: every bucket is summed (NCCL too, instead of AVG)
  and divided by it, waited for lazily in the first ``wait()``. Outside ``Join`` nothing is
  sent and the arithmetic is unchanged; inside it with no rank out of data, it is the same
  bit for bit on the CPU (the count is a Python int equal to the world size).
- A rank that has joined runs ``main_hook`` once per synchronising iteration of the others:
  the same all-reduces, in the same order and sizes, for its own iteration counter's phase
  (advanced once per hook, so the phases stay aligned), with zero buffers, booked on the
  simulated link like real buckets. The first hook lands what the rank still has in flight
  (forward overlap, delayed averages, held-back optimizer steps) — that sends nothing.
- A joined rank keeps its own weights: it cannot tell inside ``main_hook`` how many ranks
  averaged, and local SGD replicas legitimately differ between averages. ``post_hook`` leaves
  the weights alone for the same reason (call ``ddp.average_all()`` after the ``with`` block
  for one model everywhere); it only disables the wrapper's join config, which torch leaves
  enabled after ``Join``, so that after the block nothing is sent again. (A ``Join`` left by
  an exception skips the post-hooks: every rank then keeps notifying — consistent, one tiny
  all-reduce per iteration — until the next ``Join`` ends.)

The notify is sent from the reducer, at the first gradient of a backward that synchronises
(not in forward, as torch DDP does), so ``no_sync()`` micro-steps, forwards without a backward
and integrations that switch ``no_sync`` after the forward (DeepSpeed) send nothing. Not
supported inside the block: a backward that raises half-way (the joined ranks shadowed all
of it), ``set_schedule`` (a joined rank shadows the schedule it had), and the wrapper's
collectives that only some ranks call (``average_all``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook

from dreamddp.core.collectives import ActiveRanks, BucketAverage
from dreamddp.emulation.link import SimulatedLink

if TYPE_CHECKING:
    from dreamddp.core.ddp import DreamDDP

__all__ = ["DreamDDPJoinHook", "active_ranks", "join_device"]

COUNT_BYTES = 4  # Join's count all-reduce: one float32


def join_device(group: dist.ProcessGroup) -> torch.device:
    """Where Join's count all-reduces run: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def active_ranks(joinable: Joinable | None, link: SimulatedLink | None) -> ActiveRanks | None:
    """Once per synchronising backward, before its first bucket: notify an enclosing ``Join``.

    Returns the divisor of this iteration's averages, or None outside ``Join`` (nothing sent).
    """
    if joinable is None or not joinable._join_config.enable:
        return None
    _check_first(joinable)
    work = Join.notify_join_context(joinable)
    assert work is not None  # the first joinable of an enabled Join always gets one
    booking = link.book(COUNT_BYTES) if link is not None else None
    if link is not None and booking is not None:
        link.track(work, booking)
    return ActiveRanks(work, booking)


def _check_first(joinable: Joinable) -> None:
    if not joinable._join_config.is_first_joinable:
        raise ValueError(
            "DreamDDP must be the first joinable in Join([ddp, ...]): "
            "only the first one learns how many ranks are still training"
        )


class DreamDDPJoinHook(JoinHook):
    """What a rank that ran out of data does while others still train: shadow their averages."""

    def __init__(self, ddp: DreamDDP, **_kwargs: Any) -> None:
        self.ddp = ddp
        self.shadowed = 0  # synchronising iterations shadowed in this Join

    def main_hook(self) -> None:
        ddp = self.ddp
        _check_first(ddp)
        if self.shadowed == 0:
            ddp.prepare_forward()  # drain a backward that raised; lay moved storage out again
            ddp.flush()  # land this rank's own averages still in flight; sends nothing
        _shadow_iteration(ddp)
        self.shadowed += 1

    def post_hook(self, is_last_joiner: bool) -> None:
        """Every rank has joined: leave the Join, so that outside it nothing is sent and the averages
        divide by the world size again (torch leaves a joinable's config enabled after ``Join``).

        The weights are left alone: local SGD replicas legitimately differ between averages, and
        the next ones proceed as scheduled (``average_all()`` makes them one model).
        """
        self.ddp._join_config = self.ddp._join_config._replace(enable=False)


@torch.no_grad()
def _shadow_iteration(ddp: DreamDDP) -> None:
    """The all-reduces of the others' synchronising backward at this rank's phase, with zeros."""
    state, reducer, link = ddp._state, ddp._reducer, ddp.link
    if link is not None:  # Join's count all-reduce, booked as the ranks still training book theirs
        link.complete(link.book(COUNT_BYTES))
    pending = []
    for bucket in state.plan():
        flat = state.layout.flats[bucket.key]
        zeros = torch.zeros(bucket.size, dtype=flat.dtype, device=flat.device)  # one each: results land in it
        pending.append(BucketAverage([zeros], ddp.process_group, link, divisor=ActiveRanks(None)))
    for average in pending:
        average.wait()
    ddp.total_bytes_sent += sum(average.nbytes for average in pending)
    state.iteration += 1
    if not reducer.order_rebuilt:  # joined before its first synchronising backward ended
        reducer._observed = []
        reducer.order_rebuilt = True
        reducer._rebuild_order_from_rank0()

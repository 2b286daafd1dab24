"""DDP communication hooks that route torch's own hooks through a SimulatedLink.

No ``from __future__ import annotations`` here: DDP inspects a hook's annotations at
registration and insists on the real ``dist.GradBucket`` / ``Future`` objects, not strings.
"""

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook

from dreamddp.emulation.link import SimulatedLink

__all__ = ["linked_allreduce_hook", "linked_post_local_sgd_hook"]


def _bucket_bytes(bucket: dist.GradBucket) -> int:
    return bucket.buffer().numel() * bucket.buffer().element_size()


def linked_allreduce_hook(link: SimulatedLink, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """torch's default all-reduce hook, completing no earlier than the simulated link allows."""
    booking = link.book(_bucket_bytes(bucket))
    # None: the default group, as DDP itself passes it (torch's annotation says ProcessGroup only).
    fut = default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]
    return link.delay_future(fut, booking, bucket.buffer().device)


def linked_post_local_sgd_hook(
    state: tuple[PostLocalSGDState, SimulatedLink], bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """torch's post-local-SGD hook; its warm-up gradient all-reduces pay the simulated link."""
    local_sgd_state, link = state
    communicates = local_sgd_state.iter < local_sgd_state.start_localSGD_iter
    fut = post_localSGD_hook(local_sgd_state, bucket)
    if not communicates:
        return fut
    return link.delay_future(fut, link.book(_bucket_bytes(bucket)), bucket.buffer().device)

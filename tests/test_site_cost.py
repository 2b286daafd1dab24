"""The profiler's measurement of what a site's gradient all-reduce costs an iteration (issue 15).

On real gloo ranks: the iterations with the wrapper's ``SiteGradients`` take measurably longer
than the same iterations without when the gradients are large and the compute small; the bytes
are the trainable gradients and their presence flags; the model is left as it was, gradients unset.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from profiler.site_cost import profile_site_gradients

from .dist_utils import run_workers

pytestmark = pytest.mark.timeout(120)


def _measure(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # 2 x 8 MB of gradients behind a few microseconds of compute; one frozen parameter.
    model = nn.Sequential(nn.Linear(1024, 2048), nn.Linear(2048, 1024), nn.Linear(1024, 1))
    model[2].bias.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    cost = profile_site_gradients(
        model, lambda step: (torch.randn(2, 1024), None), lambda out, _: out.sum(), dist.group.WORLD, iters=4, warmup=1
    )
    return {
        "alone": cost.alone_s,
        "with": cost.with_site_s,
        "extra": cost.extra_s,
        "bytes": cost.gradient_bytes,
        "expected_bytes": 4 * sum(p.numel() + 1 for p in model.parameters() if p.requires_grad),
        "unchanged": all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)),
        "grads": [p.grad for p in model.parameters()],
    }


def test_site_gradients_cost_measured_against_the_same_iterations_without() -> None:
    for r in run_workers(_measure, 2):
        assert r["bytes"] == r["expected_bytes"]
        assert r["unchanged"] and all(g is None for g in r["grads"])
        assert 0 < r["alone"] < r["with"]
        # 12 MB all-reduced over loopback cannot take under 2 ms; without the reduction it is not there.
        assert r["extra"] == pytest.approx(r["with"] - r["alone"]) and r["extra"] > 0.002, r

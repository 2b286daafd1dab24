"""The CUDA paths of delta sync: anchors in pinned host memory, NCCL, CUDA tensors over gloo.

Skipped where no GPU is (this project's CI machine has none); run them on a GPU machine with
``pytest -m cuda tests/test_cuda.py``. What they hold:

- with the weights on a GPU, ``anchor_device="cpu"`` keeps anchors, momentum and residuals in
  pinned host memory and gives the same bits as anchors beside the weights (NCCL, int8 +
  Nesterov, both overlap modes): the non-blocking copies between host and device are ordered;
- outer SGD with lr 1 and host anchors is average mode to 1e-6 on two ranks sharing a GPU over
  gloo (the only way to put two ranks on one GPU);
- a checkpoint written from host anchors resumes bit-exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

from dreamddp import DreamDDP, sync_units
from dreamddp.core.sync_options import SyncOptions
from dreamddp.emulation.link import link_from_settings

from .dist_utils import run_workers
from .nets import MLP, loss_of, make_batch, make_optimizer, random_schedule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(model, schedule, sync, rank: int, steps: int, overlap: str = "backward", world: int = 1) -> DreamDDP:
    device = torch.device("cuda", torch.cuda.current_device())
    model = model.to(device)
    link = link_from_settings("5mbit,3ms", world) if overlap == "forward" else None
    ddp = DreamDDP(model, schedule, overlap=overlap, link=link, sync=sync)
    opt = make_optimizer("momentum", model.parameters())
    ddp.register_optimizer(opt)
    _steps(ddp, opt, rank, 0, steps)
    return ddp


def _steps(ddp: DreamDDP, opt: torch.optim.Optimizer, rank: int, start: int, n: int) -> None:
    """Iterations ``start`` to ``start + n`` on this rank's data, landed and finished on the GPU."""
    device = torch.device("cuda", torch.cuda.current_device())
    for step in range(start, start + n):
        opt.zero_grad(set_to_none=True)
        x, y = make_batch("vector", rank, step)
        loss_of("vector", ddp(x.to(device)), y.to(device)).backward()
        opt.step()
    ddp.flush()
    torch.cuda.synchronize()


def _weights(ddp: DreamDDP) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).cpu() for t in ddp.module.state_dict().values()])


def _host_anchors_same_bits(rank: int, world: int, overlap: str) -> dict[str, object]:
    torch.manual_seed(0)
    base = MLP()
    schedule = random_schedule([u.name for u in sync_units(base)], period=3, seed=5)
    out: dict[str, object] = {}
    for where in ("param", "cpu"):
        sync = SyncOptions(mode="delta", outer="nesterov", compress="int8", compress_block=5, anchor_device=where)
        ddp = _train(copy.deepcopy(base), schedule, sync, rank, steps=9, overlap=overlap, world=world)
        out[where] = _weights(ddp)
        held = [*ddp._delta.anchors, *(ddp._delta.momentum or []), *(ddp._delta.residuals or [])]
        out[f"{where}-devices"] = sorted({t.device.type for t in held})
        out[f"{where}-pinned"] = all(t.is_pinned() for t in held) if where == "cpu" else None
    return out


@pytest.mark.parametrize("overlap", ["backward", "forward"])
def test_host_anchors_give_the_same_bits_over_nccl(overlap: str) -> None:
    (got,) = run_workers(_host_anchors_same_bits, 1, overlap, backend="nccl", timeout=240)
    assert got["param-devices"] == ["cuda"]
    assert got["cpu-devices"] == ["cpu"] and got["cpu-pinned"] is True
    assert (got["param"] == got["cpu"]).all(), "anchors in host memory changed the result"


def _lr1_is_average(rank: int, world: int) -> float:
    torch.manual_seed(0)
    base = MLP()
    schedule = random_schedule([u.name for u in sync_units(base)], period=3, seed=7)
    average = _weights(_train(copy.deepcopy(base), schedule, "average", rank, steps=9))
    delta = _weights(_train(copy.deepcopy(base), schedule, SyncOptions(mode="delta", anchor_device="cpu"), rank, 9))
    return float((average - delta).abs().max())


def test_host_anchors_lr1_is_average_mode_on_two_ranks() -> None:
    diffs = run_workers(_lr1_is_average, 2, timeout=240)
    assert max(diffs) < 1e-6, diffs


def _resume_from_host_anchors(rank: int, world: int) -> float:
    torch.manual_seed(0)
    base = MLP()
    schedule = random_schedule([u.name for u in sync_units(base)], period=4, seed=9)
    sync = SyncOptions(mode="delta", outer="nesterov", compress="int8", anchor_device="cpu")
    device = torch.device("cuda", torch.cuda.current_device())

    def wrapped() -> tuple[DreamDDP, torch.optim.Optimizer]:
        model = copy.deepcopy(base).to(device)
        ddp = DreamDDP(model, schedule, sync=sync)
        opt = make_optimizer("adamw", model.parameters())
        ddp.register_optimizer(opt)
        return ddp, opt

    ddp, opt = wrapped()
    _steps(ddp, opt, rank, 0, 6)  # mid-period
    saved = copy.deepcopy((ddp.state_dict(), opt.state_dict()))
    _steps(ddp, opt, rank, 6, 5)
    ddp2, opt2 = wrapped()
    ddp2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _steps(ddp2, opt2, rank, 6, 5)
    return float((_weights(ddp) - _weights(ddp2)).abs().max())


def test_host_anchor_checkpoint_resumes_bit_exactly() -> None:
    (diff,) = run_workers(_resume_from_host_anchors, 1, backend="nccl", timeout=240)
    assert diff == 0.0

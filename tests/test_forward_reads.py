"""DreamDDP(overlap="forward") refuses a forward that reads a unit's weight before it can land.

With forward overlap a unit's average lands in its owners' forward pre-hooks; a parent that
reads a child's weight functionally (``F.linear(x, self.child.weight)``, as
``nn.MultiheadAttention`` does with ``out_proj.weight``) with the child never called reads it
stale. The first training forwards are checked (``dreamddp.core.forward_reads``):

- such a model is refused with one line naming the tensor and the reader, nothing left installed;
- the same model with overlap="backward" trains as the one-process reference does, while
  overlap="forward" with the check switched off does not (what the check prevents);
- models that read only through their owners pass — tied weights included, and a tied head
  read after the embedding's forward is exact — and after the check no hook or mode is left.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dreamddp import DreamDDP, Schedule, sync_units
from dreamddp.emulation.link import link_from_settings
from dreamddp.training.models import build_model

from .dist_utils import run_workers
from .nets import TiedLM, loss_of, make_batch, make_optimizer, reference_partial_local_sgd, train_steps


class Parent(nn.Module):
    def __init__(self, reads: bool) -> None:
        super().__init__()
        self.child = nn.Linear(8, 16)
        self.reads = reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads:  # the child's forward never runs: its pre-hook never lands its average
            return F.linear(x, self.child.weight, self.child.bias)
        return self.child(x)


class ReadsChild(nn.Module):
    """Units ``parent.child`` and ``head``; ``reads=False`` is the same arithmetic through the child."""

    def __init__(self, reads: bool = True) -> None:
        super().__init__()
        self.parent = Parent(reads)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.parent(x)))


class Attention(nn.Module):
    """torch's MultiheadAttention reads ``out_proj.weight`` in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


class TiedReadLM(TiedLM):
    """TiedLM with its head written as a read of the embedding's weight, after the embedding ran."""

    def __init__(self) -> None:
        super().__init__()
        del self.out

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mix(self.embed(idx))), self.embed.weight)


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_always_called) for m in model.modules()
    )


def _refused(rank: int, world: int) -> dict:
    out = {}
    for name, model, x in (
        ("parent", ReadsChild(), torch.randn(6, 8)),
        ("mha", Attention(), torch.randn(2, 3, 8)),
    ):
        ddp = DreamDDP(model, Schedule.every_step([u.name for u in sync_units(model)]), overlap="forward")
        installed = _hooks(model)  # the landing's own pre-hooks
        with torch.no_grad():
            ddp(x)  # not a training forward: not checked
        unchecked = ddp._reads_to_check
        try:
            ddp(x)
            message = None
        except ValueError as e:
            message = str(e)
        out[name] = {
            "message": message,
            "unchecked": unchecked,
            "hooks": (installed, _hooks(model)),
            "modes": torch._C._len_torch_function_stack(),
        }
    return out


PARENT_MESSAGE = (
    "overlap=\"forward\" cannot keep parameter 'parent.child.weight' exact: the forward of 'parent' reads it "
    "before the forward of any module that owns it ('parent.child'), so its average would land after the read "
    "(also read early: 'parent.child.bias'); use overlap=\"backward\", or call the owning module instead of "
    "reading its weight"
)


@pytest.mark.timeout(60)
def test_a_forward_reading_a_child_weight_is_refused_with_nothing_left_installed():
    for r in run_workers(_refused, 2, timeout=50):
        assert r["parent"]["message"] == PARENT_MESSAGE, r
        mha = r["mha"]["message"]
        assert mha is not None and "'attn.out_proj.weight'" in mha and "the forward of 'attn'" in mha, r
        assert "\n" not in mha, r
        for case in r.values():
            assert case["unchecked"] == 2, r  # the no_grad forward left the check for training
            assert case["hooks"][0] == case["hooks"][1] and case["modes"] == 0, r


UNDELAYED = Schedule(period=2, assignment={"parent.child": [0], "head": [0, 1]})
DELAYED = Schedule(
    period=2, assignment={"parent.child": [0], "head": [1]}, delays={"parent.child": 1}, overlap="forward"
)


def _train(rank: int, reads: bool, schedule: Schedule, overlap: str, check: bool, steps: int = 5) -> dict:
    torch.manual_seed(0)
    model = ReadsChild(reads)
    ddp = DreamDDP(model, schedule, overlap=overlap)
    if not check:
        ddp._reads_to_check = 0
    opt = make_optimizer("momentum", model.parameters())
    ddp.register_optimizer(opt)
    losses, spread = [], 0.0
    for step in range(steps):
        opt.zero_grad()
        x, y = make_batch("vector", rank, step)
        loss = loss_of("vector", ddp(x), y)
        loss.backward()
        if overlap == "backward":  # the scheduled units are identical on every rank now
            for unit in (u for u in ddp.units if u.name in ddp.last_stats.units):
                for t in unit.tensors:
                    both = [torch.empty_like(t) for _ in range(dist.get_world_size())]
                    dist.all_gather(both, t.detach().contiguous())
                    spread = max(spread, (both[0] - both[1]).abs().max().item())
        opt.step()
        losses.append(loss.item())
    ddp.flush()
    world = dist.get_world_size()
    reference = reference_partial_local_sgd(lambda: ReadsChild(reads), schedule, world, steps, "momentum", "vector")
    state = model.state_dict()
    diff = max((state[k] - reference[rank][k]).abs().max().item() for k in reference[rank])
    return {"losses": losses, "spread": spread, "reference_diff": diff}


def _backward_is_exact(rank: int, world: int) -> dict:
    return {
        "backward": _train(rank, True, UNDELAYED, "backward", check=True),
        "unchecked_forward": _train(rank, True, DELAYED, "forward", check=False),
        "calls_child_forward": _train(rank, False, DELAYED, "forward", check=True),
    }


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_reading_a_child_weight_is_exact_with_backward_overlap_and_stale_without_the_check():
    for r in run_workers(_backward_is_exact, 2, timeout=50):
        b = r["backward"]
        assert all(math.isfinite(x) for x in b["losses"]) and b["spread"] == 0.0, r
        assert b["reference_diff"] <= 1e-6, r
        # What the check prevents: the delayed child lands after the parent has read it.
        assert r["unchecked_forward"]["reference_diff"] > 1e-5, r  # ~1.6e-4; the exact runs are 0.0
        # ... while the same arithmetic through the child's own forward is exact.
        assert r["calls_child_forward"]["reference_diff"] <= 1e-6, r


def _passes(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    gpt = build_model("gpt", {"vocab_size": 32, "block_size": 8, "n_layer": 1, "n_head": 2, "d_model": 16})
    seen = []  # during each forward: (pre-hooks on ln_f, active torch function modes)
    gpt.ln_f.register_forward_hook(
        lambda m, a, o: seen.append((len(m._forward_pre_hooks), torch._C._len_torch_function_stack()))
    )
    out = {}
    for overlap in ("forward", "backward"):
        model = copy.deepcopy(gpt)
        # As in a resumed run (its bucket order comes from the checkpoint), the first backward
        # already leaves its averages in flight, and a slow link keeps them there into the
        # second (checked) forward: the landing and the held-back optimizer steps run in
        # pre-hooks under the check, and are not reads of the forward.
        link = link_from_settings("5mbit,20ms", world) if overlap == "forward" else None
        ddp = DreamDDP(model, Schedule.every_step([u.name for u in sync_units(model)]), overlap=overlap, link=link)
        ddp.load_state_dict(ddp.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ddp.register_optimizer(opt)
        installed = _hooks(model)
        seen.clear()
        for step in range(3):
            idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(10 * rank + step))
            opt.zero_grad()
            F.cross_entropy(ddp(idx)[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1)).backward()
            opt.step()
        ddp.flush()
        out[overlap] = {
            "seen": list(seen),
            "hooks": (installed, _hooks(model)),
            "left": ddp._reads_to_check,
            "held_back": ddp._landing.deferred.applied,
            "modes": torch._C._len_torch_function_stack(),
        }
    # A tied head read after the embedding's forward is exact (its average landed in the
    # embedding's pre-hook), even when the schedule delays it: not refused, same as the reference.
    torch.manual_seed(0)
    model = TiedReadLM()
    schedule = Schedule(period=2, assignment={"embed": [0], "mix": [1]}, delays={"embed": 1}, overlap="forward")
    ddp = DreamDDP(model, schedule)
    opt = make_optimizer("momentum", model.parameters())
    ddp.register_optimizer(opt)
    train_steps(ddp, opt, "lm", rank, 5)
    ddp.flush()
    reference = reference_partial_local_sgd(TiedReadLM, schedule, world, 5, "momentum", "lm")[rank]
    out["tied_read_diff"] = max((model.state_dict()[k] - reference[k]).abs().max().item() for k in reference)
    return out


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_models_reading_through_their_owners_pass_and_the_check_leaves_nothing_behind():
    for r in run_workers(_passes, 2, timeout=50):
        f, b = r["forward"], r["backward"]
        base = f["seen"][2][0]
        # Checked on the first two training forwards (2 more pre-hooks, one mode), then nothing.
        assert f["seen"] == [(base + 2, 1), (base + 2, 1), (base, 0)], r
        assert f["held_back"] > 0 and f["left"] == 0 and f["hooks"][0] == f["hooks"][1] and f["modes"] == 0, r
        assert b["seen"] == [(b["seen"][0][0], 0)] * 3 and b["left"] == 2 and b["hooks"][0] == b["hooks"][1], r
        assert r["tied_read_diff"] <= 1e-6, r

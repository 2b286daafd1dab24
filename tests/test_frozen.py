"""Frozen parameters (requires_grad=False) are in no sync unit, never sent, and checked equal across ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dreamddp import DreamDDP, Schedule, sync_units
from dreamddp.core import agreement
from dreamddp.core.agreement import tensor_digest
from dreamddp.training.config import TrainConfig
from dreamddp.training.models import build_model
from dreamddp.training.strategies import build_strategy

from .dist_utils import run_workers
from .nets import MLP, TiedLM, loss_of, make_batch, train_steps
from .test_ddp import CountingAllReduce

TINY_GPT = {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 32}
FROZEN_NAMES = ["base.weight", "base.bias", "bn.weight", "bn.bias", "mix.weight"]


class PartlyFrozen(nn.Module):
    """A frozen layer (no unit), a BatchNorm with frozen affine (buffer-only unit), a half-frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.base.requires_grad_(False)
        self.bn.requires_grad_(False)
        self.mix.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.bn(torch.tanh(self.base(x))))))


def _trainable_bytes(model: nn.Module) -> int:
    """Trainable parameters plus floating buffers, counted without sync_units."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())  # BN stats
    return params + buffers


# --------------------------------------------------------------------------- units (no process group)
def test_units_hold_only_trainable_parameters_and_floating_buffers():
    model = PartlyFrozen()
    units = sync_units(model)
    assert [u.name for u in units] == ["bn", "mix", "head"]  # no unit for the frozen "base"
    by_name = {u.name: u for u in units}
    assert by_name["bn"].param_names == () and by_name["bn"].buffer_names == ("bn.running_mean", "bn.running_var")
    assert by_name["mix"].param_names == ("mix.bias",)
    assert [name for name, _ in units.frozen] == FROZEN_NAMES
    assert all(not p.requires_grad for _, p in units.frozen)
    assert sum(u.nbytes for u in units) == _trainable_bytes(model) == (16 + 4 * 16 + 4 + 2 * 16) * 4


@pytest.mark.parametrize(
    "make,names",
    [
        (MLP, ["fc1", "bn", "fc2", "head"]),
        (TiedLM, ["embed", "mix"]),  # out.weight is embed's; out has nothing else
        (
            lambda: build_model("gpt", TINY_GPT),
            ["wte", "wpe", "blocks.0.ln1", "blocks.0.attn.qkv", "blocks.0.attn.proj"]
            + ["blocks.0.ln2", "blocks.0.mlp.fc", "blocks.0.mlp.proj", "ln_f"],
        ),
    ],
)
def test_fully_trainable_models_keep_their_unit_names_and_tensors(make, names):
    model = make()
    units = sync_units(model)
    assert [u.name for u in units] == names and units.frozen == ()
    params = [p for u in units for p in u.params]
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]  # every parameter, in order


def test_digest_sees_any_changed_bit_and_nothing_else(monkeypatch):
    monkeypatch.setattr(agreement, "_DIGEST_CHUNK", 8)  # several chunks, and a tail of odd bytes
    torch.manual_seed(0)
    for t in (torch.randn(37), torch.randn(37).to(torch.bfloat16), torch.randn(5, 7).t()):
        reference = int(tensor_digest(t))
        assert int(tensor_digest(t.clone())) == reference == int(tensor_digest(t.contiguous()))
        raw = t.contiguous().view(-1).view(torch.uint8)
        for byte in range(raw.numel()):
            for bit in (0, 7):
                flipped = raw.clone()
                flipped[byte] ^= 1 << bit
                got = int(tensor_digest(flipped.view(t.dtype)))
                assert got != reference, (t.dtype, byte, bit)
    a = torch.randn(64)
    b = a.clone()
    b[[3, 40]] = b[[40, 3]]  # the same values, two chunks swapped
    assert int(tensor_digest(a)) != int(tensor_digest(b))


# --------------------------------------------------------------------------- on two ranks
def _frozen_never_sent(rank: int, world: int) -> dict:
    problems = []
    torch.manual_seed(0)
    model = PartlyFrozen()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    names = [u.name for u in sync_units(model)]
    schedule = Schedule(period=2, assignment={n: [1] for n in names})  # everything averaged at h = 1
    ddp = DreamDDP(model, schedule)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sent = []
    for step in range(4):
        opt.zero_grad()
        x, y = make_batch("vector", rank, step)
        loss = loss_of("vector", ddp(x), y)
        with CountingAllReduce() as counter:
            loss.backward()
        sent.append((counter.bytes, ddp.last_stats.bytes_sent))
        if step % 2 == 1:  # just averaged: every unit equal on both ranks
            for u in ddp.units:
                for name, t in zip(u.param_names + u.buffer_names, u.tensors):
                    gathered = [torch.empty_like(t) for _ in range(world)]
                    dist.all_gather(gathered, t.contiguous())
                    if not torch.equal(gathered[0], gathered[1]):
                        problems.append(f"step {step}: {name} differs after its average")
        opt.step()
    # The trainable weights really trained apart between averages (else the check above is empty).
    opt.zero_grad()
    loss_of("vector", ddp(make_batch("vector", rank, 9)[0]), make_batch("vector", rank, 9)[1]).backward()
    opt.step()
    head = model.head.weight.detach().clone()
    gathered = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(gathered, head)
    if torch.equal(gathered[0], gathered[1]):
        problems.append("head.weight is equal on both ranks without an average: nothing was tested")
    frozen_after = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for name, before in frozen_before.items():
        if not torch.equal(before, frozen_after[name]):
            problems.append(f"frozen {name} changed")
    # overlap="forward" keeps frozen parameters out too.
    torch.manual_seed(0)
    forward_model = PartlyFrozen()
    forward = DreamDDP(forward_model, Schedule.every_step(names), overlap="forward")
    forward_opt = torch.optim.SGD([p for p in forward_model.parameters() if p.requires_grad], lr=0.1)
    forward.register_optimizer(forward_opt)
    train_steps(forward, forward_opt, "vector", rank, 2)
    forward.flush()
    return {
        "problems": problems,
        "sent": sent,
        "total": ddp.total_bytes_sent,
        "forward_total": forward.total_bytes_sent,
        "expected": _trainable_bytes(model),
        "frozen": frozen_after,
    }


def _two_rank_checks(rank: int, world: int) -> dict:
    """Every two-rank check of this file in one spawn of two processes (it is the slow part)."""
    return {
        "never_sent": _frozen_never_sent(rank, world),
        "mismatches": _frozen_mismatches(rank, world),
        "baselines": _baselines_skip_frozen(rank, world),
    }


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_workers(_two_rank_checks, 2, timeout=120)


def test_frozen_parameters_are_never_sent_and_stay_identical(two_ranks):
    results = [r["never_sent"] for r in two_ranks]
    for rank, result in enumerate(results):
        expected = result["expected"]
        assert expected == (16 + 4 * 16 + 4 + 2 * 16) * 4, expected  # not the 432 frozen floats
        assert result["problems"] == [], f"rank {rank}: {result['problems']}"
        assert result["sent"] == [(0, 0), (expected, expected)] * 2, result["sent"]
        assert result["total"] == 2 * expected and result["forward_total"] == 2 * expected
    for name, value in results[0]["frozen"].items():
        assert (value == results[1]["frozen"][name]).all(), name


def _frozen_mismatches(rank: int, world: int) -> dict:
    def attempt(build) -> str:
        try:
            build()
        except ValueError as err:
            return str(err)
        return "no error"

    def model(offset_on_rank1: float = 0.0, train_base_on_rank1: bool = False, two: bool = False) -> PartlyFrozen:
        torch.manual_seed(0)
        m = PartlyFrozen()
        if rank == 1:
            with torch.no_grad():
                m.mix.weight[3, 5] += offset_on_rank1
                if two:
                    m.base.bias[0] += offset_on_rank1
            m.base.weight.requires_grad_(train_base_on_rank1)
        return m

    def wrap(m: nn.Module) -> None:
        DreamDDP(m, Schedule.every_step([u.name for u in sync_units(m)]))

    cfg = TrainConfig(algorithm="local_sgd", period=1, optimizer="sgd", lr=0.1)
    return {
        "differs": attempt(lambda: wrap(model(offset_on_rank1=1e-3))),
        "two_differ": attempt(lambda: wrap(model(offset_on_rank1=1e-3, two=True))),
        "flipped": attempt(lambda: wrap(model(train_base_on_rank1=True))),
        "local_sgd": attempt(lambda: build_strategy(model(offset_on_rank1=1.0), cfg, None)),
        "local_sgd_flipped": attempt(lambda: build_strategy(model(train_base_on_rank1=True), cfg, None)),
        "same": attempt(lambda: wrap(model())),
    }


def test_differing_frozen_weights_fail_every_rank_with_one_line(two_ranks):
    results = [r["mismatches"] for r in two_ranks]
    assert results[0] == results[1]  # every rank raises the same line; none is left waiting
    differs = (
        "frozen parameter 'mix.weight' differs between rank 0 and rank 1: frozen weights are never averaged, "
        "so every rank must load the same ones (same seed or checkpoint)"
    )
    assert results[0]["differs"] == differs
    assert results[0]["local_sgd"] == differs
    assert results[0]["two_differ"] == (  # the first in registration order, and how many
        "frozen parameter 'base.bias' differs between rank 0 and rank 1: frozen weights are never averaged, "
        "so every rank must load the same ones (same seed or checkpoint); 2 of 5 frozen parameters differ"
    )
    flipped = (
        "models differ across ranks: parameter 'base.weight' is frozen (requires_grad=False) on rank 0 "
        "but trained on rank 1; freeze the same parameters on every rank"
    )
    assert results[0]["flipped"] == results[0]["local_sgd_flipped"] == flipped
    assert results[0]["same"] == "no error"


def _baselines_skip_frozen(rank: int, world: int) -> dict:
    out = {}
    for algorithm in ("local_sgd", "post_local_sgd"):
        torch.manual_seed(0)
        model = PartlyFrozen()
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        cfg = TrainConfig(algorithm=algorithm, period=1, optimizer="sgd", lr=0.1)
        strategy = build_strategy(model, cfg, None)
        stepped = [p for group in strategy.optimizer.param_groups for p in group["params"]]
        sent, equal = [], []
        for step in range(2):
            strategy.optimizer.zero_grad()
            x, y = make_batch("vector", rank, step)
            loss_of("vector", strategy.model(x), y).backward()
            with CountingAllReduce() as counter:
                strategy.optimizer.step()
                strategy.after_step(step)
            sent.append((counter.bytes, strategy.stats().bytes_sent))
            head = model.head.weight.detach().clone()
            gathered = [torch.empty_like(head) for _ in range(world)]
            dist.all_gather(gathered, head)
            equal.append(torch.equal(gathered[0], gathered[1]))
        strategy.close()
        out[algorithm] = {
            "sent": sent,
            "equal": equal,
            "stepped": len(stepped),
            "frozen_unchanged": all(
                torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if n in frozen_before
            ),
            "params": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
            "with_buffers": _trainable_bytes(model),
        }
    return out


def test_local_sgd_baselines_average_only_trainable_tensors(two_ranks):
    for result in [r["baselines"] for r in two_ranks]:
        local, post = result["local_sgd"], result["post_local_sgd"]
        # local_sgd: trainable parameters and BatchNorm's running stats, each period (H = 1).
        assert local["sent"] == [(local["with_buffers"], local["with_buffers"])] * 2, local
        # post_local_sgd: torch's averager gets the optimizer's parameters: the trainable ones only.
        assert post["stepped"] == local["stepped"] == 3  # mix.bias, head.weight, head.bias
        assert [reported for _, reported in post["sent"]] == [post["params"]] * 2, post
        assert [counted for counted, _ in post["sent"]] == [post["params"]] * 2, post
        for name, r in result.items():
            assert r["equal"] == [True, True] and r["frozen_unchanged"], (name, r)

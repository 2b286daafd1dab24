"""sync="delta": anchors, an outer optimizer per unit, compressed payloads with error feedback.

- outer SGD with lr 1 and no compression is average mode (1e-6), in both overlap modes, with a
  learned launch order (the anchors follow the re-layout) and with anchors in host memory;
- after every sync the synced units, and every anchor, are bitwise identical on every rank,
  with int8 and bf16, on 2 and 4 ranks;
- outer Nesterov against a pure-Python reference (torch's own SGD on per-unit anchors);
- resume mid-period is bit-exact with anchors, momentum and residuals;
- error feedback carries exactly what the encoding dropped (pure functions);
- bad options and Join get one line each.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamddp import DreamDDP, Schedule, sync_units
from dreamddp.core.compress import allreduce_equivalent_bytes, check_world, decode, encode, with_feedback
from dreamddp.core.delta import outer_step
from dreamddp.core.sync_options import SyncOptions
from dreamddp.emulation.link import link_from_settings

from .dist_utils import run_workers
from .nets import MLP, ScrambledMLP, loss_of, make_batch, make_optimizer, random_schedule

MODELS = {"mlp": MLP, "scrambled": ScrambledMLP}


def _run(
    model,
    schedule,
    sync,
    rank: int,
    steps: int,
    *,
    overlap: str = "backward",
    optimizer: str = "momentum",
    world: int = 2,
    check=None,
):
    link = link_from_settings("5mbit,3ms", world) if overlap == "forward" else None
    ddp = DreamDDP(model, schedule, overlap=overlap, link=link, sync=sync)
    opt = make_optimizer(optimizer, model.parameters())
    ddp.register_optimizer(opt)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        x, y = make_batch("vector", rank, step)
        loss_of("vector", ddp(x), y).backward()
        if check is not None:
            check(ddp, step)
        opt.step()
    ddp.flush()
    return ddp, opt


def _lr1_matches_average(rank: int, world: int, model_name: str, overlap: str, anchor_device: str) -> float:
    torch.manual_seed(0)
    base = MODELS[model_name]()
    schedule = random_schedule([u.name for u in sync_units(base)], period=3, seed=7)
    out = {}
    for sync in ("average", SyncOptions(mode="delta", anchor_device=anchor_device)):
        ddp, _ = _run(copy.deepcopy(base), schedule, sync, rank, steps=9, overlap=overlap)
        out[str(sync)] = torch.cat([p.detach().reshape(-1) for p in ddp.module.state_dict().values()])
    a, b = out.values()
    return float((a - b).abs().max())


@pytest.mark.parametrize(
    "model_name,overlap,anchor_device",
    [
        ("mlp", "backward", "param"),
        pytest.param("scrambled", "backward", "cpu", marks=pytest.mark.slow),
        pytest.param("mlp", "forward", "param", marks=pytest.mark.slow),
    ],
)
def test_outer_sgd_lr1_is_average_mode(model_name: str, overlap: str, anchor_device: str) -> None:
    diffs = run_workers(_lr1_matches_average, 2, model_name, overlap, anchor_device)
    assert max(diffs) < 1e-6, diffs


def _identical_after_every_sync(rank: int, world: int, compress: str, overlap: str) -> int:
    torch.manual_seed(0)
    base = MLP()
    schedule = random_schedule([u.name for u in sync_units(base)], period=3, seed=3)
    sync = SyncOptions(mode="delta", outer="nesterov", compress=compress, compress_block=5)
    checked = 0

    def same_everywhere(t: torch.Tensor) -> bool:
        gathered = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(gathered, t.contiguous())
        return all(torch.equal(g, gathered[0]) for g in gathered)

    def check(ddp: DreamDDP, step: int) -> None:
        nonlocal checked
        ddp.flush()  # forward overlap: land what this backward launched
        for unit in ddp.units:
            if unit.name in ddp.last_stats.units:
                for t in unit.tensors:
                    assert same_everywhere(t.detach()), f"{unit.name} differs across ranks after step {step}"
                checked += 1
        for anchor in ddp._delta.anchors:
            assert same_everywhere(anchor), f"anchors differ across ranks after step {step}"
        assert not same_everywhere(ddp._delta.residuals[0]), "residuals are each rank's own"

    _run(base, schedule, sync, rank, steps=7, overlap=overlap, world=world, check=check)
    return checked


@pytest.mark.parametrize(
    "compress,world,overlap",
    [
        ("int8", 2, "backward"),
        pytest.param("bf16", 2, "forward", marks=pytest.mark.slow),
        pytest.param("int8", 4, "backward", marks=pytest.mark.slow),
        pytest.param("bf16", 4, "backward", marks=pytest.mark.slow),
    ],
)
def test_replicas_bitwise_identical_after_every_sync(compress: str, world: int, overlap: str) -> None:
    checked = run_workers(_identical_after_every_sync, world, compress, overlap, timeout=180)
    assert min(checked) > 0


def _reference_nesterov(world: int, steps: int, schedule: Schedule, lr: float, mu: float) -> dict[str, torch.Tensor]:
    """Partial local SGD with DiLoCo's outer step, the slow obvious way: copies in one process.

    Per unit, an anchor stepped by torch's own SGD (Nesterov) with the mean pseudo-gradient as
    its gradient; buffers (BatchNorm statistics) are averaged.
    """
    torch.manual_seed(0)
    base = MLP()
    models = [copy.deepcopy(base) for _ in range(world)]
    optims = [make_optimizer("adamw", m.parameters()) for m in models]
    anchors = {n: p.detach().clone().requires_grad_() for n, p in base.named_parameters()}
    outer = {n: torch.optim.SGD([a], lr=lr, momentum=mu, nesterov=True) for n, a in anchors.items()}
    unit_params = {u.name: u.param_names for u in sync_units(base)}
    unit_buffers = {u.name: u.buffer_names for u in sync_units(base)}
    for step in range(steps):
        for rank, (model, opt) in enumerate(zip(models, optims)):
            opt.zero_grad()
            x, y = make_batch("vector", rank, step)
            loss_of("vector", model(x), y).backward()
        with torch.no_grad():
            for unit in schedule.units_at(step % schedule.period):
                for name in unit_params[unit]:
                    live = [dict(m.named_parameters())[name] for m in models]
                    anchors[name].grad = torch.stack([anchors[name] - w for w in live]).mean(0)
                    outer[name].step()
                    for w in live:
                        w.copy_(anchors[name])
                for name in unit_buffers[unit]:
                    live = [dict(m.named_buffers())[name] for m in models]
                    mean = torch.stack(live).mean(0)
                    for b in live:
                        b.copy_(mean)
        for opt in optims:
            opt.step()
    return {k: v.clone() for k, v in models[0].state_dict().items()}


def _nesterov_run(rank: int, world: int, schedule: Schedule) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP()
    sync = SyncOptions(mode="delta", outer="nesterov", outer_lr=0.7, outer_momentum=0.9)
    ddp, _ = _run(model, schedule, sync, rank, steps=10, optimizer="adamw")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_outer_nesterov_matches_reference() -> None:
    schedule = random_schedule([u.name for u in sync_units(MLP())], period=3, seed=11)
    ranks = run_workers(_nesterov_run, 2, schedule)
    reference = _reference_nesterov(2, 10, schedule, lr=0.7, mu=0.9)
    plain = _reference_nesterov(2, 10, schedule, lr=1.0, mu=0.5)  # the test can tell outer steps apart
    worst = max(float((torch.as_tensor(ranks[0][k]) - v).abs().max()) for k, v in reference.items())
    apart = max(float((torch.as_tensor(ranks[0][k]) - v).abs().max()) for k, v in plain.items())
    assert worst < 1e-6, worst
    assert apart > 1e-3, apart


def _resume(rank: int, world: int, overlap: str) -> tuple[list, list]:
    torch.manual_seed(0)
    base = MLP()
    names = [u.name for u in sync_units(base)]
    schedule = Schedule(
        period=4,
        assignment={n: [i % 4] for i, n in enumerate(names)},
        overlap=overlap,
        delays={names[0]: 1} if overlap == "forward" else {},
    )
    sync = SyncOptions(mode="delta", outer="nesterov", compress="int8", compress_block=7)

    def steps(ddp, opt, start: int, n: int) -> None:
        for step in range(start, start + n):
            opt.zero_grad(set_to_none=True)
            x, y = make_batch("vector", rank, step)
            loss_of("vector", ddp(x), y).backward()
            opt.step()

    model = copy.deepcopy(base)
    ddp = DreamDDP(model, schedule, overlap=overlap, sync=sync)
    opt = make_optimizer("adamw", model.parameters())
    ddp.register_optimizer(opt)
    steps(ddp, opt, 0, 6)  # mid-period
    saved = copy.deepcopy((ddp.state_dict(), opt.state_dict()))
    steps(ddp, opt, 6, 5)
    ddp.flush()
    straight = [t.clone() for t in model.state_dict().values()]

    model2 = copy.deepcopy(base)
    ddp2 = DreamDDP(model2, schedule, overlap=overlap, sync=sync)
    opt2 = make_optimizer("adamw", model2.parameters())
    ddp2.register_optimizer(opt2)
    ddp2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    steps(ddp2, opt2, 6, 5)
    ddp2.flush()
    resumed = [t.clone() for t in model2.state_dict().values()]
    return straight, resumed


@pytest.mark.parametrize("overlap", ["backward", pytest.param("forward", marks=pytest.mark.slow)])
def test_resume_mid_period_is_bit_exact(overlap: str) -> None:
    for straight, resumed in run_workers(_resume, 2, overlap):
        for a, b in zip(straight, resumed):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def _stats(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = MLP()
    n_float = sum(t.numel() for u in sync_units(model) for t in u.tensors)
    schedule = Schedule.every_step([u.name for u in sync_units(model)])
    out = {"elements": n_float}
    for name, sync in {
        "average": "average",
        "sgd": SyncOptions(mode="delta"),
        "nesterov": SyncOptions(mode="delta", outer="nesterov"),
        "nesterov-int8": SyncOptions(mode="delta", outer="nesterov", compress="int8"),
        "bf16": SyncOptions(mode="delta", compress="bf16"),
    }.items():
        ddp, _ = _run(copy.deepcopy(model), schedule, sync, rank, steps=1)
        out[name] = (ddp.last_stats.sync_state_bytes, ddp.last_stats.bytes_sent)
    return out


@pytest.mark.slow  # five wrappers on two ranks
def test_memory_and_bytes_are_reported() -> None:
    out = run_workers(_stats, 2)[0]
    n = out["elements"]
    assert out["average"] == (0, 4 * n)
    assert out["sgd"] == (4 * n, 4 * n)  # one anchor copy
    assert out["nesterov"][0] == 8 * n  # anchor + momentum
    assert out["nesterov-int8"][0] == 12 * n  # + error-feedback residuals
    assert out["bf16"][1] == 2 * n
    assert out["nesterov-int8"][1] <= 0.27 * 4 * n


# ---------------------------------------------------------------------- pure functions
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    block=st.integers(1, 64),
    scale=st.floats(1e-6, 1e3),
    method=st.sampled_from(["int8", "bf16"]),
    seed=st.integers(0, 2**16),
)
def test_error_feedback_carries_what_was_dropped(n: int, block: int, scale: float, method: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(n, generator=g) * scale
    residual = torch.randn(n, generator=g) * scale * 0.01
    encoded, left = with_feedback(delta, residual, method, block)
    assert left is not None
    sent = decode(encoded)
    # sent + left is what was to be sent: nothing dropped but rounding of the sum itself
    torch.testing.assert_close(sent + left, delta + residual, rtol=0, atol=scale * 1e-6)
    if method == "int8":
        blocks = (delta + residual).abs().reshape(-1)
        assert float(left.abs().max()) <= float(blocks.max()) / 127 / 2 * 1.0001 + 1e-30


def test_int8_round_trip_and_bytes() -> None:
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, -2.0, 0.5, 127.0])
    e = encode(x, "int8", 3)
    assert e.data.dtype == torch.int8 and e.data.numel() == 7 + 3 * 4  # 7 values (no padding sent), 3 fp32 scales
    y = decode(e)
    assert torch.equal(y[:3], torch.zeros(3))  # an all-zero block has scale 0 and decodes to zeros
    torch.testing.assert_close(y, x, atol=2 / 127 / 2 + 1e-6, rtol=0)
    assert allreduce_equivalent_bytes(100, "int8", 2) == 100
    assert allreduce_equivalent_bytes(100, "int8", 4) == 200
    assert allreduce_equivalent_bytes(100, "bf16", 4) == 100


def test_outer_step_is_torch_sgd() -> None:
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(10, generator=g)
    ref = anchor.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    momentum = torch.zeros(10)
    for _ in range(4):
        delta = torch.randn(10, generator=g)
        anchor.sub_(outer_step(delta, momentum, 0.7, 0.9, True))
        ref.grad = delta.clone()
        opt.step()
    torch.testing.assert_close(anchor, ref.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"mode": "delta", "compress": "int4"}, "sync.compress must be one of none, bf16, int8, got 'int4'"),
        ({"mode": "delta", "outer": "adam"}, "sync.outer must be one of sgd, nesterov, got 'adam'"),
        (
            {"mode": "delta", "compress": "int8", "compress_block": 0},
            "sync.compress_block must be an integer >= 1, got 0",
        ),
        ({"mode": "delta", "outer_lr": 0.0}, "sync.outer_lr must be a finite number > 0, got 0.0"),
        ({"mode": "delta", "outer_lr": -1}, "sync.outer_lr must be a finite number > 0, got -1"),
        ({"mode": "delta", "outer_momentum": 1.0}, "sync.outer_momentum must be a number in [0, 1), got 1.0"),
        ({"mode": "delta", "outer": "nesterov", "outer_momentum": 0}, "needs sync.outer_momentum > 0"),
        ({"mode": "diloco"}, "sync.mode must be one of average, delta, got 'diloco'"),
        ({"outer": "nesterov"}, "sync.outer='nesterov' needs sync.mode='delta'"),
    ],
)
def test_bad_sync_options_get_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        SyncOptions(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_int8_refused_beyond_seven_ranks() -> None:
    check_world("int8", 7)
    check_world("bf16", 64)
    with pytest.raises(ValueError, match="across 8 ranks sends more than an fp32 all-reduce"):
        check_world("int8", 8)


def _join(rank: int, world: int) -> str:
    from torch.distributed.algorithms.join import Join

    model = MLP()
    ddp = DreamDDP(model, Schedule.every_step([u.name for u in sync_units(model)]), sync="delta")
    try:
        with Join([ddp]):
            pass
    except ValueError as err:
        return str(err)
    return ""


@pytest.mark.slow  # also the catalogue's row sync-delta-join (tests/test_bad_inputs.py)
def test_join_is_refused_in_one_line() -> None:
    for message in run_workers(_join, 2):
        assert message.startswith("Join([ddp]) with sync='delta' is not supported")


def _delayed_across_relayout(rank: int, world: int) -> float:
    """A delayed unit launched in the first backward lands after the learned launch order moved
    the storage: its anchor must be found through the layout it was launched on."""
    torch.manual_seed(0)
    base = ScrambledMLP()
    names = [u.name for u in sync_units(base)]
    schedule = Schedule(period=3, assignment={n: [0] for n in names}, delays={names[0]: 1}, overlap="forward")
    out = []
    for sync in ("average", "delta"):
        ddp, _ = _run(copy.deepcopy(base), schedule, sync, rank, steps=7, overlap="forward")
        out.append(torch.cat([p.detach().reshape(-1) for p in ddp.module.state_dict().values()]))
    return float((out[0] - out[1]).abs().max())


@pytest.mark.slow
def test_a_delayed_delta_lands_across_a_relayout() -> None:
    assert max(run_workers(_delayed_across_relayout, 2)) < 1e-6

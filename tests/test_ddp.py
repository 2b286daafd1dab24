"""DreamDDP on real gloo ranks: parity with torch DDP and with a reference, and its invariants."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from dreamddp import DreamDDP, Schedule, sync_units

from .dist_utils import run_workers
from .nets import (
    MLP,
    ScrambledMLP,
    TiedLM,
    every_step_beside_ddp,
    loss_of,
    make_batch,
    make_optimizer,
    random_schedule,
    reference_partial_local_sgd,
)

MODELS = {"mlp": MLP, "scrambled": ScrambledMLP, "tied": TiedLM}
KIND = {"mlp": "vector", "scrambled": "vector", "tied": "lm"}


class CountingAllReduce:
    """Counts payload bytes handed to torch.distributed.all_reduce (wraps the real call)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._real = dist.all_reduce

    def __enter__(self) -> CountingAllReduce:
        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._real(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._real


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _unit_problems(ddp: DreamDDP, before: dict, scheduled, step: int) -> list[str]:
    """After a backward: scheduled units identical on every rank, the others untouched by it."""
    problems = []
    for u in ddp.units:
        for t, old in zip(u.tensors, before[u.name]):
            if u.name in scheduled:
                if not all(torch.equal(t, o) for o in _gather(t)):
                    problems.append(f"step {step}: scheduled unit {u.name} differs across ranks")
            elif not torch.equal(t, old):
                problems.append(f"step {step}: unscheduled unit {u.name} was changed by backward")
    return problems


# --------------------------------------------------------------------------- S-SGD parity
def _every_step_vs_ddp(rank: int, world: int, same_data: bool) -> dict:
    torch.manual_seed(0)
    ref, ours = every_step_beside_ddp(MLP(), "vector", rank, 6, same_data)
    diff = max((a - b).abs().max().item() for a, b in zip(ref.module.parameters(), ours.module.parameters()))
    del ref
    dist.barrier()
    return {"max_diff": diff}


def test_every_step_equals_torch_ddp_on_same_data():
    results = run_workers(_every_step_vs_ddp, 2, True)
    assert all(r["max_diff"] <= 1e-6 for r in results), results


@pytest.mark.slow
def test_every_step_differs_from_ddp_on_different_data():
    # Averaging happens before the step, so each gradient is taken at un-averaged weights:
    # with different data per rank the trajectories must part.
    results = run_workers(_every_step_vs_ddp, 2, False)
    assert all(r["max_diff"] > 1e-4 for r in results), results


# ------------------------------------------------------------- per-iteration invariants
def _invariants(rank: int, world: int, model_name: str) -> list[str]:
    torch.manual_seed(rank)  # different init per rank: the wrapper must broadcast rank 0's
    model = MODELS[model_name]()
    kind = KIND[model_name]
    names = [u.name for u in sync_units(model)]
    schedule = random_schedule(names, period=3, seed=7)
    ddp = DreamDDP(model, schedule, bucket_cap_mb=0.0005)  # tiny buckets: many collectives
    for u in ddp.units:
        for t in u.tensors:
            assert all(torch.equal(t, o) for o in _gather(t)), f"{u.name} not broadcast"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    problems = []
    for step in range(7):
        h = step % schedule.period
        opt.zero_grad()
        x, y = make_batch(kind, rank, step)
        loss = loss_of(kind, ddp(x), y)
        before = {u.name: [t.clone() for t in u.tensors] for u in ddp.units}  # after forward's BN update
        with CountingAllReduce() as counter:
            loss.backward()
        scheduled = set(schedule.units_at(h))
        expected_bytes = sum(u.nbytes for u in ddp.units if u.name in scheduled)
        if counter.bytes != expected_bytes or ddp.last_stats.bytes_sent != expected_bytes:
            problems.append(
                f"step {step}: sent {counter.bytes} B, stats {ddp.last_stats.bytes_sent}, expected {expected_bytes}"
            )
        if ddp.iteration != step + 1:
            problems.append(f"step {step}: iteration counter {ddp.iteration}")
        problems += _unit_problems(ddp, before, scheduled, step)
        opt.step()
    return problems


@pytest.mark.parametrize(
    "model_name",
    [pytest.param("mlp", marks=pytest.mark.slow), "scrambled", pytest.param("tied", marks=pytest.mark.slow)],
)
def test_scheduled_units_identical_unscheduled_untouched(model_name):
    results = run_workers(_invariants, 2, model_name)
    assert results == [[], []], results


# ------------------------------------------------------------- switching schedules live
def _switch_schedules(rank: int, world: int) -> dict:
    """Train on one schedule, switch every rank to another at the same iteration, train on."""
    torch.manual_seed(rank)
    model = MLP()
    names = [u.name for u in sync_units(model)]
    first = random_schedule(names, period=3, seed=7)
    second = Schedule(period=2, assignment={n: [0] if n in ("fc1", "head") else [1] for n in names})
    ddp = DreamDDP(model, first, bucket_cap_mb=0.0005)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    problems, followed = [], []
    for step in range(9):
        if step == 5:  # phase 2 of the first schedule; a new period length starts its period here
            ddp.set_schedule(second)
        schedule = first if step < 5 else second
        h = step % 3 if step < 5 else (step - 5) % 2
        opt.zero_grad()
        x, y = make_batch("vector", rank, step)
        loss = loss_of("vector", ddp(x), y)
        before = {u.name: [t.clone() for t in u.tensors] for u in ddp.units}
        with CountingAllReduce() as counter:
            loss.backward()
        scheduled = set(schedule.units_at(h))
        expected_bytes = sum(u.nbytes for u in ddp.units if u.name in scheduled)
        followed.append((ddp.last_stats.phase, ddp.last_stats.units))
        if counter.bytes != expected_bytes or ddp.last_stats.bytes_sent != expected_bytes:
            problems.append(f"step {step}: sent {counter.bytes} B, expected {expected_bytes}")
        problems += _unit_problems(ddp, before, scheduled, step)
        opt.step()
    return {"problems": problems, "followed": followed, "schedule_is_second": ddp.schedule is second}


def test_set_schedule_between_iterations_switches_what_is_sent():
    names = [u.name for u in sync_units(MLP())]
    first = random_schedule(names, period=3, seed=7)
    expected = [(h % 3, first.units_at(h % 3)) for h in range(5)]
    # A schedule of another period starts at its phase 0 where it is switched in (step 5), not at step % 2.
    expected += [((h - 5) % 2, ["fc1", "head"] if (h - 5) % 2 == 0 else ["bn", "fc2"]) for h in range(5, 9)]
    for r in run_workers(_switch_schedules, 2):
        assert r["problems"] == [], r["problems"]
        assert r["followed"] == expected, r["followed"]
        assert r["schedule_is_second"]


# ------------------------------------------------------------------ reference parity
def _train_schedules(rank: int, world: int, model_name: str, jobs: list[tuple[Schedule, str]], steps: int) -> list:
    kind = KIND[model_name]
    finals = []
    for schedule, optimizer in jobs:
        torch.manual_seed(0)
        model = MODELS[model_name]()
        ddp = DreamDDP(model, schedule)
        opt = make_optimizer(optimizer, model.parameters())
        for step in range(steps):
            opt.zero_grad()
            x, y = make_batch(kind, rank, step)
            loss_of(kind, ddp(x), y).backward()
            opt.step()
        finals.append({k: v.clone() for k, v in model.state_dict().items()})
    return finals


def _jobs(model_name: str, period: int) -> list[tuple[Schedule, str]]:
    units = sync_units(MODELS[model_name]())
    names = [u.name for u in units]
    schedules = [
        Schedule.local_sgd(names, period),
        Schedule.plsgd(units, period),
        random_schedule(names, period, seed=3),
    ]
    return [(s, o) for s in schedules for o in ("momentum", "adamw")]


@pytest.mark.parametrize(
    "world,model_name",
    [(2, "mlp"), pytest.param(4, "mlp", marks=pytest.mark.slow), pytest.param(2, "tied", marks=pytest.mark.slow)],
)
def test_parity_with_reference(world, model_name):
    steps, period = 7, 3
    jobs = _jobs(model_name, period)
    results = run_workers(_train_schedules, world, model_name, jobs, steps, timeout=240)
    for j, (schedule, optimizer) in enumerate(jobs):
        reference = reference_partial_local_sgd(MODELS[model_name], schedule, world, steps, optimizer, KIND[model_name])
        for rank in range(world):
            for key, expected in reference[rank].items():
                got = results[rank][j][key]
                np.testing.assert_allclose(
                    got,
                    expected.numpy(),
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{schedule.metadata.get('method', 'random')} + {optimizer}, rank {rank}, {key}",
                )


# -------------------------------------------------------------- tied weights, buffers
def _tied_and_bn(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    lm = TiedLM()
    units = sync_units(lm)
    tied_owners = [u.name for u in units if any(p is lm.embed.weight for p in u.params)]
    schedule = Schedule(period=2, assignment={"embed": [1], "mix": [0]})
    ddp = DreamDDP(lm, schedule)
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    sent = []
    for step in range(4):
        opt.zero_grad()
        x, y = make_batch("lm", rank, step)
        with CountingAllReduce() as c:
            loss_of("lm", ddp(x), y).backward()
        sent.append(c.bytes)
        opt.step()
    torch.manual_seed(0)
    mlp = MLP()
    names = [u.name for u in sync_units(mlp)]
    schedule = Schedule(period=2, assignment={n: [1] if n == "bn" else [0] for n in names})
    ddp = DreamDDP(mlp, schedule)
    bn_equal = []
    for step in range(2):
        x, y = make_batch("vector", rank, step)
        loss_of("vector", ddp(x), y).backward()
        bn_equal.append(all(torch.equal(mlp.bn.running_mean, o) for o in _gather(mlp.bn.running_mean)))
    return {
        "tied_owners": tied_owners,
        "n_params": len(list(lm.parameters())),
        "sent": sent,
        "embed_bytes": lm.embed.weight.numel() * 4,
        "mix_bytes": sum(p.numel() * 4 for p in lm.mix.parameters()),
        "bn_equal": bn_equal,
    }


def test_tied_weights_once_per_period_and_batchnorm_buffers_with_their_unit():
    for r in run_workers(_tied_and_bn, 2):
        assert r["tied_owners"] == ["embed"]
        # One period = steps 0 and 1: the tied weight crosses the wire exactly once.
        assert r["sent"] == [r["mix_bytes"], r["embed_bytes"]] * 2
        # Step 0 syncs fc1/fc2/head but not bn (different data -> different statistics);
        # step 1 syncs bn, running statistics included.
        assert r["bn_equal"] == [False, True]


# -------------------------------------------------------- no_sync, resume, average_all
def _no_sync_and_resume(rank: int, world: int) -> dict:
    names = [u.name for u in sync_units(MLP())]
    schedule = random_schedule(names, period=4, seed=11)

    def fresh():
        torch.manual_seed(0)
        model = MLP()
        ddp = DreamDDP(model, schedule)
        return model, ddp, make_optimizer("adamw", model.parameters())

    def train(ddp, opt, steps, micro=2):
        for step in steps:
            opt.zero_grad()
            for m in range(micro - 1):
                with ddp.no_sync():
                    x, y = make_batch("vector", rank, 100 * step + m)
                    with CountingAllReduce() as c:
                        loss_of("vector", ddp(x), y).backward()
                    assert c.bytes == 0, f"no_sync micro-step sent {c.bytes} bytes"
            x, y = make_batch("vector", rank, step)
            loss_of("vector", ddp(x), y).backward()
            opt.step()

    model_a, ddp_a, opt_a = fresh()
    train(ddp_a, opt_a, range(10))
    model_b, ddp_b, opt_b = fresh()
    train(ddp_b, opt_b, range(6))
    iteration_at_save = ddp_b.iteration
    saved = copy.deepcopy((ddp_b.state_dict(), opt_b.state_dict()))
    del model_b, ddp_b, opt_b
    model_c, ddp_c, opt_c = fresh()
    ddp_c.load_state_dict(saved[0])
    opt_c.load_state_dict(saved[1])
    train(ddp_c, opt_c, range(6, 10))
    identical = all(torch.equal(a, c) for a, c in zip(model_a.state_dict().values(), model_c.state_dict().values()))
    ddp_a.average_all()
    averaged = all(torch.equal(t, o) for u in ddp_a.units for t in u.tensors for o in _gather(t))
    return {
        "iteration_at_save": iteration_at_save,
        "final_iteration": ddp_c.iteration,
        "identical": identical,
        "averaged": averaged,
        "state_keys": sorted(k for k in saved[0] if not k.startswith("module.")),
    }


def test_no_sync_state_dict_resume_and_average_all():
    for r in run_workers(_no_sync_and_resume, 2):
        assert r["iteration_at_save"] == 6  # micro-steps under no_sync do not count
        assert r["final_iteration"] == 10
        assert r["identical"], "resumed run differs from the uninterrupted one"
        assert r["averaged"]
        assert r["state_keys"] == ["_extra_state"]


# ------------------------------------------------------- unused parameters still averaged
class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 4)
        self.unused = nn.Linear(8, 4)

    def forward(self, x):
        return self.used(x)


def _unused(rank: int, world: int) -> bool:
    torch.manual_seed(0)
    model = WithUnused()
    ddp = DreamDDP(model, Schedule(period=1, assignment={"used": [0], "unused": [0]}))
    with torch.no_grad():
        model.unused.weight.add_(rank)  # drift, as local steps would cause
    x, y = make_batch("vector", rank, 0)
    loss_of("vector", ddp(x), y).backward()
    return all(torch.equal(model.unused.weight, o) for o in _gather(model.unused.weight))


def test_units_whose_hooks_never_fire_are_averaged_at_end_of_backward():
    assert run_workers(_unused, 2) == [True, True]


# ----------------------------------------------------------------------- bad input
def _bad_construction(rank: int, world: int, case: str) -> str:
    torch.manual_seed(0)
    model = MLP()
    names = [u.name for u in sync_units(model)]
    schedule = Schedule.local_sgd(names, 2)
    if case == "shape" and rank == 1:
        model.fc2 = nn.Linear(16, 17)
        model.head = nn.Linear(17, 4)
    elif case == "extra_unit" and rank == 1:
        model.extra = nn.Linear(2, 2)
    elif case == "schedule_one_rank" and rank == 1:
        schedule = Schedule(period=2, assignment={n: [0] for n in names if n != "bn"})
    elif case == "schedule_differs" and rank == 1:
        schedule = Schedule.local_sgd(names, 3)
    elif case == "unknown_unit":
        schedule = Schedule(period=2, assignment={**{n: [0] for n in names}, "ghost": [1]})
    try:
        DreamDDP(model, schedule)
    except ValueError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize(
    "case,messages",
    [
        (
            "shape",
            [
                "models differ across ranks: unit 'fc2' is fc2.weight[17, 16]:float32, fc2.bias[17]:float32 on rank 1 but fc2.weight[16, 16]:float32, fc2.bias[16]:float32 on rank 0"
            ]
            * 2,
        ),
        pytest.param(
            "extra_unit",
            ["models differ across ranks: rank 1 has unit 'extra' that rank 0 lacks"] * 2,
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "schedule_one_rank",
            [
                "rank 1: schedule misses unit 'bn': every unit must be averaged at least once per period (1 missing in all)",
                "schedule misses unit 'bn': every unit must be averaged at least once per period (1 missing in all)",
            ],
            marks=pytest.mark.slow,
        ),
        (
            "schedule_differs",
            [
                "schedules differ across ranks: rank 1 has period 3 and 4 syncs, rank 0 period 2 and 4 syncs; give every rank the same schedule"
            ]
            * 2,
        ),
        pytest.param(
            "unknown_unit",
            ["schedule names unit 'ghost', which the model does not have (1 unknown in all)"] * 2,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_construction_fails_every_rank_with_one_line(case, messages):
    assert run_workers(_bad_construction, 2, case, timeout=60) == messages


def test_bad_arguments_fail_before_any_collective():
    with pytest.raises(ValueError, match=r"bucket_cap_mb must be a number > 0, got 0"):
        DreamDDP(MLP(), Schedule.every_step(["fc1"]), bucket_cap_mb=0)
    with pytest.raises(TypeError, match="schedule must be a dreamddp.Schedule"):
        DreamDDP(MLP(), {"fc1": [0]})
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        DreamDDP(MLP(), Schedule.every_step(["fc1"]))


# ------------------------------------------------------------ in place, no extra memory
def _in_place(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = MLP()
    units = sync_units(model)
    ddp = DreamDDP(model, Schedule.plsgd(units, 2))
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages |= {b.untyped_storage().data_ptr() for n, b in model.named_buffers() if b.is_floating_point()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    real_cat, cats, buckets = torch.cat, [], []

    def counting_cat(*args, **kwargs):
        cats.append(1)
        return real_cat(*args, **kwargs)

    for step in range(4):
        opt.zero_grad()
        x, y = make_batch("vector", rank, step)
        loss = loss_of("vector", ddp(x), y)
        torch.cat = counting_cat
        try:
            loss.backward()
        finally:
            torch.cat = real_cat
        buckets.append(ddp.last_stats.buckets)
        opt.step()
    # Anything that moves the storage (here: a dtype change) is noticed and laid out again.
    model.double()
    ddp(make_batch("vector", rank, 9)[0].double()).sum().backward()
    relaid = {p.untyped_storage().data_ptr() for p in model.parameters()}
    synced = all(
        torch.equal(t, o) for u in ddp.units if u.name in ddp.last_stats.units for t in u.tensors for o in _gather(t)
    )
    try:
        model.load_state_dict(copy.deepcopy(model.state_dict()), assign=True)
        ddp(make_batch("vector", rank, 9)[0].double())
        replaced = "no error"
    except RuntimeError as err:
        replaced = str(err)
    return {
        "storages": len(storages),
        "cats": len(cats),
        "buckets": buckets,
        "relaid": len(relaid),
        "dtype": str(model.fc1.weight.dtype),
        "synced_after_relayout": synced,
        "replaced": replaced,
    }


def test_averaging_is_in_place_on_one_flat_storage():
    for r in run_workers(_in_place, 2):
        assert r["storages"] == 1  # every parameter and float buffer is a view of one buffer
        assert r["cats"] == 0  # no coalescing copies during backward
        assert r["buckets"] == [1, 1, 1, 1]  # a contiguous group is one in-place all-reduce
        assert r["relaid"] == 1 and r["dtype"] == "torch.float64" and r["synced_after_relayout"]
        assert r["replaced"].startswith("parameter 'head.weight' was replaced by a new object")

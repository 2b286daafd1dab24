"""DreamDDP inside a DeepSpeed engine: real gloo ranks, DeepSpeed's CPU accelerator.

The wrapped engine must train exactly like the plain ``DreamDDP`` wrapper (same model, data,
schedule, optimizer, clipping), issue exactly the same collectives — DeepSpeed adding none, its
gradient all-reduce in particular — sync once per accumulation boundary, refuse what cannot
work, and resume mid-period from its own checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported, here and in every rank
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'dreamddp[deepspeed]')")

import torch
import torch.distributed as dist
from torch import nn

from dreamddp import DreamDDP, Schedule, sync_units
from dreamddp.integrations import deepspeed as ds_dreamddp

from .dist_utils import run_workers
from .nets import MLP, loss_of, make_batch, random_schedule

# A cold machine compiles DeepSpeed's CPU communication op once (about a minute on 2 cores;
# `make setup` does it ahead); later runs load it from the cache in well under a second.
TIMEOUT = 240.0
CLIP = 0.05  # small enough to bind, so clipping by the local or the averaged norm would differ

_COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "all_gather_object",
    "broadcast_object_list",
    "send",
    "recv",
    "isend",
    "irecv",
)
_PAYLOAD_IS_SECOND = ("all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor")


class Collectives:
    """Records every torch.distributed collective issued while active: (name, dtype, bytes).

    DeepSpeed's communication layer and DreamDDP both call these functions at call time, so
    patching the module attributes sees both (the control run below proves it for DeepSpeed).
    """

    def __enter__(self) -> Collectives:
        self.calls: list[tuple[str, str, int]] = []
        self._real = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}
        for name, real in self._real.items():
            setattr(dist, name, self._counted(name, real))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, real in self._real.items():
            setattr(dist, name, real)

    def _counted(self, name, real):
        def counted(*args, **kwargs):
            payload = kwargs.get("tensor", kwargs.get("input_tensor"))
            if payload is None and args:
                payload = args[1] if name in _PAYLOAD_IS_SECOND and len(args) > 1 else args[0]
            tensors = payload if isinstance(payload, (list, tuple)) else [payload]
            tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
            dtype = str(tensors[0].dtype) if tensors else "object"
            self.calls.append((name, dtype, sum(t.numel() * t.element_size() for t in tensors)))
            return real(*args, **kwargs)

        return counted

    def bytes(self, name: str = "all_reduce") -> int:
        return sum(b for n, _, b in self.calls if n == name)


def _rank_env(rank: int, world: int) -> None:
    # What the deepspeed launcher and torchrun export; deepspeed.initialize requires LOCAL_RANK.
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))


def _config(**extra) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 6,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "gradient_clipping": CLIP,
    }
    cfg.update(extra)
    return cfg


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _scheduled_bytes(model: nn.Module, schedule: Schedule, iterations: range) -> int:
    units = sync_units(model)
    return sum(u.nbytes for t in iterations for u in units if u.name in schedule.units_at(t % schedule.period))


# ------------------------------------------------------------------------------ parity
VARIANTS = {
    # name: (parameter dtype, DeepSpeed "optimizer" section or None for a client torch optimizer,
    #        further DeepSpeed config)
    "torch-sgd-momentum": (torch.float32, None, {}),
    "deepspeed-fused-adamw": (torch.float32, {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}}, {}),
    "bf16-params": (torch.bfloat16, None, {}),
    "bf16-autocast": (torch.float32, None, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}),
}
STEPS = 7


def _optimizer(variant: str, params):
    if variant == "deepspeed-fused-adamw":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, lr=0.01, weight_decay=0.01, adam_w_mode=True)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _batch(rank: int, step: int, dtype: torch.dtype):
    x, y = make_batch("vector", rank, step)  # different data on every rank
    return x.to(dtype), y


def _parity(rank: int, world: int, variant: str) -> dict:
    _rank_env(rank, world)
    dtype, ds_optimizer, extra = VARIANTS[variant]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled="torch_autocast" in extra)
    torch.manual_seed(0)
    base = MLP().to(dtype)
    schedule = random_schedule([u.name for u in sync_units(base)], period=3, seed=5)

    # The reference: the plain wrapper, the trainer's local clipping.
    ref_model = copy.deepcopy(base)
    ref = DreamDDP(ref_model, schedule)
    ref_opt = _optimizer(variant, ref_model.parameters())
    with Collectives() as ref_calls:
        for step in range(STEPS):
            x, y = _batch(rank, step, dtype)
            ref_opt.zero_grad()
            with autocast:
                out = ref(x)
            loss_of("vector", out.float(), y).backward()
            nn.utils.clip_grad_norm_(ref_model.parameters(), CLIP)
            ref_opt.step()

    model = copy.deepcopy(base)
    if ds_optimizer is None:
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=_optimizer(variant, model.parameters()), config=_config(**extra)
        )
    else:
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=_config(optimizer=ds_optimizer, **extra)
        )
    engine = ds_dreamddp.wrap(engine, schedule)
    with Collectives() as ds_calls:
        for step in range(STEPS):
            x, y = _batch(rank, step, dtype)
            engine.backward(loss_of("vector", engine(x).float(), y))
            engine.step()

    out = {
        "diff": _max_diff(_state(ref_model), _state(engine.module)),
        "optimizer": type(engine.optimizer).__name__,
        "param_dtype": str(next(engine.module.parameters()).dtype),
        "autocast_dtype": str(engine(_batch(rank, 0, dtype)[0]).dtype),
        "ds_calls": ds_calls.calls,
        "ref_calls": ref_calls.calls,
        "ds_all_reduce_bytes": ds_calls.bytes(),
        "expected_bytes": _scheduled_bytes(base, schedule, range(STEPS)),
        "reported_bytes": engine.dreamddp.total_bytes_sent,
        "iteration": engine.dreamddp.iteration,
    }
    if variant == "torch-sgd-momentum":
        # Control: the same counter sees plain DeepSpeed all-reduce every gradient.
        plain_model = copy.deepcopy(base)
        plain, *_ = deepspeed.initialize(
            model=plain_model, optimizer=_optimizer(variant, plain_model.parameters()), config=_config()
        )
        with Collectives() as plain_calls:
            x, y = _batch(rank, 0, dtype)
            plain.backward(loss_of("vector", plain(x).float(), y))
            plain.step()
        out["control_all_reduce_bytes"] = plain_calls.bytes()
        out["grad_bytes"] = sum(p.numel() * p.element_size() for p in plain_model.parameters())
    return out


@pytest.mark.parametrize(
    "variant",
    [pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS],  # 45 s each; the fast tier keeps the others
)
def test_wrapped_engine_trains_like_dreamddp_and_sends_only_parameter_averages(variant):
    results = run_workers(_parity, 2, variant, timeout=TIMEOUT)
    for rank, r in enumerate(results):
        assert r["diff"] <= 1e-6, (rank, r["diff"])
        assert r["iteration"] == STEPS
        # Only the scheduled units' parameters and buffers are all-reduced, nothing else is sent:
        # the engine issues exactly the collectives the plain wrapper issues.
        assert r["ds_all_reduce_bytes"] == r["expected_bytes"] == r["reported_bytes"] > 0, r
        assert r["ds_calls"] == r["ref_calls"], (r["ds_calls"], r["ref_calls"])
    if variant == "deepspeed-fused-adamw":
        assert results[0]["optimizer"] == "FusedAdam"  # DeepSpeed's own optimizer, built from the config
    if variant == "bf16-params":
        assert results[0]["param_dtype"] == "torch.bfloat16"
    if variant == "bf16-autocast":  # fp32 weights, bf16 compute
        assert (results[0]["param_dtype"], results[0]["autocast_dtype"]) == ("torch.float32", "torch.bfloat16")
    if variant == "torch-sgd-momentum":
        assert results[0]["control_all_reduce_bytes"] >= results[0]["grad_bytes"] > 0, results[0]


# ------------------------------------------------------------------ gradient accumulation
GAS = 4


def _accumulation(rank: int, world: int) -> dict:
    _rank_env(rank, world)
    torch.manual_seed(0)
    base = MLP()
    schedule = Schedule.plsgd(sync_units(base), period=2)

    ref_model = copy.deepcopy(base)
    ref = DreamDDP(ref_model, schedule)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    for step in range(2):
        for micro in range(GAS):
            x, y = make_batch("vector", rank, step * GAS + micro)
            sync = ref.no_sync() if micro < GAS - 1 else contextlib.nullcontext()
            with sync:
                (loss_of("vector", ref(x), y) / GAS).backward()
        nn.utils.clip_grad_norm_(ref_model.parameters(), CLIP)
        ref_opt.step()
        ref_opt.zero_grad()

    model = copy.deepcopy(base)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        config=_config(gradient_accumulation_steps=GAS),
    )
    ds_dreamddp.wrap(engine, schedule)
    sent, counters = [], []
    for micro_step in range(2 * GAS):
        x, y = make_batch("vector", rank, micro_step)
        loss = loss_of("vector", engine(x), y)
        with Collectives() as calls:
            engine.backward(loss)
        sent.append(calls.bytes())
        counters.append(engine.dreamddp.iteration)
        engine.step()
    diff = _max_diff(_state(ref_model), _state(engine.module))
    with Collectives() as calls, engine.no_sync():  # DeepSpeed's own accumulation switch: nothing sent
        engine.backward(loss_of("vector", engine(x), y))
    return {
        "sent": sent,
        "counters": counters,
        "diff": diff,
        "no_sync_bytes": calls.bytes(),
        "after_no_sync": engine.dreamddp.iteration,
        "expected": [_scheduled_bytes(base, schedule, range(h, h + 1)) for h in range(2)],
    }


@pytest.mark.slow  # kept out of the fast tier's 6 minutes; the mid-period resume test keeps DeepSpeed there
def test_gradient_accumulation_syncs_once_per_boundary():
    results = run_workers(_accumulation, 2, timeout=TIMEOUT)
    for r in results:
        h0, h1 = r["expected"]
        assert h0 > 0 and h1 > 0
        # 4 micro-steps per optimizer step: only the boundary backward sends, and counts.
        assert r["sent"] == [0, 0, 0, h0, 0, 0, 0, h1], r
        assert r["counters"] == [0, 0, 0, 1, 1, 1, 1, 2], r
        assert r["diff"] <= 1e-6, r
        assert r["no_sync_bytes"] == 0 and r["after_no_sync"] == 2, r


# ------------------------------------------------------------ refusals and the config section
REFUSED = {
    "zero-1": ({"zero_optimization": {"stage": 1}}, "ZeRO stage 1: it partitions the optimizer state"),
    "zero-2": ({"zero_optimization": {"stage": 2}}, "ZeRO stage 2: it partitions gradients"),
    "zero-3": ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3: it partitions the parameters"),
    "bf16-master-weights": ({"bf16": {"enabled": True}}, "keeps fp32 master weights"),
}


def _refusals_and_section(rank: int, world: int, tmp: str) -> dict:
    _rank_env(rank, world)
    out: dict = {}
    for name, (extra, _) in REFUSED.items():
        torch.manual_seed(0)
        model = MLP()
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            config=_config(zero_allow_untested_optimizer=True, **extra),
        )
        try:
            ds_dreamddp.wrap(engine, 2)
            out[name] = "accepted"
        except ValueError as err:
            out[name] = str(err)
        out[name + ":untouched"] = engine.enable_backward_allreduce and "dreamddp" not in engine.__dict__

    # The config section: a schedule file next to the config, read relative to it.
    model = MLP()
    schedule = random_schedule([u.name for u in sync_units(model)], period=3, seed=1)
    schedule.to_json(os.path.join(tmp, "plan.json"))
    config_path = os.path.join(tmp, "ds.json")
    with open(config_path, "w") as f:
        json.dump(_config(dreamddp={"schedule": "plan.json", "bucket_cap_mb": 1}), f)
    engine, optimizer, _, _ = ds_dreamddp.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config_path
    )
    out["section_schedule"] = engine.dreamddp.schedule == schedule
    out["section_allreduce_off"] = engine.enable_backward_allreduce is False and optimizer is engine.optimizer
    for name, section in {
        "unknown-key": {"period": 2, "perriod": 3},
        "period-mismatch": {"period": 2, "schedule": os.path.join(tmp, "plan.json")},
        "hierarchy": {"period": 2, "hierarchy": "auto"},
    }.items():
        try:
            ds_dreamddp.initialize(
                model=MLP(), optimizer=torch.optim.SGD(MLP().parameters(), lr=0.1), config=_config(dreamddp=section)
            )
            out[name] = "accepted"
        except ValueError as err:
            out[name] = str(err)
    try:
        ds_dreamddp.wrap(engine, 2)
        out["twice"] = "accepted"
    except ValueError as err:
        out["twice"] = str(err)
    return out


@pytest.mark.slow
def test_unsupported_configs_are_refused_and_the_config_section_works(tmp_path):
    (r,) = run_workers(_refusals_and_section, 1, str(tmp_path), timeout=TIMEOUT)
    for name, (_, why) in REFUSED.items():
        assert why in r[name] and "\n" not in r[name], (name, r[name])
        if name.startswith("zero"):
            assert r[name].endswith("use ZeRO stage 0 (zero_optimization.stage=0)"), r[name]
        assert r[name + ":untouched"], name  # a refused engine is left as DeepSpeed built it
    assert r["section_schedule"] and r["section_allreduce_off"], r
    assert "unknown key 'perriod'" in r["unknown-key"], r["unknown-key"]
    assert "period 2 differs from the period 3" in r["period-mismatch"], r["period-mismatch"]
    assert "hierarchy 'auto' is not supported by the DeepSpeed adapter yet" in r["hierarchy"], r["hierarchy"]
    assert "already wrapped" in r["twice"], r["twice"]


# ------------------------------------------------------------------------------ checkpoints
PERIOD, SAVED_AT, MORE = 4, 6, 4  # saved at iteration 6: h = 2, in the middle of a period


def _train(engine, rank: int, steps: range) -> None:
    for step in steps:
        x, y = make_batch("vector", rank, step)
        engine.backward(loss_of("vector", engine(x), y))
        engine.step()


def _resume(rank: int, world: int, ckpt: str) -> dict:
    _rank_env(rank, world)
    torch.manual_seed(0)
    model = MLP()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), config=_config()
    )
    ds_dreamddp.wrap(engine, PERIOD)
    _train(engine, rank, range(SAVED_AT))
    at_save = _state(engine.module)
    others = [None] * world
    dist.all_gather_object(others, at_save)
    engine.save_checkpoint(ckpt, tag="mid", client_state={"epoch": 3})
    _train(engine, rank, range(SAVED_AT, SAVED_AT + MORE))
    uninterrupted = _state(engine.module)

    # A fresh job: other initial weights, the config section instead of wrap(), then resume.
    torch.manual_seed(1234)
    model = MLP()
    engine, *_ = ds_dreamddp.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        config=_config(dreamddp={"period": PERIOD}),
    )
    path, client = engine.load_checkpoint(ckpt)
    counter = engine.dreamddp.iteration
    _train(engine, rank, range(SAVED_AT, SAVED_AT + MORE))
    client = {k: v for k, v in client.items() if isinstance(v, (int, str))}  # DeepSpeed adds its own metadata
    files = sorted(os.listdir(os.path.join(ckpt, "mid")))
    diff = _max_diff(uninterrupted, _state(engine.module))
    # A rank whose own state file is gone: every rank refuses in one line (none is left waiting).
    dist.barrier()
    if rank == 1:
        os.remove(os.path.join(ckpt, "mid", "dreamddp-rank-00001.pt"))
    dist.barrier()
    try:
        engine.load_checkpoint(ckpt, tag="mid")
        missing = ""
    except ValueError as err:
        missing = str(err)
    return {
        "missing": missing,
        "ranks_differed_at_save": _max_diff(others[0], others[1]),
        "path": path,
        "client": client,
        "counter": counter,
        "diff": diff,
        "files": files,
    }


def test_checkpoint_resumes_mid_period_with_every_ranks_local_state(tmp_path):
    results = run_workers(_resume, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT)
    for r in results:
        assert r["ranks_differed_at_save"] > 1e-4  # local SGD: rank 0's copy alone would not resume rank 1
        assert r["path"] is not None and r["client"]["epoch"] == 3, r  # the user's client state, as saved ...
        assert ds_dreamddp.CLIENT_STATE_KEY not in r["client"]  # ... without the counter DreamDDP took out
        assert r["counter"] == SAVED_AT
        assert r["diff"] == 0.0, r["diff"]  # bit for bit the run that was never interrupted
        assert {"dreamddp-rank-00000.pt", "dreamddp-rank-00001.pt"} <= set(r["files"]), r["files"]
        assert "has no DreamDDP state for rank(s) 1 (dreamddp-rank-00001.pt)" in r["missing"], r["missing"]


# ---------------------------------------------------------------------------- launch example
# The engine's own tests (accumulation, checkpoint) keep DeepSpeed in the fast tier; the launch examples take a minute.
@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_launch_example_trains(tmp_path, launcher):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHON=sys.executable, NPROC="2", LAUNCHER=launcher, DS_ACCELERATOR="cpu")
    proc = subprocess.run(
        ["bash", str(root / "launch/deepspeed/run.sh"), "--steps", "2", "--save-dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line.get("dreamddp_iteration") for line in lines[:2]] == [1, 2], lines
    assert lines[-1]["done"] == 2 and all(line.get("bytes_sent", 1) > 0 for line in lines), lines
    assert (tmp_path / "global_step2" / "dreamddp-rank-00001.pt").exists()

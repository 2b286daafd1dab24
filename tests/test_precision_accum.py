"""bf16 autocast and gradient accumulation, for every algorithm, against fp32 and k = 1.

Each rank runs the trainer's own iteration (``IterationRunner``) on the tiny GPT for a few
steps. Accumulating k micro-batches of batch/k is the same step as one batch of the whole
(up to float rounding: the sum is taken in another order), for every algorithm, and it does
not communicate more: the micro-steps before the last run under the strategy's ``no_sync``.
bf16 runs forward and loss in bfloat16 while parameters, gradients and averages stay fp32.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dreamddp.training.config import ALGORITHMS, ExperimentConfig, load_config
from dreamddp.training.data import build_data
from dreamddp.training.iteration import IterationRunner
from dreamddp.training.loss import loss_for_task
from dreamddp.training.models import build_model
from dreamddp.training.schedules import resolve_schedule
from dreamddp.training.strategies import build_strategy

from .dist_utils import run_workers

TINY = [
    'model.name="gpt"',
    "model.vocab_size=256",
    "model.block_size=16",
    "model.n_layer=2",
    "model.n_head=2",
    "model.d_model=32",
    'data.name="synthetic"',
    "data.batch_size=4",
    "data.seq_len=16",
    "train.period=2",
    "train.post_local_warmup=1",
]
# hier_local_sgd needs sites of several ranks (4 ranks at least): test_resume and test_hierarchy run it.
ALGOS = [a for a in ALGORITHMS if a not in ("none", "hier_local_sgd")]
STEPS = 4


def _run(cfg: ExperimentConfig, rank: int, world: int) -> dict:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model_name, cfg.model_options)
    strategy = build_strategy(model, cfg.train, None, resolve_schedule(cfg, model, world))
    data = build_data(
        cfg.data.name,
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        vocab_size=256,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
    )
    runner = IterationRunner(
        strategy,
        data,
        loss_for_task("lm"),
        None,
        torch.device("cpu"),
        grad_accum=cfg.train.grad_accum,
        precision=cfg.train.precision,
    )
    ddp_calls = [0]  # torch DDP's bucket all-reduces, counted by a comm hook (ssgd only)
    if cfg.train.algorithm == "ssgd":

        def counting(state, bucket):
            ddp_calls[0] += 1
            return allreduce_hook(state, bucket)

        strategy.model.register_comm_hook(None, counting)
    losses, sent = [], 0
    for step in range(STEPS):
        result = runner.run(step)
        losses.append(result.loss)
        sent += result.comm.bytes_sent or 0
    strategy.finish()
    params = {n: p.detach().clone() for n, p in strategy.raw_model.named_parameters()}
    dtypes = {str(p.dtype) for p in params.values()}
    strategy.close()
    dist.barrier()
    return {"losses": losses, "params": params, "sent": sent, "dtypes": dtypes, "ddp_calls": ddp_calls[0]}


def _variants(rank: int, world: int) -> dict:
    out = {}
    for algorithm in ALGOS:
        base = load_config(None, [*TINY, f'train.algorithm="{algorithm}"'])
        for name, changes in (("plain", {}), ("accum", {"grad_accum": 2}), ("bf16", {"precision": "bf16"})):
            cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **changes))
            out[algorithm, name] = _run(cfg, rank, world)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_workers(_variants, 2, timeout=240)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ALGOS)
def test_accumulation_is_the_same_step_and_sends_the_same_bytes(results, algorithm):
    for rank_out in results:
        plain, accum = rank_out[algorithm, "plain"], rank_out[algorithm, "accum"]
        assert accum["losses"] == pytest.approx(plain["losses"], rel=1e-4, abs=1e-5)
        for name, tensor in plain["params"].items():
            torch.testing.assert_close(accum["params"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        assert accum["sent"] == plain["sent"], (accum["sent"], plain["sent"])  # no_sync on the first micro-step
        assert accum["ddp_calls"] == plain["ddp_calls"], (accum["ddp_calls"], plain["ddp_calls"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algorithm", ALGOS)
def test_bf16_computes_in_bf16_and_keeps_fp32_parameters(results, algorithm):
    for rank_out in results:
        plain, bf16 = rank_out[algorithm, "plain"], rank_out[algorithm, "bf16"]
        assert bf16["dtypes"] == {"torch.float32"}
        assert bf16["losses"] != plain["losses"]  # autocast really ran in bf16
        assert bf16["losses"] == pytest.approx(plain["losses"], rel=0.02)
        assert bf16["sent"] == plain["sent"]  # fp32 averages: the same bytes
    # the replicas still agree where the algorithm says they must (ssgd: every step)
    if algorithm == "ssgd":
        for name, tensor in results[0][algorithm, "bf16"]["params"].items():
            assert np.array_equal(tensor, results[1][algorithm, "bf16"]["params"][name]), name

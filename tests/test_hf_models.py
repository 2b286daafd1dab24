"""Hugging Face models (``model.name = "hf"``): DreamDDP parity, sync units, the trainer, bad input.

Skipped without the hf extra (``pip install 'dreamddp[hf]'``); ``make setup`` installs it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("transformers")

from dreamddp import DreamDDP, Schedule, sync_units
from dreamddp.training.config import load_config
from dreamddp.training.models import build_model, model_config, model_task
from dreamddp.training.models.hf import PRESETS, HFCausalLM

from .dist_utils import run_workers
from .nets import (
    every_step_beside_ddp,
    make_optimizer,
    random_schedule,
    reference_partial_local_sgd,
    train_steps,
)

REPO = Path(__file__).parents[1]
TINY = {"gpt2": {"preset": "gpt2-tiny"}, "llama": {"preset": "llama-tiny"}}
STEPS, PERIOD = 5, 3


def _build(options: dict) -> nn.Module:
    return build_model("hf", dict(options))


def _jobs(options: dict) -> list[tuple[Schedule, str]]:
    units = sync_units(_build(options))
    names = [u.name for u in units]
    # Not AdamW: GPT-2's key bias has a gradient that is zero up to rounding (softmax ignores a shift),
    # and Adam scales that rounding noise to full-size steps, so two exact runs differ there.
    return [(Schedule.plsgd(units, PERIOD), "momentum"), (random_schedule(names, PERIOD, seed=3), "sgd")]


# ------------------------------------------------------- one spawn of 2 gloo ranks, shared
def _worker(rank: int, world: int, jobs: dict[str, list[tuple[Schedule, str]]]) -> dict:
    out: dict = {}
    for family, options in TINY.items():
        # Partial local SGD with DreamDDP, to compare with the single-process reference.
        finals = []
        for schedule, optimizer in jobs[family]:
            torch.manual_seed(0)
            model = _build(options)
            ddp = DreamDDP(model, schedule)
            opt = make_optimizer(optimizer, model.parameters())
            train_steps(ddp, opt, "lm", rank, STEPS)
            finals.append({k: v.clone() for k, v in model.state_dict().items()})
        # Every unit every step on identical data: torch DDP's trajectory.
        torch.manual_seed(0)
        base = _build(options)
        initial = copy.deepcopy(base.state_dict())
        ref, ours = every_step_beside_ddp(base, "lm", rank, 4, same_data=True)
        pairs = list(zip(ref.module.state_dict().items(), ours.module.state_dict().items()))
        out[family] = {
            "finals": finals,
            "ddp_names_match": all(a == b for (a, _), (b, _) in pairs),
            "ddp_max_diff": max((a - b).abs().max().item() for (_, a), (_, b) in pairs),
            "moved": max((v - initial[k]).abs().max().item() for k, v in ours.module.state_dict().items()),
        }
        del ref
        dist.barrier()
    return out


@pytest.fixture(scope="module")
def two_ranks() -> tuple[dict, list[dict]]:
    jobs = {family: _jobs(options) for family, options in TINY.items()}
    return jobs, run_workers(_worker, 2, jobs, timeout=180)


@pytest.mark.parametrize("family", list(TINY))
def test_dreamddp_matches_single_process_reference(two_ranks, family):
    jobs, results = two_ranks
    for j, (schedule, optimizer) in enumerate(jobs[family]):
        reference = reference_partial_local_sgd(lambda: _build(TINY[family]), schedule, 2, STEPS, optimizer, "lm")
        for rank in range(2):
            got = results[rank][family]["finals"][j]
            assert set(got) == set(reference[rank])
            for key, expected in reference[rank].items():
                np.testing.assert_allclose(
                    got[key],
                    expected.numpy(),
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{family}, {schedule.metadata.get('method', 'random')} + {optimizer}, rank {rank}, {key}",
                )
        # The ranks did not end equal: local steps happened, so the comparison above means something.
        assert any(
            not np.array_equal(results[0][family]["finals"][j][k], results[1][family]["finals"][j][k])
            for k in reference[0]
        )


@pytest.mark.parametrize("family", list(TINY))
def test_every_step_equals_torch_ddp_on_same_data(two_ranks, family):
    _, results = two_ranks
    for r in results:
        assert r[family]["ddp_names_match"]
        assert r[family]["moved"] > 1e-3  # it trained
        assert r[family]["ddp_max_diff"] <= 1e-6, r[family]


# ------------------------------------------------------------------------- sync units
def _owners(units, param: torch.Tensor) -> list[str]:
    return [u.name for u in units if any(p is param for p in u.params)]


def test_gpt2_units_tied_weight_once_and_no_parameter_free_units():
    model = _build(TINY["gpt2"])
    assert isinstance(model, HFCausalLM) and model_task("hf") == "lm"
    hf = model.hf
    assert hf.lm_head.weight is hf.transformer.wte.weight  # tied, one Parameter
    units = sync_units(model)
    per_layer = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    expected = ["hf.transformer.wte", "hf.transformer.wpe"]
    expected += [f"hf.transformer.h.{i}.{m}" for i in range(2) for m in per_layer] + ["hf.transformer.ln_f"]
    assert [u.name for u in units] == expected
    assert _owners(units, hf.transformer.wte.weight) == ["hf.transformer.wte"]
    # Every parameter in exactly one unit, and the bytes averaged are the model's, counted once.
    in_units = [p for u in units for p in u.params]
    assert len(in_units) == len({id(p) for p in in_units}) == len(list(model.parameters()))
    assert sum(u.nbytes for u in units) == sum(p.numel() * 4 for p in model.parameters())
    # Dropout, activations and the attention's parameter-free parts give no unit.
    free = {n for n, m in model.named_modules() if not list(m.parameters(recurse=False))}
    assert any("drop" in n for n in free) and not free & {u.name for u in units}


def test_llama_units_untied_head_and_no_rotary_tables():
    model = _build(TINY["llama"])
    units = sync_units(model)
    names = [u.name for u in units]
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    per_layer += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    expected = ["hf.model.embed_tokens"] + [f"hf.model.layers.{i}.{m}" for i in range(2) for m in per_layer]
    assert names == expected + ["hf.model.norm", "hf.lm_head"]
    assert model.hf.lm_head.weight is not model.hf.model.embed_tokens.weight
    # The rotary inv_freq tables are derived buffers: in no unit, never averaged.
    assert any("rotary" in n for n, _ in model.named_buffers())
    assert not any(u.buffers for u in units) and not any("rotary" in n for n in names)


def test_gpt2_small_preset_is_124m_and_wrapper_returns_logits():
    # The shapes only (meta device): allocating 124M parameters is not needed to count them.
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(model_config("hf", {"preset": "gpt2-small"}).hf_config)
    assert sum(p.numel() for p in small.parameters()) == 124_439_808
    c = small.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_positions, c.vocab_size) == (12, 768, 12, 1024, 50257)
    assert small.lm_head.weight is small.transformer.wte.weight
    model = _build({"model_type": "gpt2", "config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 16}})
    logits = model(torch.randint(0, 256, (3, 10)))
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 10, 256)
    assert model.hf.config.n_layer == 1 and model.hf.config.bos_token_id is None


def test_build_is_deterministic_under_the_seed():
    torch.manual_seed(0)
    a = _build(TINY["llama"])
    torch.manual_seed(0)
    b = _build(TINY["llama"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.slow
# ------------------------------------------------------------------------- the trainer
def test_trainer_runs_hf_gpt2_tiny_end_to_end(tmp_path):
    log = tmp_path / "hf.jsonl"
    overrides = ["train.steps=3", "train.progress=false", "data.max_bytes=200000", f"train.log={log}"]
    proc = subprocess.run(
        [sys.executable, "-m", "dreamddp.train", "--config", str(REPO / "configs" / "hf-gpt2-tiny.toml")]
        + [x for o in overrides for x in ("--set", o)],
        capture_output=True,
        text=True,
        timeout=120,
        # Offline: building the model must never reach the Hub.
        env=dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    summary = records[-1]["summary"]
    assert summary["world_size"] == 1 and math.isfinite(summary["val_loss"])
    assert summary["bytes_per_iter"] > 0


@pytest.mark.parametrize("name", ["hf-gpt2-tiny", "hf-gpt2-small", "hf-llama-tiny"])
def test_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.toml")
    assert cfg.model_name == "hf" and cfg.model_options["preset"] in PRESETS


# ------------------------------------------------------------------------- bad input
BAD = [
    (
        {"model_type": "gtp2"},
        r"re:model\.model_type 'gtp2' is not a model type transformers [\d.]+\S* knows; e\.g\. gpt2, llama, mistral, qwen2",
    ),
    (
        {"model_type": "t5"},
        "model.model_type 't5' has no causal language model in transformers (AutoModelForCausalLM); e.g. gpt2, llama",
    ),
    (
        {"model_type": "gpt2", "config": {"n_layers": 2}},
        "model.config key 'n_layers' is not a gpt2 config key (did you mean 'n_layer'?); allowed: activation_function, ",
    ),
    (
        {"preset": "llama-tiny", "config": {"n_layer": 2}},
        "model.config key 'n_layer' is not a llama config key",
    ),
    ({"preset": "gpt2-huge"}, "model.preset 'gpt2-huge' is unknown; choose one of: gpt2-tiny, gpt2-small, llama-tiny"),
    ({}, 'model.name="hf" needs model.preset (one of: gpt2-tiny, gpt2-small, llama-tiny, llama-small) or model.'),
    (
        {"preset": "llama-tiny", "model_type": "gpt2"},
        "model.preset 'llama-tiny' is a llama model, but model.model_type is 'gpt2'; leave model_type out",
    ),
    (
        {"preset": "gpt2-tiny", "config": {"vocab_size": 100}},
        "model.config.vocab_size=100: set model.vocab_size instead (the data is sized from it)",
    ),
    (
        {"preset": "gpt2-tiny", "config": {"n_head": 3}},
        "model.config {'n_head': 3} does not make a gpt2 model: `embed_dim` must be divisible by num_heads",
    ),
    ({"preset": "gpt2-tiny", "vocab_size": 0}, "model.vocab_size must be a positive int, got 0"),
    ({"preset": "gpt2-tiny", "config": 3}, "model.config must be a table of config keys, e.g. { n_layer = 2 }, got 3"),
    ({"preset": "gpt2-tiny", "n_layer": 2}, "unknown option 'n_layer' for model 'hf'; allowed: model_type, preset,"),
]


@pytest.mark.parametrize("options,message", BAD)
def test_bad_options_are_one_line(options, message):
    with pytest.raises(ValueError) as info:
        model_config("hf", options)
    text = str(info.value)
    assert "\n" not in text
    if message.startswith("re:"):
        assert re.match(message[3:], text), text
    else:
        assert text.startswith(message), text


def test_bad_option_through_the_config_file_is_one_line():
    with pytest.raises(ValueError) as info:
        load_config(REPO / "configs" / "hf-gpt2-tiny.toml", ["model.config={n_layers=1}"])
    assert str(info.value).startswith("model.config key 'n_layers' is not a gpt2 config key (did you mean 'n_layer'?)")


def test_without_transformers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ValueError) as info:
        model_config("hf", {"preset": "gpt2-tiny"})
    assert str(info.value) == "model.name=\"hf\" needs the hf extra: pip install 'dreamddp[hf]'"


def test_sequence_longer_than_positions_is_one_line():
    model = _build(TINY["gpt2"])  # 128 positions
    with pytest.raises(ValueError) as info:
        model(torch.zeros(1, 129, dtype=torch.long))
    assert str(info.value) == (
        "sequence length T=129 exceeds the model's max_position_embeddings=128; "
        "lower data.seq_len or raise the position count in model.config"
    )

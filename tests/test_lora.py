"""train.lora: LoRA adapters (peft) on the built-in GPT; only the adapters are units, sent and checkpointed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamddp import sync_units
from dreamddp.training.config import ExperimentConfig, LoraConfig, load_config
from dreamddp.training.lora import apply_lora
from dreamddp.training.models import build_model
from dreamddp.training.resume_policy import compare_configs

from .test_bad_inputs import TINY_TOML  # the tiny GPT on random tokens every trainer-level test uses
from .test_resume import _assert_same

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the hf extra)")

TINY_GPT = {"vocab_size": 256, "block_size": 16, "n_layer": 1, "n_head": 2, "d_model": 32}
ADAPTERS = [  # "proj" is a suffix: both the attention's and the MLP's output projections
    f"blocks.0.{layer}.lora_{ab}.default" for layer in ("attn.qkv", "attn.proj", "mlp.proj") for ab in "AB"
]
LORA = '{ r = 4, alpha = 8, targets = ["qkv", "proj"] }'


def _gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("gpt", TINY_GPT)


# --------------------------------------------------------------------------- config
def test_lora_is_a_table_in_the_file_and_in_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(TINY_TOML + f"lora = {LORA}\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.train.lora == LoraConfig(r=4, alpha=8, targets=["qkv", "proj"])
    assert load_config(path, ["train.lora.r=16"]).train.lora == LoraConfig(r=16, alpha=8, targets=["qkv", "proj"])
    assert load_config(None, ["train.lora={ targets = ['fc'] }"]).train.lora == LoraConfig(targets=["fc"])
    assert load_config(None).train.lora is None  # off by default
    assert cfg.to_dict()["train"]["lora"] == {
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "targets": ["qkv", "proj"],
        "trainable": [],
    }


@pytest.mark.parametrize(
    "override,message",
    [
        ('train.lora={ r = 0, targets = ["qkv"] }', "train.lora.r must be an integer >= 1, got 0"),
        ('train.lora={ r = -2, targets = ["qkv"] }', "train.lora.r must be an integer >= 1, got -2"),
        ("train.lora.r=8", 'train.lora.targets must be at least one module name, such as ["qkv", "proj"], got []'),
        ('train.lora={ dropout = 1.0, targets = ["qkv"] }', "train.lora.dropout must be a number in [0, 1), got 1.0"),
        (
            'train.lora={ targets = "qkv" }',
            "config key train.lora.targets must be list, got 'qkv'",
        ),
        (
            "train.lora={ targets = [1] }",
            'train.lora.targets must be a list of module names such as ["qkv", "proj"], got [1]',
        ),
        (
            "train.lora={ rank = 8 }",
            "config key train.lora.rank is unknown; allowed: r, alpha, dropout, targets, trainable",
        ),
        ("train.lora=8", 'config key train.lora must be a table such as { r = 8, targets = ["qkv"] }, got 8'),
        ("train.steps.r=8", "config key train.steps must be int, got {'r': 8}"),
    ],
)
def test_bad_lora_settings_are_one_line(override, message):
    with pytest.raises(ValueError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_changing_lora_on_resume_is_refused():
    saved, current = ExperimentConfig().to_dict(), load_config(None, [f"train.lora={LORA}"]).to_dict()
    changes = compare_configs(saved, current)
    assert [line.split(" ")[0] for line in changes.refused] == ["train.lora"] and not changes.accepted


# --------------------------------------------------------------------------- the model
@needs_peft
def test_units_are_only_the_adapters_and_the_kept_modules():
    model = apply_lora(_gpt(), LoraConfig(r=4, alpha=8, targets=["qkv", "proj"]))
    units = sync_units(model)
    assert [u.name for u in units] == ADAPTERS
    adapter_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".lora_" in n)
    assert sum(u.nbytes for u in units) == adapter_bytes == (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4 + 4 * 128 + 32 * 4) * 4
    assert {n for n, _ in units.frozen} == {n for n, _ in model.named_parameters() if ".lora_" not in n}
    assert model(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 16, 256)  # still the GPT, same forward

    kept = apply_lora(_gpt(), LoraConfig(r=4, targets=["qkv"], trainable=["ln_f"]))
    assert [u.name for u in sync_units(kept)] == [
        "blocks.0.attn.qkv.lora_A.default",
        "blocks.0.attn.qkv.lora_B.default",
        "ln_f",
    ]


@needs_peft
@pytest.mark.parametrize(
    "lora,message",
    [
        (
            LoraConfig(targets=["qkvv", "proj"]),
            "train.lora.targets 'qkvv' match no module of the model; its Linear modules end in: "
            "qkv, proj, fc, lm_head (e.g. 'blocks.0.attn.qkv')",
        ),
        (
            LoraConfig(targets=["attn"]),
            "train.lora.targets 'attn' matches 'blocks.0.attn', a CausalSelfAttention, which LoRA cannot adapt "
            "(it adapts Linear, Embedding and Conv modules); its Linear modules end in: qkv, proj, fc, lm_head "
            "(e.g. 'blocks.0.attn.qkv')",
        ),
        (
            LoraConfig(targets=["qkv"], trainable=["qkv"]),
            "train.lora.trainable 'qkv' matches 'blocks.0.attn.qkv', which train.lora.targets adapts; "
            "a module is either adapted or trained in full",
        ),
    ],
)
def test_targets_that_cannot_be_adapted_are_one_line(lora, message):
    model = _gpt()
    with pytest.raises(ValueError) as err:
        apply_lora(model, lora)
    assert str(err.value) == message
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was changed


def test_without_peft_the_message_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    with pytest.raises(ValueError) as err:
        apply_lora(_gpt(), LoraConfig(targets=["qkv"]))
    assert str(err.value) == "train.lora needs the hf extra: pip install 'dreamddp[hf]'"


# --------------------------------------------------------------------------- through the trainer
def _train(cwd: Path, *overrides: str) -> subprocess.Popen:
    (cwd / "tiny.toml").write_text(TINY_TOML, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DREAMDDP_FAULT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", DREAMDDP_STATE_DIR=str(cwd))
    args = [
        "--config",
        "tiny.toml",
        "--checkpoint-dir",
        "ckpt",
        "--set",
        f"train.lora={LORA}",
        "--set",
        "train.log=log.jsonl",
    ]
    for item in overrides:
        args += ["--set", item]
    return subprocess.Popen(
        [sys.executable, "-m", "dreamddp.train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def _final_state(directory: Path) -> dict:
    step_dir = directory / "ckpt" / (directory / "ckpt" / "latest").read_text().strip()
    return torch.load(step_dir / "rank-00000.pt", weights_only=True)


@pytest.mark.slow
@needs_peft
def test_lora_trains_checkpoints_and_resumes_bitwise(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d in (straight, split):
        d.mkdir()
    runs = [_train(straight, "train.steps=4"), _train(split, "train.steps=2")]  # side by side
    (rc, err), (rc_split, err_split) = (_finish(p) for p in runs)
    assert rc == 0, err[-3000:]
    assert rc_split == 0, err_split[-3000:]
    rc_resumed, err_resumed = _finish(_train(split, "train.steps=4"))  # from the checkpoint at 2
    assert rc_resumed == 0, err_resumed[-3000:]

    split_log = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in split_log if r.get("event") == "resume"] == [2]  # really resumed, not restarted
    assert [r["step"] for r in split_log if "loss" in r] == [0, 1, 2, 3]

    reference, resumed = _final_state(straight), _final_state(split)
    assert [name for name, _ in reference["units"]] == ADAPTERS  # the checkpoint's units: adapters only
    assert reference["step"] == resumed["step"] == 4
    for key in ("model", "optimizer", "lr_scheduler", "strategy"):
        _assert_same(reference[key], resumed[key], key)
    model = reference["model"]
    assert any(".base_layer." in k for k in model) and any(".lora_B." in k for k in model)
    assert len(reference["optimizer"]["state"]) == len(ADAPTERS)  # AdamW steps the adapters only

    # Per period (H = 2), the bytes sent are the adapters' bytes: nothing of the frozen model.
    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    sent = [r["bytes_sent"] for r in records if "bytes_sent" in r]
    adapters = (4 * 32 + 96 * 4 + 4 * 32 + 32 * 4 + 4 * 128 + 32 * 4) * 4
    assert len(sent) == 4 and sent[0] + sent[1] == sent[2] + sent[3] == adapters, sent

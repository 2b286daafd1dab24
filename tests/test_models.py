"""Model zoo: shapes, module layout contracts, init determinism, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreamddp.training.models import MODELS, build_model, model_task
from dreamddp.training.models.gpt import GPT, GPTConfig
from dreamddp.training.models.llama import Llama, LlamaConfig, RMSNorm, apply_rotary, rotary_tables
from dreamddp.training.models.resnet import ResNet, ResNetConfig

TINY_LM = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16}


def test_gpt_forward_shape() -> None:
    model = GPT(GPTConfig(**TINY_LM))
    logits = model(torch.randint(0, 32, (3, 10)))
    assert logits.shape == (3, 10, 32)
    assert torch.isfinite(logits).all()


def test_gpt_lm_head_tied_and_counted_once() -> None:
    model = GPT(GPTConfig(**TINY_LM))
    assert model.lm_head.weight is model.wte.weight
    params = list(model.parameters())
    assert sum(p is model.wte.weight for p in params) == 1
    assert len(params) == len({id(p) for p in params})


def test_gpt_module_order_wte_first_lm_head_last() -> None:
    names = [n for n, _ in GPT(GPTConfig(**TINY_LM)).named_children()]
    assert names == ["wte", "wpe", "drop", "blocks", "ln_f", "lm_head"]
    block = GPT(GPTConfig(**TINY_LM)).blocks[0]
    assert [n for n, _ in block.named_children()] == ["ln1", "attn", "ln2", "mlp"]
    assert hasattr(block.attn, "qkv") and hasattr(block.attn, "proj")
    assert hasattr(block.mlp, "fc") and hasattr(block.mlp, "proj")


def test_gpt_is_causal() -> None:
    model = GPT(GPTConfig(**TINY_LM)).eval()
    idx = torch.randint(0, 32, (1, 8))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 32
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_gpt_init_deterministic_and_residual_scaled() -> None:
    torch.manual_seed(0)
    a = GPT(GPTConfig(**TINY_LM))
    torch.manual_seed(0)
    b = GPT(GPTConfig(**TINY_LM))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    big = GPT(GPTConfig(vocab_size=64, d_model=256, n_layer=8, n_head=4, block_size=8))
    assert big.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert big.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.1)


def test_gpt_rejects_too_long_sequence() -> None:
    model = GPT(GPTConfig(**TINY_LM))
    with pytest.raises(ValueError, match="17"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_training_reduces_loss() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_LM))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 32, (4, 16))
    y = torch.roll(x, -1, dims=1)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    first = loss().item()
    for _ in range(20):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * first


def test_llama_forward_shape_and_gqa() -> None:
    model = Llama(LlamaConfig(**{**TINY_LM, "n_head": 4, "n_kv_head": 2}))
    logits = model(torch.randint(0, 32, (2, 12)))
    assert logits.shape == (2, 12, 32)
    attn = model.layers[0].attn
    assert attn.q.weight.shape == (16, 16)
    assert attn.k.weight.shape == (8, 16)  # 2 kv heads x head_dim 4
    assert attn.q.bias is None and attn.o.bias is None
    assert isinstance(model.norm, RMSNorm) and isinstance(model.layers[0].attn_norm, RMSNorm)
    assert model.output.weight is not model.tok_emb.weight


def test_llama_rotary_buffers_not_in_state_dict() -> None:
    model = Llama(LlamaConfig(**TINY_LM))
    buffer_names = {n for n, _ in model.named_buffers()}
    assert {"rope_cos", "rope_sin"} <= buffer_names
    assert not any("rope" in k for k in model.state_dict())


def test_llama_uses_token_order() -> None:
    # Without position information attention is order-blind: swapping the first
    # two tokens would leave the last position's output unchanged.  One layer,
    # because with more the causal mask alone already leaks order.
    model = Llama(LlamaConfig(**{**TINY_LM, "n_layer": 1})).eval()
    a = model(torch.tensor([[5, 9, 2]]))[0, -1]
    b = model(torch.tensor([[9, 5, 2]]))[0, -1]
    assert not torch.allclose(a, b, atol=1e-6)


def test_rotary_scores_depend_on_relative_position_only() -> None:
    cos, sin = rotary_tables(8, 16, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary(q.view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k.view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_llama_default_ffn_hidden() -> None:
    assert LlamaConfig(d_model=64).ffn_dim == 192  # ceil(170.67) -> 171 -> 192
    assert LlamaConfig(d_model=96).ffn_dim == 256
    assert LlamaConfig(d_model=64, ffn_hidden=100).ffn_dim == 100
    model = Llama(LlamaConfig(**TINY_LM))
    assert model.layers[0].ffn.gate.weight.shape == (64, 16)  # 8/3*16 = 42.7 -> 64


def test_rmsnorm_normalises() -> None:
    norm = RMSNorm(8)
    out = norm(torch.randn(4, 8) * 10)
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(4), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_runs_on_8x8(depth: int) -> None:
    model = ResNet(ResNetConfig(depth=depth, width=4))
    out = model(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    assert [n for n, _ in model.named_children()][:2] == ["conv1", "bn1"]
    for name in ("layer1", "layer2", "layer3", "layer4", "fc"):
        assert hasattr(model, name)
    assert len(model.layer3) == (2 if depth == 18 else 6)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.layer4.modules())


def test_resnet_width_scales_channels() -> None:
    assert ResNet(ResNetConfig(width=4)).fc.in_features == 32
    assert ResNet(ResNetConfig(depth=50, width=4)).fc.in_features == 128


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (GPTConfig, {"n_head": 0}, "n_head must be a positive int, got 0"),
        (GPTConfig, {"d_model": 65}, "d_model=65"),
        (GPTConfig, {"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        (LlamaConfig, {"n_kv_head": 3}, "n_kv_head=3"),
        (LlamaConfig, {"vocab_size": -5}, "vocab_size must be a positive int, got -5"),
        (LlamaConfig, {"norm_eps": 0.0}, "norm_eps must be a positive number, got 0.0"),
        (ResNetConfig, {"depth": 34}, "depth must be 18 or 50, got 34"),
        (ResNetConfig, {"width": 0}, "width must be a positive int, got 0"),
    ],
)
def test_config_validation_names_value(cls: type, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_build_model_and_task() -> None:
    model = build_model("gpt", dict(TINY_LM))
    assert isinstance(model, GPT) and model.config.d_model == 16
    assert isinstance(build_model("resnet", {"width": 4}), ResNet)
    assert set(MODELS) == {"gpt", "llama", "resnet", "hf"}  # hf: tests/test_hf_models.py
    assert [model_task(n) for n in ("gpt", "llama", "resnet", "hf")] == ["lm", "lm", "image", "lm"]


def test_build_model_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'x'; choose one of: gpt, llama, resnet"):
        build_model("x", {})
    with pytest.raises(ValueError, match="unknown model"):
        model_task("bert")


def test_build_model_unknown_option() -> None:
    with pytest.raises(ValueError) as info:
        build_model("llama", {"d_modle": 32})
    message = str(info.value)
    assert "'d_modle'" in message
    assert "d_model" in message and "n_kv_head" in message

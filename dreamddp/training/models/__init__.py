"""Model registry: build a model by name from a plain options dict (e.g. a TOML table)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from dreamddp.training.models.gpt import GPT, GPTConfig
from dreamddp.training.models.hf import HFCausalLM, HFConfig
from dreamddp.training.models.llama import Llama, LlamaConfig
from dreamddp.training.models.resnet import ResNet, ResNetConfig


@dataclass(frozen=True)
class ModelEntry:
    """One model family: its config dataclass, its module, and the batches it consumes.

    ``task`` is ``"lm"`` (token ids -> next-token logits) or ``"image"`` (images -> class
    logits); the trainer picks its loss from it.
    """

    config: type
    model: type[nn.Module]
    task: str


MODELS: dict[str, ModelEntry] = {
    "gpt": ModelEntry(GPTConfig, GPT, "lm"),
    "llama": ModelEntry(LlamaConfig, Llama, "lm"),
    "resnet": ModelEntry(ResNetConfig, ResNet, "image"),
    # Hugging Face transformers models (the hf extra); transformers is imported only when used.
    "hf": ModelEntry(HFConfig, HFCausalLM, "lm"),
}


def _lookup(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def model_config(name: str, options: dict[str, Any]) -> Any:
    """The validated config dataclass of model ``name`` built from ``options``.

    Unknown keys are an error rather than ignored, so that a typo in a config file cannot
    silently train a model of the default size. Cheap: a config file is checked with this,
    without allocating the model's weights.
    """
    config_cls = _lookup(name).config
    allowed = [f.name for f in fields(config_cls)]
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for model {name!r}; allowed: {', '.join(allowed)}")
    return config_cls(**options)


def build_model(name: str, options: dict[str, Any]) -> nn.Module:
    """Instantiate model ``name`` with config fields from ``options`` (checked by ``model_config``)."""
    return _lookup(name).model(model_config(name, options))


def model_task(name: str) -> str:
    """``"lm"`` for language models (gpt, llama, hf), ``"image"`` for classifiers (resnet)."""
    return _lookup(name).task


__all__ = [
    "GPT",
    "MODELS",
    "GPTConfig",
    "HFCausalLM",
    "HFConfig",
    "Llama",
    "LlamaConfig",
    "ModelEntry",
    "ResNet",
    "ResNetConfig",
    "build_model",
    "model_config",
    "model_task",
]

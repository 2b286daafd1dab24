"""Model registry: build a model by name from a plain options dict (e.g. a TOML table)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import nn

from dreamddp.training.models.gpt import GPT, GPTConfig
from dreamddp.training.models.llama import Llama, LlamaConfig
from dreamddp.training.models.resnet import ResNet, ResNetConfig

MODELS: dict[str, tuple[type, type]] = {
    "gpt": (GPTConfig, GPT),
    "llama": (LlamaConfig, Llama),
    "resnet": (ResNetConfig, ResNet),
}

# What kind of batches a model consumes: token ids -> next-token logits ("lm"),
# or images -> class logits ("image").  The trainer picks its loss from this.
_TASKS: dict[str, str] = {"gpt": "lm", "llama": "lm", "resnet": "image"}


def _lookup(name: str) -> tuple[type, type]:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}") from None


def build_model(name: str, options: dict[str, Any]) -> nn.Module:
    """Instantiate model ``name`` with config fields from ``options``.

    Unknown keys are an error rather than ignored, so that a typo in a config
    file cannot silently train a model of the default size.
    """
    config_cls, model_cls = _lookup(name)
    allowed = [f.name for f in fields(config_cls)]
    for key in options:
        if key not in allowed:
            raise ValueError(f"unknown option {key!r} for model {name!r}; allowed: {', '.join(allowed)}")
    return model_cls(config_cls(**options))


def model_task(name: str) -> str:
    """``"lm"`` for language models (gpt, llama), ``"image"`` for classifiers (resnet)."""
    _lookup(name)
    return _TASKS[name]


__all__ = [
    "GPT",
    "MODELS",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "ResNet",
    "ResNetConfig",
    "build_model",
    "model_task",
]

"""LoRA fine-tuning (``train.lora``): adapters on the targeted modules, every other weight frozen.

peft's ``inject_adapter_in_model`` adds the adapters in place: the model keeps its class, its
forward and its module names (``blocks.0.attn.qkv`` becomes a LoRA layer holding
``base_layer``, ``lora_A.default`` and ``lora_B.default``), so the trainer, evaluation and
checkpoints handle it like any model. peft freezes every parameter but the adapters, and
frozen parameters are in no sync unit (``dreamddp.core.units``): the units are the adapters —
one per ``lora_A`` and per ``lora_B`` — plus the modules kept ``trainable``, and that is all
DreamDDP and the local-SGD baselines send. The frozen weights are checked identical across
ranks once, when the wrapper is built.

peft is imported only here, and only when ``train.lora`` is set (the ``hf`` extra).
"""

from __future__ import annotations

import logging

from torch import nn

from dreamddp.training.config import LoraConfig

__all__ = ["ADAPTABLE", "apply_lora"]

logger = logging.getLogger(__name__)

# Module types LoRA adapts here (peft supports them; transformers' GPT-2 ``Conv1D`` is a Linear).
ADAPTABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LISTED = 10  # names shown when a target matches nothing


def apply_lora(model: nn.Module, lora: LoraConfig | None) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and freeze the rest; ``model`` unchanged when ``lora`` is None.

    Raises a one-line ``ValueError`` when peft is missing, a target matches no module (naming
    the model's Linear modules), or matches a module LoRA cannot adapt. Call it on every rank
    with the same seed: the adapters' initial values come from torch's RNG.
    """
    if lora is None:
        return model
    try:
        import peft
    except ImportError:
        raise ValueError("train.lora needs the hf extra: pip install 'dreamddp[hf]'") from None
    names = [name for name, _ in model.named_modules() if name]
    _check_targets(model, lora.targets)
    keep = {t: [n for n in names if _matches(n, t)] for t in lora.trainable}
    _check_trainable(model, lora, keep)
    targeted = [m for name, m in model.named_modules() if any(_matches(name, t) for t in lora.targets)]
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets),
        bias="none",
        # transformers' GPT-2 Conv1D stores its weight transposed; peft would warn and set this itself.
        fan_in_fan_out=all(type(m).__name__ == "Conv1D" for m in targeted),
    )
    model = peft.inject_adapter_in_model(config, model)
    for module_names in keep.values():
        for name in module_names:
            model.get_submodule(name).requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA r=%d on %s: %d of %d parameters train", lora.r, ", ".join(lora.targets), trainable, total)
    return model


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's qualified name is it, or ends in ``.target``."""
    return name == target or name.endswith(f".{target}")


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, ADAPTABLE) or type(module).__name__ == "Conv1D"


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    modules = [(name, m) for name, m in model.named_modules() if name]
    unmatched = [t for t in targets if not any(_matches(name, t) for name, _ in modules)]
    if unmatched:
        raise ValueError(
            f"train.lora.targets {', '.join(map(repr, unmatched))} match no module of the model; {_linear_names(model)}"
        )
    for target in targets:
        wrong = [(name, m) for name, m in modules if _matches(name, target) and not _adaptable(m)]
        if wrong:
            name, module = wrong[0]
            raise ValueError(
                f"train.lora.targets {target!r} matches {name!r}, a {type(module).__name__}, which LoRA cannot "
                f"adapt (it adapts Linear, Embedding and Conv modules); {_linear_names(model)}"
            )


def _check_trainable(model: nn.Module, lora: LoraConfig, keep: dict[str, list[str]]) -> None:
    for name, matched in keep.items():
        if not matched:
            owners = _unique_suffixes(
                n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None
            )
            raise ValueError(
                f"train.lora.trainable {name!r} matches no module of the model; its modules end in: {owners}"
            )
        adapted = [n for n in matched if any(_matches(n, t) for t in lora.targets)]
        if adapted:
            raise ValueError(
                f"train.lora.trainable {name!r} matches {adapted[0]!r}, which train.lora.targets adapts; "
                "a module is either adapted or trained in full"
            )


def _linear_names(model: nn.Module) -> str:
    """The model's Linear modules, as the name suffixes a target can use, for a message."""
    modules = [(name, m) for name, m in model.named_modules() if name]
    linear = [name for name, m in modules if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if linear:
        return f"its Linear modules end in: {_unique_suffixes(linear)} (e.g. {linear[0]!r})"
    other = [name for name, m in modules if _adaptable(m)]
    if other:
        return f"it has no Linear module; its Embedding and Conv modules end in: {_unique_suffixes(other)}"
    return "it has no Linear, Embedding or Conv module"


def _unique_suffixes(names) -> str:
    """Last components of ``names``, each once, in order; the first few and how many more."""
    seen: list[str] = []
    for name in names:
        last = name.rpartition(".")[2]
        if last not in seen:
            seen.append(last)
    shown = ", ".join(seen[:_LISTED])
    return shown if len(seen) <= _LISTED else f"{shown} … ({len(seen) - _LISTED} more)"

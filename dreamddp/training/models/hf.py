"""Hugging Face causal language models in the trainer: ``model.name = "hf"``.

Any decoder that ``transformers`` can build as ``AutoModelForCausalLM`` (``gpt2``, ``llama``,
``mistral``, ``qwen2``, ...) trains under DreamDDP like the built-in models. The model is
built from a config with random weights (``AutoModelForCausalLM.from_config``): nothing is
downloaded, no checkpoint is read, and a run works offline. ``transformers`` is an optional
dependency (``pip install 'dreamddp[hf]'``) imported only when an ``hf`` model is configured.

Options of the ``[model]`` table::

    name = "hf"
    preset = "gpt2-small"          # a named size (see PRESETS), or leave it out and give:
    model_type = "gpt2"            # any type transformers.AutoConfig.for_model knows
    config = { n_layer = 6 }       # overrides of that type's config keys (checked: a typo fails)
    vocab_size = 256               # the embedding rows; also what the data is sized from

Why byte-level tokens (vocabulary 256 unless a preset says otherwise): the trainer's language
data is the byte-level corpus of the Python standard library (``data.name = "stdlib-bytes"``),
one token per byte. Keeping it means no tokenizer has to be trained or downloaded, every figure
of the project is measured on the same data, and an HF model can be compared exactly with the
built-in GPT of the same shape (same tokens, same targets, same loss). A BPE tokenizer is out
of scope. The ``gpt2-small`` and ``llama-small`` presets keep their family's real vocabulary
(50257 and 32000 rows) so that they have the real parameter count and hence the real
communication volume; the byte data uses only ids 0..255 of it.

The wrapper :class:`HFCausalLM` keeps the HF model as its submodule ``hf``, so parameter and
sync-unit names stay those of the HF model under one prefix (``hf.transformer.h.0.attn.c_attn``),
and returns the logits tensor rather than HF's ``ModelOutput``, which is what the trainer's
language-model loss takes. Sync units come out sensible without help: GPT-2's tied
``wte``/``lm_head`` weight is one ``Parameter``, owned by ``wte`` (registered first), so it is
one unit and averaged once; dropout and activation modules own nothing and give no unit;
Llama's rotary ``inv_freq`` tables are non-persistent buffers, left out like the built-in
Llama's.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dreamddp.validation import is_int, require

__all__ = ["BYTE_VOCAB", "HFCausalLM", "HFConfig", "PRESETS", "Preset"]

BYTE_VOCAB = 256  # one token per byte: the stdlib-bytes corpus
EXTRA_HINT = "pip install 'dreamddp[hf]'"


@dataclass(frozen=True)
class Preset:
    """A named model size: its ``model_type``, its vocabulary, and config overrides."""

    model_type: str
    vocab_size: int
    config: dict[str, Any]
    about: str


# Dropout is 0 in every preset, as in the built-in models: short runs from scratch, and curves
# comparable with gpt/llama. Set e.g. config = { resid_pdrop = 0.1 } to change it.
_GPT2_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
PRESETS: dict[str, Preset] = {
    "gpt2-tiny": Preset(
        "gpt2",
        BYTE_VOCAB,
        {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128, **_GPT2_NO_DROPOUT},
        "GPT-2 layout, 2 layers x 64 wide, byte vocabulary (~0.12M parameters): tests and the demo",
    ),
    "gpt2-small": Preset(
        "gpt2",
        50257,
        {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, **_GPT2_NO_DROPOUT},
        "GPT-2 124M: 12 layers x 768, 12 heads, 1024 positions, tied wte/lm_head, GPT-2's 50257-row vocabulary",
    ),
    "llama-tiny": Preset(
        "llama",
        BYTE_VOCAB,
        {
            "num_hidden_layers": 2,
            "hidden_size": 64,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "intermediate_size": 192,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
        },
        "Llama layout (RMSNorm, rotary, SwiGLU), 2 layers x 64 wide, byte vocabulary: tests",
    ),
    "llama-small": Preset(
        "llama",
        32000,
        {
            "num_hidden_layers": 12,
            "hidden_size": 768,
            "num_attention_heads": 12,
            "num_key_value_heads": 12,
            "intermediate_size": 2048,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": False,
            "attention_dropout": 0.0,
        },
        "Llama layout at GPT-2-small's width and depth, untied, Llama's 32000-row vocabulary (~134M)",
    ),
}

# Keys of an HF config not to be set in model.config: the type is model.model_type, the rest is
# bookkeeping. (vocab_size is refused too, with its own message: it is model.vocab_size.)
_RESERVED = {"model_type", "transformers_version", "_name_or_path", "architectures"}
_EXAMPLE_TYPES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt")


def _transformers() -> Any:
    """The ``transformers`` module, or a one-line ``ValueError`` saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ValueError(f'model.name="hf" needs the hf extra: {EXTRA_HINT}') from None
    return transformers


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _causal_lm_types(transformers: Any) -> tuple[set[str], set[str]]:
    """(every config type transformers knows, those with an ``AutoModelForCausalLM`` class)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(transformers.CONFIG_MAPPING.keys()), set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _examples(value: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(value, sorted(candidates), n=3)
    return ", ".join(dict.fromkeys([*close, *(t for t in _EXAMPLE_TYPES if t in candidates)]))


@dataclass
class HFConfig:
    """Options of ``model.name = "hf"``; validated on construction (see the module docstring).

    Construction imports ``transformers``, builds the HF config and the model on the ``meta``
    device (no memory), so every mistake — an unknown type, a misspelt key, a value HF rejects,
    a head count that does not divide the width — is one line here, before any process group.
    """

    model_type: str = ""
    preset: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None  # None: the preset's, else 256 (bytes)

    def __post_init__(self) -> None:
        require(isinstance(self.model_type, str), "model.model_type", "a string such as 'gpt2'", self.model_type)
        require(isinstance(self.preset, str), "model.preset", "a string such as 'gpt2-tiny'", self.preset)
        require(
            isinstance(self.config, dict), "model.config", "a table of config keys, e.g. { n_layer = 2 }", self.config
        )
        require(
            self.vocab_size is None or (is_int(self.vocab_size) and self.vocab_size >= 1),
            "model.vocab_size",
            "a positive int",
            self.vocab_size,
        )
        preset = self._preset()
        model_type = self.model_type or (preset.model_type if preset else "")
        if not model_type:
            raise ValueError(
                f'model.name="hf" needs model.preset (one of: {", ".join(PRESETS)}) or model.model_type '
                "(a transformers model type, e.g. gpt2, llama)"
            )
        if "vocab_size" in self.config:
            raise ValueError(
                f"model.config.vocab_size={self.config['vocab_size']!r}: set model.vocab_size instead "
                "(the data is sized from it)"
            )
        transformers = _transformers()
        known, causal = _causal_lm_types(transformers)
        if model_type not in known:
            raise ValueError(
                f"model.model_type {model_type!r} is not a model type transformers {transformers.__version__} "
                f"knows; e.g. {_examples(model_type, causal)}"
            )
        if model_type not in causal:
            raise ValueError(
                f"model.model_type {model_type!r} has no causal language model in transformers "
                f"(AutoModelForCausalLM); e.g. {_examples(model_type, causal)}"
            )
        if preset and model_type != preset.model_type:
            raise ValueError(
                f"model.preset {self.preset!r} is a {preset.model_type} model, but model.model_type is "
                f"{model_type!r}; leave model_type out, or choose a {model_type} preset"
            )
        default = transformers.AutoConfig.for_model(model_type)
        self._check_keys(model_type, default)
        self._hf_config = self._build_hf_config(transformers, model_type, default, preset)

    def _preset(self) -> Preset | None:
        if not self.preset:
            return None
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset {self.preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
        return PRESETS[self.preset]

    def _check_keys(self, model_type: str, default: Any) -> None:
        """HF configs accept any keyword silently; here a key the type's default lacks is an error."""
        own = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
        allowed = own - _RESERVED - {"vocab_size"}
        for key in self.config:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
                did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(
                    f"model.config key {key!r} is not a {model_type} config key{did_you_mean}; "
                    f"allowed: {', '.join(sorted(_model_keys(default) & allowed))}, ..."
                )

    def _build_hf_config(self, transformers: Any, model_type: str, default: Any, preset: Preset | None) -> Any:
        vocab = self.effective_vocab_size
        options: dict[str, Any] = {"use_cache": False}  # training: no key/value cache
        # A byte vocabulary has no room for GPT-2's id 50256: no special tokens unless asked for.
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(default, key, None)
            if is_int(value) and value >= vocab:
                options[key] = None
        options.update(preset.config if preset else {})
        options.update(self.config)
        try:
            hf_config = transformers.AutoConfig.for_model(model_type, vocab_size=vocab, **options)
            with torch.device("meta"):  # the shapes are checked, no memory is allocated
                transformers.AutoModelForCausalLM.from_config(copy.deepcopy(hf_config))
        except Exception as err:
            raise ValueError(
                f"model.config {self.config!r} does not make a {model_type} model: {_one_line(err)}"
            ) from None
        return hf_config

    @property
    def effective_vocab_size(self) -> int:
        if self.vocab_size is not None:
            return self.vocab_size
        preset = PRESETS.get(self.preset)
        return preset.vocab_size if preset else BYTE_VOCAB

    @property
    def hf_config(self) -> Any:
        """A fresh copy of the validated ``transformers`` config."""
        return copy.deepcopy(self._hf_config)

    @property
    def max_positions(self) -> int | None:
        """The config's ``max_position_embeddings`` (GPT-2's ``n_positions``): the longest sequence
        the forward accepts (GPT-2 has a learned table of that size), or None if the type has none."""
        value = getattr(self._hf_config, "max_position_embeddings", None)
        return value if is_int(value) else None


def _model_keys(default: Any) -> set[str]:
    """The keys that belong to this model type (not every HF config's bookkeeping)."""
    from transformers import PretrainedConfig

    return (set(default.to_dict()) | set(getattr(default, "attribute_map", {}))) - set(PretrainedConfig().to_dict())


class HFCausalLM(nn.Module):
    """An ``AutoModelForCausalLM`` (submodule ``hf``) returning next-token logits ``[B, T, vocab]``."""

    def __init__(self, config: HFConfig) -> None:
        super().__init__()
        self.config = config
        self.max_positions = config.max_positions
        self.hf = _transformers().AutoModelForCausalLM.from_config(config.hf_config)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2:
            raise ValueError(f"HF model expects token ids of shape [B, T], got {tuple(idx.shape)}")
        t = idx.shape[1]
        if self.max_positions is not None and t > self.max_positions:
            raise ValueError(
                f"sequence length T={t} exceeds the model's max_position_embeddings={self.max_positions}; "
                "lower data.seq_len or raise the position count in model.config"
            )
        return self.hf(input_ids=idx, use_cache=False).logits

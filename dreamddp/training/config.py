"""Typed training configuration: TOML files plus ``--set section.key=value`` overrides.

A config has three sections. ``[model]`` names a model and passes the rest to its config
dataclass (validated there). ``[data]`` and ``[train]`` map onto the dataclasses below, which
validate every value when built, so a typo or a bad number fails before any process group
exists, with one line naming the key and what is allowed. A few keys are tables of their own
(``train.lora = { r = 8, targets = ["qkv"] }``), built and validated the same way; an override
reaches into one with a dotted key (``--set train.lora.r=16``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from dreamddp.core.sync_options import SyncOptions
from dreamddp.core.topology import HIERARCHIES
from dreamddp.emulation.link import LinkSpec
from dreamddp.validation import (
    is_int,
    is_number,
    non_negative_int,
    non_negative_number,
    positive_int,
    positive_number,
    require,
)

__all__ = [
    "ALGORITHMS",
    "DataConfig",
    "LoraConfig",
    "TrainConfig",
    "ExperimentConfig",
    "load_config",
    "apply_overrides",
]

# The training algorithms, in the order tables list them. The one list: the benchmark and its
# report derive theirs from it.
MAX_PERIOD = 100_000  # H beyond any real run; the wrapper holds one bucket plan per iteration of it
ALGORITHMS = ("none", "ssgd", "local_sgd", "post_local_sgd", "hier_local_sgd", "plsgd", "dreamddp")
TWO_LEVEL_ALGORITHMS = ("plsgd", "dreamddp", "hier_local_sgd")  # the ones train.hierarchy applies to
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


@dataclass
class DataConfig:
    name: str = "stdlib-bytes"
    batch_size: int = 8
    seq_len: int = 64
    max_bytes: int = 2_000_000

    def __post_init__(self) -> None:
        from dreamddp.training.data import DATASETS

        if self.name not in DATASETS:
            raise ValueError(f"data.name {self.name!r} is unknown; choose one of: {', '.join(DATASETS)}")
        for name in ("batch_size", "seq_len", "max_bytes"):
            positive_int(f"data.{name}", getattr(self, name))


@dataclass
class LoraConfig:
    """``train.lora``: train LoRA adapters only; the model's own weights are frozen and never sent.

    ``targets`` are module name suffixes (``"qkv"`` matches ``blocks.0.attn.qkv`` and every
    other block's): each matching Linear, Embedding or Conv gets an adapter of rank ``r``,
    scaled by ``alpha / r``. ``trainable`` names modules (suffixes too) that stay fully
    trainable, such as a task head trained from scratch. Applied by ``dreamddp.training.lora``.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        positive_int("train.lora.r", self.r)
        positive_int("train.lora.alpha", self.alpha)
        dropout = self.dropout
        require(is_number(dropout) and 0.0 <= dropout < 1.0, "train.lora.dropout", "a number in [0, 1)", dropout)
        for name in ("targets", "trainable"):
            names = getattr(self, name)
            ok = isinstance(names, list) and all(isinstance(n, str) and n and n.strip() == n for n in names)
            require(ok, f"train.lora.{name}", 'a list of module names such as ["qkv", "proj"]', names)
        require(bool(self.targets), "train.lora.targets", 'at least one module name, such as ["qkv", "proj"]', [])


@dataclass
class TrainConfig:
    algorithm: str = "dreamddp"
    steps: int = 100
    # H: iterations per averaging period (local methods); "auto" (dreamddp with train.profile): the
    # smallest H whose planned schedule is predicted within 5% of the lower bound.
    period: int | str = field(default=4, metadata={"or": ("auto",)})
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0
    bucket_cap_mb: float = 25.0
    schedule: str = ""  # schedule JSON for algorithm "dreamddp"; empty = PLSGD's contiguous groups
    overlap: str = ""  # plsgd/dreamddp: "backward" (the paper), "forward", or "" = what the schedule was planned for
    link: str = ""  # simulated link, e.g. "100mbit,20ms"; empty = the real network as it is
    post_local_warmup: int = 0  # post_local_sgd: S-SGD iterations before local SGD starts
    eval_every: int = 0  # 0 = evaluate at the end only
    eval_batches: int = 8
    time_budget_s: float = 0.0  # >0: stop at the first evaluation after this much training time
    log: str = "runs/train.jsonl"
    timing_warmup: int = 3  # iterations left out of the summary's timing
    timeout_s: float = 300.0  # process-group timeout: a dead or hung rank fails the run after this
    backend: str = "auto"  # auto = nccl with CUDA, else gloo
    progress: bool = True
    lr_schedule: str = "constant"  # constant | cosine (to 0 at train.steps)
    lr_warmup: int = 0  # iterations of linear warm-up before the schedule
    checkpoint_dir: str = ""  # per-rank checkpoints here; a run finding one there resumes from it
    checkpoint_every: int = 0  # iterations between checkpoints; 0 = only at the end (with checkpoint_dir)
    checkpoint_keep: int = 2  # complete checkpoints kept
    checkpoint_average: bool = False  # also write rank 0's copy of the averaged model (averaged.pt)
    metrics_port: int = 0  # >0: Prometheus /metrics on this port + LOCAL_RANK
    metrics_addr: str = "127.0.0.1"
    trace: str = ""  # write a Chrome/Perfetto trace of real iterations here
    trace_steps: int = 50  # iterations traced, from the first timed one
    heartbeat_s: float = 1.0  # liveness beat interval, used to name a failed rank
    # LoRA fine-tuning (a table: r, alpha, dropout, targets, trainable); None = train every parameter.
    lora: LoraConfig | None = field(default=None, metadata={"table": LoraConfig})
    precision: str = "fp32"  # fp32 | bf16 (autocast for forward and loss; parameters, gradients, averages fp32)
    grad_accum: int = 1  # micro-batches per iteration: data.batch_size is split in k, all but the last under no_sync
    # Live re-planning (dreamddp): every N periods, refresh train.profile from this job's own
    # timings, plan on rank 0 and switch every rank's schedule at the period boundary. 0 = off.
    replan_every: int = 0
    profile: str = ""  # the profile (`dreamddp profile`) the schedule was planned from; needed to re-plan
    # plsgd/dreamddp: what a scheduled sync does. "average" (the paper) or "delta": per unit, the mean
    # pseudo-gradient (anchor - weights) steps an anchor through an outer optimizer (dreamddp.core.sync_options).
    sync: str = "average"
    outer: str = "sgd"  # delta: sgd | nesterov (DiLoCo's outer optimizer)
    outer_lr: float | str = field(
        default="auto", metadata={"or": ("auto",), "type": float}
    )  # auto: sgd 1, nesterov 0.7
    outer_momentum: float | str = field(default="auto", metadata={"or": ("auto",), "type": float})  # auto: 0 / 0.9
    compress: str = "none"  # delta: none | bf16 | int8 (per-block absmax), with error feedback
    compress_block: int = 256  # int8: elements per scale
    anchor_device: str = "param"  # delta: "param" (beside the weights) | "cpu" (host memory, as DiLoCo)
    # Several ranks per site (dreamddp.core.topology): "auto" = two-level when there are several sites
    # of several ranks (gradients every step inside a site, the schedule across sites), "flat" = every
    # rank its own replica, "hierarchical" = two-level or a one-line error.
    hierarchy: str = "auto"
    ranks_per_site: int = 0  # 0 = from the environment (DREAMDDP_SITE, torchrun's GROUP_RANK, NODE_RANK)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoraConfig, self.lora, "train.lora")
        elif self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(_not_a_table("train.lora", self.lora))
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"train.algorithm {self.algorithm!r} is unknown; choose one of: {', '.join(ALGORITHMS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer {self.optimizer!r} is unknown; choose one of: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"train.lr_schedule {self.lr_schedule!r} is unknown; choose one of: {', '.join(LR_SCHEDULES)}"
            )
        if self.overlap not in ("", "backward", "forward"):
            raise ValueError(
                f"train.overlap {self.overlap!r} is unknown; choose backward, forward, or leave it empty "
                "for the schedule's"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision {self.precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"train.backend {self.backend!r} is unknown; choose one of: auto, gloo, nccl")
        for name in ("steps", "eval_batches", "checkpoint_keep", "trace_steps", "grad_accum"):
            positive_int(f"train.{name}", getattr(self, name))
        if self.period == "auto":
            if self.algorithm != "dreamddp" or not self.profile:
                raise ValueError(
                    "train.period='auto' needs train.algorithm='dreamddp' and train.profile (the profile to "
                    f"choose H from); got algorithm {self.algorithm!r}, profile {self.profile!r}"
                )
        else:
            require(is_int(self.period) and self.period >= 1, "train.period", "an integer >= 1 or 'auto'", self.period)
            # The wrapper keeps a bucket plan per iteration of the period: an absurd H exhausts memory, not a run.
            require(self.period_h <= MAX_PERIOD, "train.period", f"at most {MAX_PERIOD}", self.period)
        positive_number("train.heartbeat_s", self.heartbeat_s)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError(
                f"train.checkpoint_every={self.checkpoint_every} needs train.checkpoint_dir (where the "
                "checkpoints go): add --checkpoint-dir DIR, or set train.checkpoint_every=0"
            )
        port = self.metrics_port
        require(is_int(port) and 0 <= port <= 65535, "train.metrics_port", "0 (off) or a port in 1..65535", port)
        for name in (
            "post_local_warmup",
            "eval_every",
            "timing_warmup",
            "seed",
            "lr_warmup",
            "checkpoint_every",
            "replan_every",
        ):
            non_negative_int(f"train.{name}", getattr(self, name))
        for name in ("lr", "bucket_cap_mb", "timeout_s"):
            positive_number(f"train.{name}", getattr(self, name))
        for name in ("momentum", "weight_decay", "grad_clip", "time_budget_s"):
            non_negative_number(f"train.{name}", getattr(self, name))
        if self.link:
            LinkSpec.parse(self.link)  # raises ValueError naming the malformed string
        if self.replan_every and (self.algorithm != "dreamddp" or not self.profile):
            raise ValueError(
                f"train.replan_every={self.replan_every} needs train.algorithm='dreamddp' and train.profile "
                f"(the profile to refresh from the job's own timings); got algorithm {self.algorithm!r}, "
                f"profile {self.profile!r} (or set train.replan_every=0)"
            )
        if self.hierarchy not in HIERARCHIES:
            raise ValueError(f"train.hierarchy {self.hierarchy!r} is unknown; choose one of: {', '.join(HIERARCHIES)}")
        non_negative_int("train.ranks_per_site", self.ranks_per_site)
        if self.hierarchy == "hierarchical" and self.algorithm not in TWO_LEVEL_ALGORITHMS:
            raise ValueError(
                f"train.hierarchy='hierarchical' needs train.algorithm one of {', '.join(TWO_LEVEL_ALGORITHMS)}, "
                f"got {self.algorithm!r} (or set train.hierarchy=auto)"
            )
        options = self.sync_options  # validates train.sync and the delta keys, one line each
        if options.delta and self.algorithm not in ("plsgd", "dreamddp"):
            raise ValueError(
                f"train.sync='delta' needs train.algorithm plsgd or dreamddp (a layer-wise schedule), "
                f"got {self.algorithm!r}"
            )
        if self.time_budget_s and not self.eval_every:
            raise ValueError(
                f"train.time_budget_s={self.time_budget_s:g} needs train.eval_every > 0: the budget is "
                "checked at evaluations (or set train.time_budget_s=0)"
            )

    @property
    def period_h(self) -> int:
        """H as a number: every algorithm's, except dreamddp's with period 'auto' (its schedule's)."""
        if not isinstance(self.period, int):
            raise ValueError("train.period='auto' is chosen by the planner: read the schedule's period")
        return self.period

    @property
    def sync_options(self) -> SyncOptions:
        """train.sync and its keys as the wrapper's options (validated where they are built)."""
        return SyncOptions(
            mode=self.sync,
            outer=self.outer,
            outer_lr=None if self.outer_lr == "auto" else self.outer_lr,  # type: ignore[arg-type]
            outer_momentum=None if self.outer_momentum == "auto" else self.outer_momentum,  # type: ignore[arg-type]
            compress=self.compress,
            compress_block=self.compress_block,
            anchor_device=self.anchor_device,
            prefix="train",
        )

    @property
    def link_spec(self) -> LinkSpec | None:
        return LinkSpec.parse(self.link) if self.link else None


@dataclass
class ExperimentConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "gpt"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        batch, k = self.data.batch_size, self.train.grad_accum
        if batch % k:
            raise ValueError(
                f"data.batch_size={batch} is not divisible by train.grad_accum={k}: each iteration's batch is "
                f"split into {k} equal micro-batches; choose a batch size that is a multiple of {k}"
            )

    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def model_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ExperimentConfig:
        unknown = [k for k in raw if k not in ("model", "data", "train")]
        if unknown:
            raise ValueError(f"config section [{unknown[0]}] is unknown; sections are [model], [data], [train]")
        model = dict(raw.get("model", {"name": "gpt"}))
        if not isinstance(model.get("name"), str):
            from dreamddp.training.models import MODELS

            raise ValueError(
                f'config [model] needs a name, one of: {", ".join(MODELS)} (name = "gpt" in the file, '
                "or --set model.name=gpt)"
            )
        from dreamddp.training.models import model_config

        model_config(model["name"], {k: v for k, v in model.items() if k != "name"})  # validate now
        return cls(
            model=model,
            data=_build(DataConfig, raw.get("data", {}), "data"),
            train=_build(TrainConfig, raw.get("train", {}), "train"),
        )


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a TOML file (or start from defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(
                f"config file {str(path)!r} does not exist; give a TOML file such as "
                "configs/gpt-tiny.toml, or leave --config out for the defaults"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, no permission, a binary file
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise ValueError(
                f"config file {str(path)!r} cannot be read: {reason}; give a TOML file such as configs/gpt-tiny.toml"
            ) from None
    return ExperimentConfig.from_dict(apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``train.steps=50`` style overrides; values are read as TOML, else taken as strings.

    A dotted key sets one key of a table (``train.lora.r=16``); a whole table is an inline
    TOML table (``train.lora={ r = 16, targets = ["qkv"] }``).
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        *tables, leaf = name.split(".")
        target = out.setdefault(section, {})
        for depth, table in enumerate(tables):
            inner = target.get(table, {})
            if not isinstance(inner, dict):
                where = ".".join([section, *tables[: depth + 1]])
                raise ValueError(f"override {item!r} sets a key of {where}, which is not a table")
            inner = dict(inner)  # a copy: the caller's config is not changed
            target[table] = inner
            target = inner
        target[leaf] = value
    return out


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    allowed = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in allowed:
            raise ValueError(f"config key {section}.{key} is unknown; allowed: {', '.join(allowed)}")
        spec = allowed[key]
        if "table" in spec.metadata:  # built (and its keys checked) by the dataclass that holds it
            if not isinstance(value, dict):
                raise ValueError(_not_a_table(f"{section}.{key}", value))
            continue
        if value in spec.metadata.get("or", ()):  # a named alternative to the typed value, e.g. period "auto"
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        expected = spec.metadata.get("type", type(default))  # a field whose default is its named alternative
        if expected is float and is_int(value):
            continue
        if not isinstance(value, expected) or (expected is int and not is_int(value)):
            raise ValueError(f"config key {section}.{key} must be {expected.__name__}, got {value!r}")
    return cls(**values)


def _not_a_table(key: str, value: Any) -> str:
    return f'config key {key} must be a table such as {{ r = 8, targets = ["qkv"] }}, got {value!r}'

"""What may change between a run and its resume, and what must not.

A checkpoint resumes one exact trajectory. Some settings define that trajectory — the model,
the data stream, the algorithm and its schedule, the optimizer's kind — and changing one on
resume would load state that belongs to another run (an AdamW state into SGD, a batch of 8's
data order into a batch of 16's), so they are refused, each named with old → new. The
hyperparameters a user legitimately changes mid-run (learning rate, weight decay, steps) and
everything operational (cadences, logging, ports, the simulated link) are accepted, each named
in one notice line; the hyperparameters are then written into the optimizer and LR schedule
that the checkpoint restored, so they really take effect.

Every config key is in exactly one of the sets below (a test holds the sets to the config
dataclasses), so a new key cannot slip through unclassified.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from dreamddp.training.config import DataConfig, TrainConfig
from dreamddp.training.models import model_config

__all__ = ["ResumeChanges", "apply_hyperparameters", "compare_configs", "TRAIN_KEYS"]

# train.* keys, by what a change on resume means.
TRAIN_KEYS: dict[str, frozenset[str]] = {
    "refused": frozenset(
        {
            "algorithm",
            "period",
            "optimizer",
            "overlap",
            "seed",
            "lr_schedule",
            "lr_warmup",
            "post_local_warmup",
            "lora",
            "replan_every",  # decides whether the schedule is the file's or the checkpoint's
            # The checkpoint holds anchors, momentum and residuals of exactly this arithmetic.
            "sync",
            "outer",
            "outer_lr",
            "outer_momentum",
            "compress",
            "compress_block",
            # Two-level keeps a site's ranks one replica; flat lets them drift: neither resumes the other.
            "hierarchy",
            "ranks_per_site",
        }
    ),
    # Written into the restored optimizer / LR schedule, or read from the config every iteration.
    "applied": frozenset({"lr", "weight_decay", "momentum", "grad_clip", "steps", "precision", "grad_accum"}),
    # No effect on the arithmetic of training: accepted with a notice.
    "operational": frozenset(
        {
            "bucket_cap_mb",
            "link",
            "eval_every",
            "eval_batches",
            "time_budget_s",
            "log",
            "timing_warmup",
            "timeout_s",
            "backend",
            "progress",
            "checkpoint_every",
            "checkpoint_keep",
            "checkpoint_average",
            "metrics_port",
            "metrics_addr",
            "trace",
            "trace_steps",
            "heartbeat_s",
            "anchor_device",  # where the anchors live, not what they are
        }
    ),
    # Compared elsewhere: the schedule by its content (a moved file is the same schedule), and the
    # checkpoint directory is the one being resumed from.
    # train.profile only seeds re-planning; the schedule in force is in the checkpoint.
    "not_compared": frozenset({"schedule", "checkpoint_dir", "profile"}),
}


@dataclass
class ResumeChanges:
    """The differences between the checkpoint's config and this run's, as ``key old → new`` lines."""

    refused: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    applied_keys: set[str] = field(default_factory=set)  # train.* hyperparameters to write into the optimizer


def _change(key: str, old: Any, new: Any) -> str:
    return f"{key} {old!r} → {new!r}"


def _normalised_model(model: dict[str, Any]) -> dict[str, Any]:
    """Every model option with its default filled in: ``d_model`` left out and ``d_model=128`` can be equal."""
    options = {k: v for k, v in model.items() if k != "name"}
    try:
        return {"name": model.get("name"), **dataclasses.asdict(model_config(str(model.get("name")), options))}
    except (ValueError, TypeError):
        return dict(model)  # a model this version does not know: compare what was written


def compare_configs(saved: dict[str, Any], current: dict[str, Any]) -> ResumeChanges:
    """Classify every difference between the saved run's ``to_dict()`` config and this one."""
    changes = ResumeChanges()
    old_model, new_model = _normalised_model(saved.get("model", {})), _normalised_model(current.get("model", {}))
    for key in sorted(set(old_model) | set(new_model)):
        if old_model.get(key) != new_model.get(key):
            changes.refused.append(_change(f"model.{key}", old_model.get(key), new_model.get(key)))
    defaults = {"data": dataclasses.asdict(DataConfig()), "train": dataclasses.asdict(TrainConfig())}
    for section in ("data", "train"):
        # A key this version added is compared against its default (what the old run ran with).
        old, new = {**defaults[section], **saved.get(section, {})}, current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if (section == "train" and key in TRAIN_KEYS["not_compared"]) or old.get(key) == new.get(key):
                continue
            line = _change(f"{section}.{key}", old.get(key), new.get(key))
            if section == "data" or key in TRAIN_KEYS["refused"] or not _classified(key):
                changes.refused.append(line)
            else:
                changes.accepted.append(line)
                if key in TRAIN_KEYS["applied"]:
                    changes.applied_keys.add(key)
    return changes


def _classified(key: str) -> bool:
    return any(key in keys for keys in TRAIN_KEYS.values())


def apply_hyperparameters(
    keys: set[str],
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> None:
    """Write this run's ``keys`` (lr, weight_decay, momentum; steps moves the LR schedule) over what the checkpoint restored.

    ``optimizer.load_state_dict`` restores the saved run's values into every param group, and
    the LR schedule its base LR: without this a changed ``train.lr`` would be silently ignored.
    ``grad_clip`` and ``steps`` are read from the config as the run goes and need nothing here.
    """
    for group in optimizer.param_groups:
        if "weight_decay" in keys:
            group["weight_decay"] = cfg.weight_decay
        if "momentum" in keys and "momentum" in group:
            group["momentum"] = cfg.momentum
    if not keys & {"lr", "steps"}:
        return
    if lr_scheduler is None:
        if "lr" in keys:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr
        return
    if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"cannot apply a changed train.lr to a {type(lr_scheduler).__name__}")
    # A new base LR, or a new train.steps (the cosine reaches 0 there): the LR of the iteration
    # about to run is recomputed now, not one scheduler step later.
    if "lr" in keys:
        lr_scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * factor(lr_scheduler.last_epoch)

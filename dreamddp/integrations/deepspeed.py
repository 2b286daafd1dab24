"""DreamDDP inside a DeepSpeed engine: scheduled parameter averaging instead of DeepSpeed's gradient all-reduce.

Teams that train through ``deepspeed.initialize`` keep their loop — ``engine(x)``,
``engine.backward(loss)``, ``engine.step()``, ``save_checkpoint``/``load_checkpoint`` — and
``wrap(engine, schedule)`` changes only what the engine communicates:

- DeepSpeed's gradient all-reduce is switched off (``engine.enable_backward_allreduce``, the
  switch DeepSpeed's compressed-communication optimizers flip for the same reason);
- a ``DreamDDP`` is built on ``engine.module`` over the engine's data-parallel group. It is the
  same wrapper as without DeepSpeed — same hooks, buckets and waits — so the scheduled units'
  parameters are averaged in place from backward, and the engine's optimizer then applies each
  rank's *local* gradient;
- gradient accumulation follows the engine: only the backward of the boundary micro-step
  averages (and moves DreamDDP's iteration counter); inside ``engine.no_sync()`` nothing is sent;
- gradient clipping uses this rank's own gradient norm, as plain DreamDDP does. DeepSpeed's fp32
  clipping averages the norm over the data-parallel group: a blocking collective every step
  (one WAN round trip) that would also tie each rank's clipping to the others' gradients;
- checkpoints carry the iteration counter as client state, plus each rank's own weights and
  optimizer state: under local SGD the ranks differ between averages, while DeepSpeed's ZeRO-0
  checkpoint holds rank 0's copy only, and resuming from it would discard the others' progress.

What cannot work is refused at wrap time with one line saying why; see ``check_supported``.
The model's storage is laid out flat by ``DreamDDP`` (same ``Parameter`` objects, ``.data``
repointed), which is compatible with an optimizer that holds those parameters directly — the
only kind of optimizer ``check_supported`` lets through.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
except ImportError as err:  # pragma: no cover - exercised only where deepspeed is missing
    raise ImportError(
        f"dreamddp.integrations.deepspeed needs DeepSpeed ({err}); install it with: pip install 'dreamddp[deepspeed]'"
    ) from err

from dreamddp.core.ddp import DreamDDP
from dreamddp.core.schedule import Schedule
from dreamddp.core.units import sync_units
from dreamddp.emulation.link import SimulatedLink, link_from_settings
from dreamddp.ops.checkpoint import save_atomic
from dreamddp.validation import is_int, positive_int, positive_number, require

__all__ = ["CLIENT_STATE_KEY", "CONFIG_SECTION", "check_supported", "initialize", "wrap"]

logger = logging.getLogger(__name__)

CONFIG_SECTION = "dreamddp"  # the DeepSpeed config section ``initialize`` reads
CLIENT_STATE_KEY = "dreamddp"  # where the iteration counter rides in DeepSpeed's client state
_SECTION_KEYS = ("period", "schedule", "bucket_cap_mb", "link", "broadcast_from_rank0", "hierarchy")
_LOCAL_STATE_FORMAT = "dreamddp.deepspeed-rank/1"
# Optimizers that synchronise on their own inside step() (compressed momentum all-reduce):
# they are a replacement for gradient averaging, not a local optimizer.
_SELF_SYNCING_OPTIMIZERS = ("OnebitAdam", "ZeroOneAdam", "OnebitLamb")


def _local_state_name(rank: int) -> str:
    return f"dreamddp-rank-{rank:05d}.pt"


def check_supported(engine: DeepSpeedEngine) -> None:
    """Raise ``ValueError`` (one line, saying why) unless DreamDDP can run inside ``engine``.

    DreamDDP needs every rank to hold the whole model and the whole optimizer state, step
    with its own gradient, and average parameters now and then. Refused, because that premise
    does not hold:

    - ZeRO stage 1: optimizer state is partitioned — each rank updates only its slice of the
      weights from the reduced gradient and all-gathers the rest, so every weight is
      synchronised every step and there is nothing local to average (and its step needs the
      gradient reduction DreamDDP switches off);
    - ZeRO stage 2 / 3: gradients / parameters are partitioned — no rank has a full local
      gradient or a full local copy of the model;
    - DeepSpeed's fp16/bf16 optimizers: they keep fp32 master weights, so averaging the
      low-precision model would be overwritten from the un-averaged master at the next step;
    - optimizers that synchronise inside ``step()`` (1-bit / 0-1 Adam, 1-bit Lamb);
    - model, pipeline, sequence or expert parallelism, DeepCompile, and unmanaged gradient
      accumulation (its boundary is only known inside ``step()``, after the backward in which
      DreamDDP averages).
    """
    stage = int(engine.zero_optimization_stage())
    if stage == 1:
        raise ValueError(
            "DreamDDP cannot run inside ZeRO stage 1: it partitions the optimizer state, so each rank updates only "
            "its 1/N of the weights and all-gathers the rest every step — every weight is synchronised every step and "
            "there are no local steps to average; use ZeRO stage 0 (zero_optimization.stage=0)"
        )
    if stage == 2:
        raise ValueError(
            "DreamDDP cannot run inside ZeRO stage 2: it partitions gradients across ranks, so no rank has its full "
            "local gradient to take a local step with; use ZeRO stage 0 (zero_optimization.stage=0)"
        )
    if stage >= 3:
        raise ValueError(
            f"DreamDDP cannot run inside ZeRO stage {stage}: it partitions the parameters across ranks, so no rank "
            "holds a full local copy of the model to step and average; use ZeRO stage 0 (zero_optimization.stage=0)"
        )
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is None or type(optimizer).__name__ == "DummyOptim":
        raise ValueError('DreamDDP needs a training engine: pass an optimizer (or an "optimizer" config section)')
    if optimizer is not getattr(engine, "basic_optimizer", optimizer):
        raise ValueError(
            f"DreamDDP cannot run with DeepSpeed's {type(optimizer).__name__}: it keeps fp32 master weights, so the "
            "averaged low-precision weights would be overwritten from the un-averaged master copy at the next step; "
            'drop the "bf16"/"fp16" section and use "torch_autocast" (fp32 weights) or a bf16 model'
        )
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"DreamDDP needs a torch.optim.Optimizer over the model's parameters, got {type(optimizer).__name__}"
        )
    if type(optimizer).__name__ in _SELF_SYNCING_OPTIMIZERS:
        raise ValueError(
            f"DreamDDP cannot run with {type(optimizer).__name__}: it all-reduces compressed momentum inside every "
            "step(), which is gradient synchronisation again; use a local optimizer such as Adam or SGD"
        )
    if getattr(engine, "mpu", None) is not None or _is_pipeline(engine):
        raise ValueError(
            "DreamDDP inside DeepSpeed supports data parallelism only: with model or pipeline parallelism the gradient "
            "norm spans model-parallel ranks and the sync units differ per stage (untested); run without an mpu"
        )
    if getattr(engine, "has_moe_layers", False):
        raise ValueError(
            "DreamDDP inside DeepSpeed does not support MoE layers: expert parameters are replicated over a separate "
            "expert-data-parallel group that DreamDDP would not average"
        )
    group = engine.data_parallel_group
    seq_group = getattr(engine, "seq_data_parallel_group", None) or group
    if group is not None and seq_group is not group and dist.get_world_size(seq_group) != dist.get_world_size(group):
        raise ValueError(
            "DreamDDP inside DeepSpeed does not support sequence parallelism: replicas then span the sequence-data-"
            "parallel group, not the data-parallel group DreamDDP averages over"
        )
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if managed is not None and not managed():
        raise ValueError(
            "DreamDDP needs managed_gradient_accumulation=true: with it false the accumulation boundary is known only "
            "inside step(), after the backward in which DreamDDP must average"
        )
    deepcompile = getattr(engine, "is_deepcompile_enabled", None)
    if deepcompile is not None and deepcompile():
        raise ValueError(
            "DreamDDP cannot run with DeepCompile: it replaces the engine's backward communication with compiled "
            'graph passes that DreamDDP\'s hooks do not see; disable "compile"."deepcompile"'
        )


def wrap(
    engine: DeepSpeedEngine,
    schedule: Schedule | int,
    *,
    bucket_cap_mb: float = 25.0,
    link: SimulatedLink | None = None,
    broadcast_from_rank0: bool = True,
) -> DeepSpeedEngine:
    """Make ``engine`` average parameters on ``schedule`` instead of all-reducing gradients.

    ``schedule`` is a ``Schedule`` (e.g. from ``dreamddp plan``) or a period H, which means
    PLSGD's H contiguous groups of about equal bytes. The engine is changed in place and
    returned, so ``engine = wrap(engine, schedule)`` fits into an existing loop; the
    ``DreamDDP`` doing the work is ``engine.dreamddp`` (``average_all()`` before evaluation,
    ``iteration``, ``last_stats``). It is kept out of ``engine``'s module tree, so
    ``engine.state_dict()`` and parameter names do not change.

    Call it on every rank, right after ``deepspeed.initialize``; like ``DreamDDP`` it checks
    in one collective that all ranks have the same units and schedule.
    """
    if not isinstance(engine, DeepSpeedEngine):
        raise TypeError(f"wrap() takes a DeepSpeed engine (from deepspeed.initialize), got {type(engine).__name__}")
    if "dreamddp" in engine.__dict__:
        raise ValueError("this DeepSpeed engine is already wrapped by DreamDDP")
    check_supported(engine)
    if is_int(schedule):
        schedule = Schedule.plsgd(sync_units(engine.module), schedule)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a dreamddp.Schedule or a period (int), got {type(schedule).__name__}")
    overlap = getattr(schedule, "overlap", "backward")
    if overlap != "backward":
        raise ValueError(
            f"schedule overlap {overlap!r} is not supported inside DeepSpeed: the engine calls the model "
            "itself, never DreamDDP's forward, so averages can only be completed at the end of backward"
        )
    if engine.data_parallel_group is None or not dist.is_initialized():
        raise RuntimeError("DreamDDP needs torch.distributed initialised: launch with deepspeed or torchrun")
    ddp = DreamDDP(
        engine.module,
        schedule,
        process_group=engine.data_parallel_group,
        bucket_cap_mb=bucket_cap_mb,
        link=link,
        broadcast_from_rank0=broadcast_from_rank0,
    )
    _EngineAdapter(engine, ddp)
    return engine


class _EngineAdapter:
    """The few places where a DeepSpeed engine and DreamDDP meet; installed by ``wrap``.

    Everything it replaces is an attribute of this one engine instance (DeepSpeed's class is
    untouched): the gradient all-reduce switch, fp32 clipping, and checkpoint save/load.

    The engine calls ``engine.module`` itself, never ``DreamDDP.forward``, so a forward pre-hook
    on the module runs ``DreamDDP.prepare_forward()`` instead: a backward that raised half-way
    is drained, and storage moved after ``wrap`` is laid out again.
    """

    def __init__(self, engine: DeepSpeedEngine, ddp: DreamDDP) -> None:
        self.engine = engine
        self.ddp = ddp
        self.group = engine.data_parallel_group
        self._paused: contextlib.AbstractContextManager | None = None  # ddp.no_sync() while entered
        self._save = engine.save_checkpoint
        self._load = engine.load_checkpoint
        engine.enable_backward_allreduce = False
        self._forward_hook = engine.module.register_forward_pre_hook(self._before_forward)
        # Plain attributes on the instance (object.__setattr__: a Module value must not become a
        # submodule of the engine, which would change its state_dict and parameter names).
        object.__setattr__(engine, "dreamddp", ddp)
        object.__setattr__(engine, "clip_fp32_gradients", self.clip_local_gradients)
        object.__setattr__(engine, "save_checkpoint", self.save_checkpoint)
        object.__setattr__(engine, "load_checkpoint", self.load_checkpoint)

    # ------------------------------------------------------------ training
    def _before_forward(self, _module: nn.Module, _args: Any) -> None:
        """Decide, per micro-step, whether the coming backward averages.

        DeepSpeed knows the accumulation boundary before the micro-step's forward (its counter
        moves in ``step()``), and DreamDDP reads its switch when gradients become ready, so the
        decision is made here and holds through the backward that follows.
        """
        self.ddp.prepare_forward()  # drain a backward that raised, re-lay out moved storage
        engine = self.engine
        sync = engine.is_gradient_accumulation_boundary() and not getattr(engine, "inside_no_sync_ctxt", False)
        if sync and self._paused is not None:
            self._paused.__exit__(None, None, None)
            self._paused = None
        elif not sync and self._paused is None:
            self._paused = self.ddp.no_sync()
            self._paused.__enter__()

    def clip_local_gradients(self) -> torch.Tensor:
        """DeepSpeed's fp32 clipping, with the norm of this rank's own gradient.

        The gradients are local (nothing averaged them), so their norm differs per rank; this
        is what plain DreamDDP with ``clip_grad_norm_`` does, and it sends nothing.
        """
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        return nn.utils.clip_grad_norm_(params, self.engine.gradient_clipping())

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, save_dir: str, tag: Any = None, client_state: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        """DeepSpeed's ``save_checkpoint``, plus the counter and every rank's local state.

        Each rank writes its weights, optimizer state and DreamDDP state to
        ``<save_dir>/<tag>/dreamddp-rank-NNNNN.pt`` first; DeepSpeed then writes its files and
        ``latest`` last, so ``latest`` never points at a checkpoint missing a rank.
        """
        if tag is None:
            tag = f"global_step{self.engine.global_steps}"  # DeepSpeed's default, fixed before we write
        state = dict(client_state or {})
        if CLIENT_STATE_KEY in state:
            raise ValueError(f"client_state key {CLIENT_STATE_KEY!r} is reserved for DreamDDP's iteration counter")
        state[CLIENT_STATE_KEY] = self.ddp.get_extra_state()
        rank = dist.get_rank(self.group)
        local = {
            "format": _LOCAL_STATE_FORMAT,
            "rank": rank,
            "world_size": dist.get_world_size(self.group),
            "dreamddp": self.ddp.get_extra_state(),
            "module": self.engine.module.state_dict(),
            "optimizer": self.engine.optimizer.state_dict(),
        }
        tag_dir = Path(save_dir) / str(tag)
        tag_dir.mkdir(parents=True, exist_ok=True)
        save_atomic(local, tag_dir / _local_state_name(rank))
        dist.barrier(group=self.group)
        return self._save(save_dir, tag, client_state=state, **kwargs)

    def load_checkpoint(
        self,
        load_dir: str,
        tag: Any = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
        **kwargs: Any,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """DeepSpeed's ``load_checkpoint``, then this rank's own state and the counter.

        ``load_module_only=True`` keeps DeepSpeed's meaning — a warm start from rank 0's
        weights — and leaves the counter alone. A checkpoint written without DreamDDP loads as
        DeepSpeed would load it.
        """
        path, client = self._load(
            load_dir,
            tag,
            load_module_strict=load_module_strict,
            load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states,
            load_module_only=load_module_only,
            **kwargs,
        )
        if path is None:
            return path, client
        client = dict(client or {})
        counter = client.pop(CLIENT_STATE_KEY, None)
        if load_module_only:
            return path, client
        tag_dir = Path(load_dir) / str(tag if tag is not None else (Path(load_dir) / "latest").read_text().strip())
        local = self._agreed_local_state(tag_dir)
        if local is not None:
            self._load_local_state(local, load_module_strict, load_optimizer_states)
        elif counter is not None:
            self.ddp.set_extra_state(counter)
            logger.warning(
                "checkpoint %s has DreamDDP's counter but no per-rank files: every rank resumes from rank 0's weights",
                tag_dir,
            )
        return path, client

    def _agreed_local_state(self, tag_dir: Path) -> dict[str, Any] | None:
        """This rank's own state file, read and checked; the same answer (or error) on every rank.

        Each rank looks only for its own file, so node-local checkpoint storage works (each
        node sees its own ranks' files). Whether to use them is decided together: a rank that
        raised alone would leave the others waiting in their first collective.
        """
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        path = tag_dir / _local_state_name(rank)
        state, problem = None, None
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(state, dict) or state.get("format") != _LOCAL_STATE_FORMAT:
                    problem = f"{path} is not a DreamDDP rank state"
                elif state.get("world_size") != world:
                    problem = (
                        f"checkpoint {tag_dir} was written by {state.get('world_size')} ranks, this run has "
                        f"{world}; load it with load_module_only=True to start every rank from rank 0's weights"
                    )
            except (OSError, RuntimeError, ValueError, EOFError) as err:
                problem = f"{path} cannot be read ({err})"
        found: list[Any] = [None] * world
        dist.all_gather_object(found, (state is not None, problem), group=self.group)
        for other, (_, theirs) in enumerate(found):
            if theirs is not None:
                raise ValueError(theirs if other == rank else f"rank {other}: {theirs}")
        missing = [r for r, (has, _) in enumerate(found) if not has]
        if missing and len(missing) < world:
            raise ValueError(
                f"checkpoint {tag_dir} has no DreamDDP state for rank(s) "
                f"{', '.join(map(str, missing))} ({_local_state_name(missing[0])}): every rank's local "
                "state is needed; load it with load_module_only=True to start from rank 0's weights"
            )
        return state

    def _load_local_state(self, state: dict[str, Any], strict: bool, load_optimizer: bool) -> None:
        self.ddp.set_extra_state(state["dreamddp"])  # may re-lay the storage out: load the weights after it
        self.engine.module.load_state_dict(state["module"], strict=strict)
        if load_optimizer:
            self.engine.optimizer.load_state_dict(state["optimizer"])


def initialize(
    args: Any = None, *, config: Mapping[str, Any] | str | os.PathLike[str] | None = None, **kwargs: Any
) -> tuple[DeepSpeedEngine, Any, Any, Any]:
    """``deepspeed.initialize``, then ``wrap`` as the config's ``"dreamddp"`` section says.

    The section (removed before DeepSpeed sees the config)::

        "dreamddp": {"period": 8}                      # PLSGD's 8 groups of equal bytes
        "dreamddp": {"schedule": "schedule.json"}      # a plan from `dreamddp plan`
        optional: "bucket_cap_mb", "link" ("100mbit,20ms": a simulated link),
                  "broadcast_from_rank0"

    Given both, ``period`` must equal the schedule's period. A relative schedule path is read
    from the config file's directory (from the working directory when ``config`` is a dict).
    The config may also come as ``args.deepspeed_config`` (the ``--deepspeed_config`` flag).
    Without a section this is plain ``deepspeed.initialize``. Returns its four values.
    """
    if config is None and getattr(args, "deepspeed_config", None):
        config, args = args.deepspeed_config, copy.copy(args)
        args.deepspeed_config = None
    base = Path.cwd()
    if isinstance(config, (str, os.PathLike)):
        base = Path(config).resolve().parent
        config = _read_config(Path(config))
    if isinstance(config, Mapping):
        config = dict(config)
        section = config.pop(CONFIG_SECTION, None)
    else:
        section = None
    options = _parse_section(section, base) if section is not None else None
    engine, optimizer, loader, lr_scheduler = deepspeed.initialize(args=args, config=config, **kwargs)
    if options is not None:
        schedule = options.pop("schedule")
        link = link_from_settings(options.pop("link"), dist.get_world_size(engine.data_parallel_group))
        wrap(engine, schedule, link=link, **options)
    return engine, optimizer, loader, lr_scheduler


def _parse_section(section: Any, base: Path) -> dict[str, Any]:
    """Check the ``"dreamddp"`` section before DeepSpeed starts; every error names the key."""
    where = f"DeepSpeed config section {CONFIG_SECTION!r}"
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be an object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(_SECTION_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_SECTION_KEYS)})")
    period = section.get("period")
    if period is not None:
        positive_int(f"{where}: period", period)
    schedule: Schedule | int | None = period
    if section.get("schedule") is not None:
        if not isinstance(section["schedule"], str):
            raise ValueError(f"{where}: schedule must be a path to a schedule JSON file, got {section['schedule']!r}")
        path = Path(section["schedule"])
        schedule = Schedule.from_json(path if path.is_absolute() else base / path)
        if period is not None and period != schedule.period:
            raise ValueError(f"{where}: period {period} differs from the period {schedule.period} of {path}")
    if schedule is None:
        raise ValueError(f'{where} needs "period" or "schedule"')
    bucket = positive_number(f"{where}: bucket_cap_mb", section.get("bucket_cap_mb", 25.0))
    link = section.get("link", "")
    require(isinstance(link, str), f"{where}: link", "a string such as '100mbit,20ms'", link)
    broadcast = section.get("broadcast_from_rank0", True)
    require(isinstance(broadcast, bool), f"{where}: broadcast_from_rank0", "true or false", broadcast)
    hierarchy = section.get("hierarchy", "flat")
    if hierarchy != "flat":  # named so that asking for two levels is refused, not ignored
        raise ValueError(
            f"{where}: hierarchy {hierarchy!r} is not supported by the DeepSpeed adapter yet (it runs every rank "
            'as its own replica); use "flat", or the trainer\'s train.hierarchy for two-level synchronization'
        )
    return {"schedule": schedule, "bucket_cap_mb": float(bucket), "link": link, "broadcast_from_rank0": broadcast}


def _read_config(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed config file: JSON, or the HJSON DeepSpeed itself accepts."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        import hjson  # a dependency of deepspeed; only needed for configs that are not plain JSON

        return hjson.loads(text)


def _is_pipeline(engine: DeepSpeedEngine) -> bool:
    try:
        from deepspeed.runtime.pipe.engine import PipelineEngine
    except ImportError:  # pragma: no cover - layout of older releases
        return False
    return isinstance(engine, PipelineEngine)

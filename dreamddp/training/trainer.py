"""The training entry point: ``torchrun --nproc-per-node N -m dreamddp.train --config C.toml``.

One loop for every algorithm (see ``algorithms.py``): forward, backward, optimizer step,
then the strategy's after-step communication. Rank 0 writes one JSON line per iteration
(loss, iteration time, time blocked on communication, bytes sent) and a final summary with
every rank's timing and peak memory, and shows a progress bar. Validation loss is measured on
the averaged model; mid-run evaluations average a snapshot and restore it, so evaluating
never changes the training trajectory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dreamddp.core.collectives import average_tensors
from dreamddp.core.schedule import Schedule
from dreamddp.core.units import sync_units
from dreamddp.emulation.link import describe_link, link_from_settings
from dreamddp.ops.checkpoint import Checkpointer, CheckpointError, capture_rng, restore_rng, unit_signatures
from dreamddp.ops.failures import FaultPlan, Heartbeat, PeerFailure, Terminated, install_sigterm, is_communication_error
from dreamddp.ops.metrics import IterationSample, TrainingMetrics
from dreamddp.ops.outputs import check_writable
from dreamddp.ops.trace import IterationMarks, TraceRecorder
from dreamddp.training.config import ExperimentConfig, load_config
from dreamddp.training.data import build_data
from dreamddp.training.models import build_model, model_task
from dreamddp.training.strategies import Strategy, build_lr_scheduler, build_strategy

__all__ = ["init_process_group", "loss_for_task", "main", "run"]


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line like every other bad input, not usage plus error.

    Under torchrun every rank prints its errors; a usage block per rank buries the one line
    that says what was wrong.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="dreamddp train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config file (configs/*.toml); defaults apply without one")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.algorithm=ssgd --set train.link=100mbit,20ms",
    )
    for flag, key, meta, text in _SHORTCUTS:
        parser.add_argument(flag, dest=key, metavar=meta, help=f"{text} (same as --set train.{key}=...)")
    return parser.parse_args(argv)


_SHORTCUTS = (
    ("--checkpoint-dir", "checkpoint_dir", "DIR", "write per-rank checkpoints here and resume from the latest"),
    ("--checkpoint-every", "checkpoint_every", "N", "iterations between checkpoints"),
    ("--metrics-port", "metrics_port", "PORT", "serve Prometheus metrics on PORT + LOCAL_RANK"),
    ("--trace", "trace", "OUT.json", "write a Chrome/Perfetto trace of real iterations"),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    for _, key, _, _ in _SHORTCUTS:
        value = getattr(args, key)
        if value is not None:
            overrides.append(
                f"train.{key}={value}" if key not in ("checkpoint_dir", "trace") else f"train.{key}={json.dumps(value)}"
            )
    try:
        cfg = load_config(args.config, overrides)
        FaultPlan.from_env()
    except ValueError as err:
        print(f"dreamddp train: error: {err}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (PeerFailure, Stopped) as err:
        print(f"dreamddp train: error: {err}", file=sys.stderr, flush=True)
        return 143 if isinstance(err, Stopped) else 1
    except ValueError as err:  # bad input found once the job is up (paths, schedule, checkpoint, port)
        print(f"dreamddp train: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


_DEFAULT_NAMES = {"trace": "trace.json", "log": "train.jsonl"}  # suggested when a directory is given


def _check_paths(cfg: ExperimentConfig) -> None:
    """Output paths must be writable before training starts, not when it ends."""
    tc = cfg.train
    for key in ("trace", "checkpoint_dir", "log"):
        value = getattr(tc, key)
        if not value:
            continue
        if key != "checkpoint_dir" and Path(value).is_dir():
            raise ValueError(
                f"train.{key} {value!r} is a directory; give a file path such as "
                f"{str(Path(value) / Path(_DEFAULT_NAMES[key]))!r}"
            )
        check_writable(f"train.{key}", value, Path(value) if key == "checkpoint_dir" else None)


def _check_schedule(cfg: ExperimentConfig, model: nn.Module, world: int) -> None:
    """The schedule file must be readable here and fit this model and world size.

    Checked before the wrapper is built and under ``_agree``: a file that only one node
    cannot read would otherwise fail that rank alone while the others wait in the wrapper's
    agreement collective until the process-group timeout.
    """
    tc = cfg.train
    if tc.algorithm != "dreamddp" or not tc.schedule:
        return
    schedule = Schedule.from_json(tc.schedule)  # its errors name the file
    planned_for = schedule.metadata.get("world_size")
    if isinstance(planned_for, int) and planned_for != world:
        # Ring all-reduce costs scale with (n-1)/n: a plan for another world size is a plan for another job.
        raise ValueError(
            f"schedule file {tc.schedule!r} was planned for world_size {planned_for}, but this job's "
            f"world size is {world}: profile and plan again with {world} rank(s)"
        )
    try:
        schedule.check_units([u.name for u in sync_units(model)])
    except ValueError as err:
        raise ValueError(f"schedule file {tc.schedule!r} does not fit model {cfg.model_name!r}: {err}") from None


class Stopped(RuntimeError):
    """This rank was told to stop (SIGTERM) in the middle of training."""


def run(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Train as configured; return the summary on rank 0 (None elsewhere)."""
    device = init_process_group(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    install_sigterm()
    heartbeat = Heartbeat(rank, world, cfg.train.heartbeat_s)
    metrics = None
    try:
        _agree(lambda: _check_paths(cfg), device)  # one rank's unwritable path stops every rank
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)  # every stream seeded: two runs of one config are the same run
        np.random.seed(cfg.train.seed)
        model = build_model(cfg.model_name, cfg.model_options).to(device)
        _agree(lambda: _check_schedule(cfg, model, world), device)
        task = model_task(cfg.model_name)
        data = build_data(
            cfg.data.name,
            batch_size=cfg.data.batch_size,
            seq_len=cfg.data.seq_len,
            vocab_size=cfg.model.get("vocab_size", 256),
            rank=rank,
            world_size=world,
            seed=cfg.train.seed,
            max_bytes=cfg.data.max_bytes,
        )
        link = link_from_settings(cfg.train.link, world)
        if link is not None and link.spec.latency_only and device.type == "cuda":
            # NCCL's futures complete at enqueue, so the real transfer time cannot be measured.
            raise SystemExit(
                f"dreamddp train: error: a latency-only link ({link.spec}) needs gloo; "
                "with NCCL use a full simulated link such as train.link=100mbit,20ms"
            )
        strategy = build_strategy(model, cfg.train, link)
        if cfg.train.metrics_port:
            port = cfg.train.metrics_port + int(os.environ.get("LOCAL_RANK", 0))
            metrics = _agree(
                lambda: TrainingMetrics(
                    port, cfg.train.metrics_addr, rank, unit="tokens" if task == "lm" else "samples"
                ),
                device,
            )
        try:
            summary = _train(cfg, strategy, data, task, device, link, heartbeat, metrics)
        finally:
            strategy.close()
            del strategy
            gc.collect()  # anything holding the process group must go before it is destroyed
        dist.barrier()
        return summary if rank == 0 else None
    finally:
        heartbeat.close()
        if metrics is not None:
            metrics.close()
        dist.destroy_process_group()


def _agree(build, device: torch.device):
    """Run ``build`` on every rank; if it fails anywhere, raise the first rank's error everywhere.

    Start-up checks that only one rank can fail (its port is taken, its checkpoint file is
    missing) must not leave the other ranks waiting in the next collective until the timeout.
    """
    try:
        result, problem = build(), None
    except ValueError as err:
        result, problem = None, str(err)
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    for r, p in enumerate(problems):
        if p is not None:
            if result is not None and hasattr(result, "close"):
                result.close()
            raise ValueError(p if r == dist.get_rank() else f"rank {r}: {p}")
    return result


def _resume(cfg: ExperimentConfig, strategy: Strategy, lr_scheduler, device: torch.device):
    """Load the latest checkpoint if there is one; returns (checkpointer, step, progress)."""
    tc = cfg.train
    if not tc.checkpoint_dir:
        return None, 0, {}
    checkpointer = Checkpointer.for_process_group(tc.checkpoint_dir, tc.checkpoint_keep)
    step = checkpointer.agreed_latest_step(device)
    if step is None:
        return checkpointer, 0, {}
    expect = {
        "units": unit_signatures(sync_units(strategy.raw_model)),
        "algorithm": tc.algorithm,
        "schedule": strategy.schedule_record(),
    }

    def load() -> dict[str, Any]:
        state = checkpointer.load(step, expect)
        if step > tc.steps:
            raise CheckpointError(
                f"checkpoint in {tc.checkpoint_dir!r} is at iteration {step}, past train.steps={tc.steps}"
            )
        return state

    state = _agree(load, device)
    strategy.load_checkpoint_state(state)
    if lr_scheduler is not None and state.get("lr_scheduler") is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    restore_rng(state["rng"])
    return checkpointer, step, dict(state.get("progress", {}))


def _checkpoint(
    checkpointer: Checkpointer,
    cfg: ExperimentConfig,
    strategy: Strategy,
    lr_scheduler,
    step: int,
    progress: dict[str, Any],
    data,
    loss_fn,
    device,
) -> None:
    tc = cfg.train
    state = {
        **strategy.checkpoint_state(),
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "rng": capture_rng(),
        "progress": progress,
        "algorithm": tc.algorithm,
        "units": unit_signatures(sync_units(strategy.raw_model)),
        "schedule": strategy.schedule_record(),
    }
    # The averaged model (for export) is written with the rest, before the commit mark.
    shared = {"averaged.pt": _averaged_state(strategy.raw_model)} if tc.checkpoint_average else None
    checkpointer.save(step, state, meta={"algorithm": tc.algorithm, "config": cfg.to_dict()}, shared=shared)


def _train(
    cfg: ExperimentConfig,
    strategy: Strategy,
    data,
    task: str,
    device: torch.device,
    link,
    heartbeat: Heartbeat,
    metrics: TrainingMetrics | None,
) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    tc = cfg.train
    lr_scheduler = build_lr_scheduler(tc, strategy.optimizer)
    checkpointer, start_step, progress = _resume(cfg, strategy, lr_scheduler, device)
    fault = FaultPlan.from_env()
    log = _RankZeroLog(tc.log if rank == 0 else None, append=start_step > 0)
    if start_step:
        log.write(
            {
                "event": "resume",
                "step": start_step,
                "checkpoint_dir": tc.checkpoint_dir,
                "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            }
        )
    else:
        log.write(
            {
                "event": "start",
                "config": cfg.to_dict(),
                "world_size": world,
                "device": str(device),
                "torch": torch.__version__,
                "link": describe_link(link),
                "note": strategy.note,
            }
        )
    loss_fn = loss_for_task(task)
    samples_per_step = cfg.data.batch_size * (cfg.data.seq_len if task == "lm" else 1) * world
    iter_times, waits, sent_total = [], [], 0
    train_time = float(progress.get("train_time_s", 0.0))  # training time excludes evaluation
    steps_done = tc.steps
    busy_before = link.stats.busy_s if link else 0.0
    tracer = TraceRecorder(tc.trace, max(start_step, tc.timing_warmup), tc.trace_steps) if tc.trace else None
    ddp = getattr(strategy, "ddp", None)
    bar = tqdm(
        total=tc.steps, initial=start_step, desc=tc.algorithm, disable=rank != 0 or not tc.progress, dynamic_ncols=True
    )
    step = start_step
    try:
        for step in range(start_step, tc.steps):
            heartbeat.iteration = step
            if fault is not None:
                fault.maybe_fire(rank, step)
            x, y = (t.to(device, non_blocking=True) for t in data.batch(step))
            t_start = time.perf_counter_ns()
            strategy.optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(strategy.model(x), y)
            t_forward = time.perf_counter_ns()
            loss.backward()
            t_backward = time.perf_counter_ns()
            if tc.grad_clip:
                nn.utils.clip_grad_norm_(strategy.raw_model.parameters(), tc.grad_clip)
            strategy.optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
            t_optimizer = time.perf_counter_ns()
            comm = strategy.after_step(step)
            if device.type == "cuda":
                # Once per iteration, outside every hook: honest timing. The compute stream only — a
                # whole-device sync would also wait for averages overlap="forward" leaves in flight.
                torch.cuda.current_stream(device).synchronize()
            t_end = time.perf_counter_ns()
            elapsed = (t_end - t_start) / 1e9
            loss_value = loss.item()
            if step >= tc.timing_warmup:
                iter_times.append(elapsed)
                if comm.wait_s is not None:
                    waits.append(comm.wait_s)
            sent_total += comm.bytes_sent
            if tracer is not None and tracer.wants(step):
                stats = ddp.last_stats if ddp is not None else None
                tracer.add(
                    IterationMarks(
                        step,
                        step % max(tc.period, 1),
                        t_start,
                        t_forward,
                        t_backward,
                        t_optimizer,
                        t_end,
                        backward_wait_s=stats.backward_wait_s if stats else 0.0,
                        after_step_wait_s=0.0 if ddp is not None else (comm.wait_s or 0.0),
                        forward_events=list(stats.forward_events) if stats else [],
                    )
                )
            if metrics is not None:
                metrics.observe(
                    IterationSample(
                        iteration=step,
                        iteration_s=elapsed,
                        exposed_comm_s=comm.wait_s,
                        hidden_comm_s=_hidden_comm_s(ddp, comm),
                        bytes_sent=comm.bytes_sent,
                        units_synced=comm.units_synced,
                        loss=loss_value,
                        throughput=samples_per_step / elapsed,
                    )
                )
            log.write(
                {
                    "step": step,
                    "loss": loss_value,
                    "iter_s": elapsed,
                    "comm_wait_s": comm.wait_s,
                    "bytes_sent": comm.bytes_sent,
                    "throughput": samples_per_step / elapsed,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", it_s=f"{elapsed:.3f}")
            train_time += elapsed
            if (
                checkpointer is not None
                and tc.checkpoint_every
                and (step + 1) % tc.checkpoint_every == 0
                and step + 1 < tc.steps
            ):
                _checkpoint(
                    checkpointer,
                    cfg,
                    strategy,
                    lr_scheduler,
                    step + 1,
                    {"train_time_s": train_time},
                    data,
                    loss_fn,
                    device,
                )
            if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
                strategy.flush()
                val = _evaluate_averaged(strategy.raw_model, data, loss_fn, tc.eval_batches, device)
                log.write({"step": step, "val_loss": val, "time_s": train_time})
                if tc.time_budget_s and _rank_zero_value(train_time, device) >= tc.time_budget_s:
                    steps_done = step + 1
                    break  # every rank decides on rank 0's clock, so all stop at the same step
    except Terminated as sig:
        how = f"{sig} from the launcher, which stops every rank when one fails"
        if world > 1:
            raise Stopped(str(heartbeat.diagnose(step, how))) from None
        raise Stopped(f"rank {rank} stopped at iteration {step} ({how})") from None
    except RuntimeError as err:
        if world > 1 and is_communication_error(err):
            raise heartbeat.diagnose(step, err) from None
        raise
    finally:
        bar.close()
    if checkpointer is not None:
        _checkpoint(
            checkpointer, cfg, strategy, lr_scheduler, steps_done, {"train_time_s": train_time}, data, loss_fn, device
        )
    if tracer is not None:
        tracer.write(ddp.observed_timings() if ddp is not None else [], tc.algorithm)
    channel_busy = (link.stats.busy_s - busy_before) if link else None
    steps_run = max(1, steps_done - start_step)
    strategy.finish()
    val_loss = _evaluate(strategy.raw_model, data, loss_fn, tc.eval_batches, device)
    mine = {
        "rank": rank,
        "iter_s_mean": statistics.fmean(iter_times) if iter_times else None,
        "iter_s_median": statistics.median(iter_times) if iter_times else None,
        "comm_wait_s_mean": statistics.fmean(waits) if waits else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        "bytes_sent": sent_total,
        "channel_busy_s": channel_busy,
    }
    ranks: list[Any] = [None] * world
    dist.all_gather_object(ranks, mine)
    if rank != 0:
        return None
    summary = {
        "algorithm": tc.algorithm,
        "world_size": world,
        "steps": steps_done,
        "resumed_from": start_step,
        "train_time_s": train_time,
        "period": tc.period,
        "link": describe_link(link),
        "iter_s": max(r["iter_s_mean"] or 0.0 for r in ranks),  # the slowest rank sets the pace
        "iter_s_median": ranks[0]["iter_s_median"],
        "comm_wait_s": ranks[0]["comm_wait_s_mean"],
        "channel_busy_s_per_iter": (channel_busy / steps_run) if channel_busy is not None else None,
        "bytes_per_iter": sent_total / steps_run,
        "throughput": samples_per_step / max(r["iter_s_mean"] or float("inf") for r in ranks),
        "final_loss": loss_value if steps_done > start_step else None,
        "val_loss": val_loss,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "ranks": ranks,
        "note": strategy.note,
    }
    log.write({"event": "summary", "summary": summary})
    log.close()
    return summary


def _hidden_comm_s(ddp, comm) -> float | None:
    """Communication time that overlapped compute: the buckets' busy span minus the wait."""
    if ddp is None:
        return 0.0 if comm.wait_s is not None else None
    observed = ddp.observed_timings()
    if not observed or observed[-1].iteration != ddp.iteration - 1 or not observed[-1].buckets:
        return 0.0
    spans = sorted((b.launch_s, b.done_s) for b in observed[-1].buckets)
    busy, end = 0.0, float("-inf")
    for start, done in spans:  # length of the union of the buckets' intervals
        if done > end:
            busy += done - max(start, end)
            end = done
    return max(0.0, busy - (comm.wait_s or 0.0))


def _averaged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The averaged model's state dict (every rank takes part), leaving each rank's own weights."""
    tensors = [t for u in sync_units(model) for t in u.tensors]
    snapshot = [t.clone() for t in tensors]
    average_tensors(tensors)
    try:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        with torch.no_grad():
            for t, saved in zip(tensors, snapshot):
                t.copy_(saved)


def _rank_zero_value(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank (a stop decision all ranks must share)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _evaluate_averaged(model: nn.Module, data, loss_fn, n_batches: int, device) -> float:
    """Validation loss of the averaged model, leaving each rank's own weights as they were.

    Units are read now, not at start-up: DreamDDP may have re-laid its storage since, and a
    buffer list taken earlier would point at tensors the model no longer uses.
    """
    tensors = [t for u in sync_units(model) for t in u.tensors]
    snapshot = [t.clone() for t in tensors]
    average_tensors(tensors)
    try:
        return _evaluate(model, data, loss_fn, n_batches, device)
    finally:
        with torch.no_grad():
            for t, saved in zip(tensors, snapshot):
                t.copy_(saved)


@torch.no_grad()
def _evaluate(model: nn.Module, data, loss_fn, n_batches: int, device) -> float:
    was_training = model.training
    model.eval()
    try:
        losses = [loss_fn(model(x.to(device)), y.to(device)).item() for x, y in data.eval_batches(n_batches)]
    finally:
        model.train(was_training)
    return statistics.fmean(losses)


def loss_for_task(task: str):
    if task == "lm":
        return lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return nn.functional.cross_entropy


def init_process_group(cfg: ExperimentConfig) -> torch.device:
    """Join the torchrun job (or run alone when started without torchrun)."""
    backend = cfg.train.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("dreamddp train: error: train.backend='nccl' needs CUDA, and none is available")
    timeout = timedelta(seconds=cfg.train.timeout_s)
    if "RANK" in os.environ:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE") if not os.environ.get(v)]
        if missing:
            raise ValueError(
                f"environment variable {missing[0]} is not set, but RANK is: start the trainer with "
                "torchrun, or set MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE together"
            )
    if "RANK" not in os.environ:
        # Started as a plain process: a world of one on a private loopback port.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class _RankZeroLog:
    """JSON lines written by rank 0 only; other ranks hold a closed log."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self._file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


if __name__ == "__main__":
    sys.exit(main())

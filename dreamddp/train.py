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
import json
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .algorithms import Strategy, build_strategy
from .comm import average_tensors, describe_link, link_from_settings
from .config import ExperimentConfig, load_config
from .data import build_data
from .models import build_model, model_task
from .units import sync_units

__all__ = ["init_process_group", "loss_for_task", "main", "run"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dreamddp train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML config file (configs/*.toml); defaults apply without one")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.algorithm=ssgd --set train.link=100mbit,20ms",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
    except ValueError as err:
        print(f"dreamddp train: error: {err}", file=sys.stderr)
        return 2
    run(cfg)
    return 0


def run(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Train as configured; return the summary on rank 0 (None elsewhere)."""
    device = init_process_group(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model_name, cfg.model_options).to(device)
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
            raise SystemExit(f"dreamddp train: error: a latency-only link ({link.spec}) needs gloo; "
                             "with NCCL use a full simulated link such as train.link=100mbit,20ms")
        strategy = build_strategy(model, cfg.train, link)
        try:
            summary = _train(cfg, strategy, data, task, device, link)
        finally:
            strategy.close()
            del strategy
        dist.barrier()
        return summary if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _train(cfg: ExperimentConfig, strategy: Strategy, data, task: str, device: torch.device, link) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    tc = cfg.train
    log = _RankZeroLog(tc.log if rank == 0 else None)
    log.write({"event": "start", "config": cfg.to_dict(), "world_size": world, "device": str(device),
               "torch": torch.__version__, "link": describe_link(link),
               "note": strategy.note})
    loss_fn = loss_for_task(task)
    samples_per_step = cfg.data.batch_size * (cfg.data.seq_len if task == "lm" else 1) * world
    iter_times, waits, sent_total = [], [], 0
    train_time, steps_done = 0.0, tc.steps  # training time excludes evaluation
    busy_before = link.stats.busy_s if link else 0.0
    bar = tqdm(total=tc.steps, desc=tc.algorithm, disable=rank != 0 or not tc.progress, dynamic_ncols=True)
    for step in range(tc.steps):
        x, y = (t.to(device, non_blocking=True) for t in data.batch(step))
        start = time.perf_counter()
        strategy.optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(strategy.model(x), y)
        loss.backward()
        if tc.grad_clip:
            nn.utils.clip_grad_norm_(strategy.raw_model.parameters(), tc.grad_clip)
        strategy.optimizer.step()
        comm = strategy.after_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # once per iteration, outside every hook: honest timing
        elapsed = time.perf_counter() - start
        loss_value = loss.item()
        if step >= tc.timing_warmup:
            iter_times.append(elapsed)
            if comm.wait_s is not None:
                waits.append(comm.wait_s)
        sent_total += comm.bytes_sent
        log.write({"step": step, "loss": loss_value, "iter_s": elapsed, "comm_wait_s": comm.wait_s,
                   "bytes_sent": comm.bytes_sent, "throughput": samples_per_step / elapsed})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", it_s=f"{elapsed:.3f}")
        train_time += elapsed
        if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 < tc.steps:
            val = _evaluate_averaged(strategy.raw_model, data, loss_fn, tc.eval_batches, device)
            log.write({"step": step, "val_loss": val, "time_s": train_time})
            if tc.time_budget_s and _rank_zero_value(train_time, device) >= tc.time_budget_s:
                steps_done = step + 1
                break  # every rank decides on rank 0's clock, so all stop at the same step
    bar.close()
    channel_busy = (link.stats.busy_s - busy_before) if link else None
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
        "train_time_s": train_time,
        "period": tc.period,
        "link": describe_link(link),
        "iter_s": max(r["iter_s_mean"] or 0.0 for r in ranks),  # the slowest rank sets the pace
        "iter_s_median": ranks[0]["iter_s_median"],
        "comm_wait_s": ranks[0]["comm_wait_s_mean"],
        "channel_busy_s_per_iter": (channel_busy / steps_done) if channel_busy is not None else None,
        "bytes_per_iter": sent_total / steps_done,
        "throughput": samples_per_step / max(r["iter_s_mean"] or float("inf") for r in ranks),
        "final_loss": loss_value,
        "val_loss": val_loss,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "ranks": ranks,
        "note": strategy.note,
    }
    log.write({"event": "summary", "summary": summary})
    log.close()
    return summary


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

    def __init__(self, path: str | None) -> None:
        self._file = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "w", encoding="utf-8")

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

"""The run's totals, accumulated as iterations finish, and the summary rank 0 reports at the end.

Timing statistics skip the first ``train.timing_warmup`` iterations (allocator and kernel
warm-up would otherwise dominate a short run); byte counts and training time do not.
"""

from __future__ import annotations

import resource
import statistics
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch.distributed as dist

from dreamddp.training.iteration import IterationResult

__all__ = ["RunFacts", "RunTotals", "forward_compute_s", "gather_rank_records", "job_summary"]


@dataclass
class RunTotals:
    """This rank's running totals (an iteration observer)."""

    timing_warmup: int
    train_time_s: float = 0.0  # training time: evaluation and checkpoints excluded
    iter_times: list[float] = field(default_factory=list)
    forward_times: list[float] = field(default_factory=list)  # forward compute: its waits for averages excluded
    waits: list[float] = field(default_factory=list)
    bytes_sent: int = 0
    last_loss: float | None = None

    def on_iteration(self, it: IterationResult) -> None:
        if it.step >= self.timing_warmup:
            self.iter_times.append(it.elapsed_s)
            self.forward_times.append(forward_compute_s(it))
            if it.comm.wait_s is not None:
                self.waits.append(it.comm.wait_s)
        self.bytes_sent += it.comm.bytes_sent
        self.train_time_s += it.elapsed_s
        self.last_loss = it.loss

    def rank_record(self, rank: int, channel_busy_s: float | None) -> dict[str, Any]:
        """What this rank contributes to the summary's ``ranks`` list."""
        return {
            "rank": rank,
            "iter_s_mean": statistics.fmean(self.iter_times) if self.iter_times else None,
            "iter_s_median": statistics.median(self.iter_times) if self.iter_times else None,
            "comm_wait_s_mean": statistics.fmean(self.waits) if self.waits else None,
            "forward_s_median": statistics.median(self.forward_times) if self.forward_times else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "bytes_sent": self.bytes_sent,
            "channel_busy_s": channel_busy_s,
        }


def forward_compute_s(it: IterationResult) -> float:
    """The iteration's forward, less any wait for averages in it (forward overlap's stalls).

    In every algorithm's backward mode no communication is in flight during the forward, so its
    time is a probe of the machine's compute speed during a run, whatever the run sends: the
    benchmark prices each run at the speed its own forwards had.
    """
    forward = (it.times.forward_end - it.times.start) / 1e9
    comm = it.comm
    stalls = (comm.wait_s or 0.0) - comm.backward_wait_s - comm.after_step_wait_s
    return max(0.0, forward - max(0.0, stalls))


def gather_rank_records(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Collective: every rank's record on rank 0 (None elsewhere)."""
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, record)
    return ranks if dist.get_rank() == 0 else None


@dataclass(frozen=True)
class RunFacts:
    """What the summary states about the run besides its measurements."""

    algorithm: str
    world_size: int
    steps: int  # iterations done (fewer than train.steps when the time budget ran out)
    resumed_from: int
    period: int  # the H the strategy ran: the schedule file's when it sets one
    link: str
    note: str
    samples_per_step: int  # tokens or samples per iteration, whole job


def job_summary(
    facts: RunFacts,
    totals: RunTotals,
    ranks: list[dict[str, Any]],
    channel_busy_s: float | None,
    val_loss: float,
) -> dict[str, Any]:
    """Rank 0's summary: the slowest rank sets the pace; rank 0's own figures where one rank speaks."""
    steps_run = max(1, facts.steps - facts.resumed_from)
    return {
        "algorithm": facts.algorithm,
        "world_size": facts.world_size,
        "steps": facts.steps,
        "resumed_from": facts.resumed_from,
        "train_time_s": totals.train_time_s,
        "period": facts.period,
        "link": facts.link,
        "iter_s": max(r["iter_s_mean"] or 0.0 for r in ranks),
        "iter_s_median": ranks[0]["iter_s_median"],
        "comm_wait_s": ranks[0]["comm_wait_s_mean"],
        "forward_s": _slowest(ranks, "forward_s_median"),
        "channel_busy_s_per_iter": (channel_busy_s / steps_run) if channel_busy_s is not None else None,
        "bytes_per_iter": totals.bytes_sent / steps_run,
        "throughput": facts.samples_per_step / max(r["iter_s_mean"] or float("inf") for r in ranks),
        "final_loss": totals.last_loss if facts.steps > facts.resumed_from else None,
        "val_loss": val_loss,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
        "ranks": ranks,
        "note": facts.note,
    }


def _slowest(ranks: list[dict[str, Any]], key: str) -> float | None:
    values = [r.get(key) for r in ranks]
    return max(v for v in values if v is not None) if all(v is not None for v in values) else None

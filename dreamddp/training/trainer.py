"""The trainer: one short loop for every algorithm (see ``strategies.py``).

Each iteration is forward, backward, optimizer step, then the strategy's after-step
communication (``iteration.py``). What happens around it is decided by small objects that
each know when to act: the observers (JSONL log and progress bar, metrics endpoint, trace),
the checkpoints and the evaluator. Rank 0 writes one JSON line per iteration and a final
summary with every rank's timing and peak memory. Validation loss is measured on the averaged
model; mid-run evaluations average a snapshot and restore it, so evaluating never changes the
training trajectory.

The command line (``dreamddp train``, ``python -m dreamddp.train``) is ``dreamddp.tools.train``.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dreamddp.emulation.link import SimulatedLink, describe_link, link_from_settings
from dreamddp.ops.failures import (
    FaultPlan,
    Heartbeat,
    LauncherWatchdog,
    Terminated,
    install_sigterm,
    is_communication_error,
    launcher_died,
)
from dreamddp.ops.metrics import TrainingMetrics
from dreamddp.ops.trace import TraceRecorder
from dreamddp.training.checkpointing import TrainingCheckpoints
from dreamddp.training.config import ExperimentConfig
from dreamddp.training.data import build_data
from dreamddp.training.distributed import agree, init_process_group, rank_zero_value
from dreamddp.training.evaluation import PeriodicEvaluator
from dreamddp.training.iteration import IterationRunner
from dreamddp.training.lora import apply_lora
from dreamddp.training.loss import loss_for_task
from dreamddp.training.models import build_model, model_task
from dreamddp.training.observers import IterationObserver, MetricsObserver, ProgressReporter, TraceObserver
from dreamddp.training.preflight import check_output_paths
from dreamddp.training.replanning import Replanner
from dreamddp.training.run_log import RankZeroLog
from dreamddp.training.schedules import resolve_schedule
from dreamddp.training.strategies import build_lr_scheduler, build_strategy
from dreamddp.training.summary import RunFacts, RunTotals, gather_rank_records, job_summary

__all__ = ["Stopped", "Trainer", "run"]

logger = logging.getLogger(__name__)


class Stopped(RuntimeError):
    """This rank was told to stop (SIGTERM, SIGINT, its launcher died) in the middle of training."""


def run(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Train as configured; return the summary on rank 0 (None elsewhere)."""
    device = init_process_group(cfg)
    rank, world = dist.get_rank(), dist.get_world_size()
    restore_signals = install_sigterm()
    watchdog = LauncherWatchdog()
    heartbeat = Heartbeat(rank, world, cfg.train.heartbeat_s)
    try:
        try:
            trainer = Trainer(cfg, device, heartbeat)
        except Terminated as sig:
            raise Stopped(f"rank {rank} stopped while starting ({sig}): nothing was trained or written") from None
        try:
            summary = trainer.train()
        except BaseException:
            # The run already failed: a peer's death must not surface a second time as a traceback
            # from waiting on averages still in flight; the first error is the one line to show.
            trainer.close(after_failure=True)
            raise
        else:
            trainer.close()
        finally:
            del trainer
            gc.collect()  # anything holding the process group must go before it is destroyed
        dist.barrier()
        return summary if rank == 0 else None
    except Terminated as sig:  # after training: every checkpoint is written, nothing is lost
        raise Stopped(f"rank {rank} stopped after training ({sig}); its final checkpoint is written") from None
    finally:
        heartbeat.close()
        watchdog.close()
        restore_signals()
        dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    """Every stream seeded: two runs of one config are the same run."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _require_measurable_link(link: SimulatedLink | None, device: torch.device) -> None:
    if link is not None and link.spec.latency_only and device.type == "cuda":
        # NCCL's futures complete at enqueue, so the real transfer time cannot be measured.
        raise SystemExit(
            f"dreamddp train: error: a latency-only link ({link.spec}) needs gloo; "
            "with NCCL use a full simulated link such as train.link=100mbit,20ms"
        )


def _require_bf16_support(cfg: ExperimentConfig, device: torch.device) -> None:
    if cfg.train.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision='bf16' needs a GPU with bfloat16 support; {device} has none: use 'fp32'")


class Trainer:
    """One training run on this rank, inside an initialised process group.

    Built from the config (model, data, strategy, metrics endpoint), then ``train()`` once,
    then ``close()`` before the process group goes. Every start-up check that one rank alone
    can fail runs under ``agree``, so all ranks stop with the same line.
    """

    def __init__(self, cfg: ExperimentConfig, device: torch.device, heartbeat: Heartbeat) -> None:
        self.cfg, self.tc, self.device, self.heartbeat = cfg, cfg.train, device, heartbeat
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        agree(lambda: check_output_paths(cfg))  # one rank's unwritable path stops every rank
        _seed_everything(cfg.train.seed)
        model = build_model(cfg.model_name, cfg.model_options).to(device)
        if cfg.train.lora is not None:  # adapters only: the rest is frozen, never sent (training/lora.py)
            model = agree(lambda: apply_lora(model, cfg.train.lora))
        schedule = agree(lambda: resolve_schedule(cfg, model, self.world))
        self.task = model_task(cfg.model_name)
        self.data = build_data(
            cfg.data.name,
            batch_size=cfg.data.batch_size,
            seq_len=cfg.data.seq_len,
            vocab_size=cfg.model.get("vocab_size", 256),
            rank=self.rank,
            world_size=self.world,
            seed=cfg.train.seed,
            max_bytes=cfg.data.max_bytes,
        )
        self.link = link_from_settings(cfg.train.link, self.world)
        _require_measurable_link(self.link, device)
        agree(lambda: _require_bf16_support(cfg, device))  # mixed GPUs: one rank's lack stops every rank
        self.strategy = build_strategy(model, cfg.train, self.link, schedule)
        self.replanner = (
            agree(lambda: Replanner(self.strategy, self.tc.profile, self.tc.replan_every))
            if self.tc.replan_every
            else None
        )
        self.metrics = self._serve_metrics()
        self.lr_scheduler = build_lr_scheduler(self.tc, self.strategy.optimizer)
        self.checkpoints = TrainingCheckpoints(cfg, self.strategy, self.lr_scheduler, device)
        loss_fn = loss_for_task(self.task)
        self.iteration = IterationRunner(
            self.strategy,
            self.data,
            loss_fn,
            self.lr_scheduler,
            device,
            grad_clip=self.tc.grad_clip,
            measure_hidden=self.metrics is not None,
            grad_accum=self.tc.grad_accum,
            precision=self.tc.precision,
        )
        self.evaluator = PeriodicEvaluator(
            self.strategy,
            self.data,
            loss_fn,
            device,
            every=self.tc.eval_every,
            n_batches=self.tc.eval_batches,
            steps=self.tc.steps,
        )
        self.samples_per_step = cfg.data.batch_size * (cfg.data.seq_len if self.task == "lm" else 1) * self.world
        self.fault = FaultPlan.from_env()
        self.totals = RunTotals(self.tc.timing_warmup)

    def _serve_metrics(self) -> TrainingMetrics | None:
        """This rank's Prometheus endpoint on PORT + LOCAL_RANK (a taken port stops every rank)."""
        if not self.tc.metrics_port:
            return None
        port = self.tc.metrics_port + int(os.environ.get("LOCAL_RANK", 0))
        unit = "tokens" if self.task == "lm" else "samples"
        return agree(lambda: TrainingMetrics(port, self.tc.metrics_addr, self.rank, unit=unit))

    # ------------------------------------------------------------------ the run
    def train(self) -> dict[str, Any] | None:
        """Train from the latest checkpoint (or the start); the summary on rank 0, None elsewhere."""
        try:
            return self._train()
        except Terminated as sig:  # outside the loop: resuming, the final save, evaluation
            raise self._stopped(self.heartbeat.iteration, sig) from None

    def _train(self) -> dict[str, Any] | None:
        start = self.checkpoints.resume()
        self.totals.train_time_s = start.train_time_s
        log = RankZeroLog(self.tc.log if self.rank == 0 else None, append=start.step > 0)
        try:
            log.write(self._opening_record(start.step))
            trace = self._trace(start.step)
            busy_before = self.link.stats.busy_s if self.link else 0.0
            steps_done = self._loop(start.step, log, trace)
            self.checkpoints.save(steps_done, self.totals.train_time_s)
            if trace is not None:
                trace.write(self.strategy, self.tc.algorithm)
            channel_busy = (self.link.stats.busy_s - busy_before) if self.link else None
            self.strategy.finish()
            val_loss = self.evaluator.final()
            return self._summarize(start.step, steps_done, channel_busy, val_loss, log)
        finally:
            log.close()

    def _loop(self, start_step: int, log: RankZeroLog, trace: TraceObserver | None) -> int:
        """Iterations ``start_step`` .. ``train.steps - 1``; how many are done when it stops."""
        progress = ProgressReporter(log, self._progress_bar(start_step), self.samples_per_step)
        observers: list[IterationObserver] = [self.totals, progress]
        if self.metrics is not None:
            observers.append(MetricsObserver(self.metrics, self.samples_per_step))
        if trace is not None:
            observers.append(trace)
        step = start_step
        try:
            for step in range(start_step, self.tc.steps):
                self.heartbeat.iteration = step
                if self.fault is not None:
                    self.fault.maybe_fire(self.rank, step)
                result = self.iteration.run(step)
                for observer in observers:
                    observer.on_iteration(result)
                if self.replanner is not None and step + 1 < self.tc.steps:
                    replanned = self.replanner.maybe_replan(step + 1)  # collective at its boundaries
                    if replanned is not None:
                        log.write(replanned)
                self.checkpoints.maybe_save(step + 1, self.totals.train_time_s)
                if self._evaluate(step, log):
                    return step + 1  # out of time: every rank stops after the same iteration
        except Terminated as sig:
            raise self._stopped(step, sig) from None
        except RuntimeError as err:
            if self.world > 1 and is_communication_error(err):
                raise self.heartbeat.diagnose(step, err) from None
            raise
        finally:
            progress.close()
        return self.tc.steps

    def _evaluate(self, step: int, log: RankZeroLog) -> bool:
        """Mid-run evaluation when due; True when the time budget, checked then, is spent."""
        val = self.evaluator.maybe_act(step)
        if val is None:
            return False
        log.write({"step": step, "val_loss": val, "time_s": self.totals.train_time_s})
        budget = self.tc.time_budget_s
        # Every rank decides on rank 0's clock, so all stop at the same step.
        return bool(budget) and rank_zero_value(self.totals.train_time_s, self.device) >= budget

    def _stopped(self, step: int, sig: Terminated) -> Stopped:
        where = self.checkpoints.resume_hint()
        if launcher_died():
            return Stopped(f"rank {self.rank} stopped at iteration {step}: its launcher died; {where}")
        if self.world > 1 and str(sig) == "SIGTERM":
            # torchrun also sends SIGTERM to every survivor when one rank fails: name that rank if so.
            how = f"{sig} from the launcher, which stops every rank when one fails"
            failure = self.heartbeat.blame(step, how)
            if failure is not None:
                return Stopped(f"{failure}; {where}")
        return Stopped(f"rank {self.rank} stopped at iteration {step} ({sig}); {where}")

    # --------------------------------------------------------------- reporting
    def _opening_record(self, start_step: int) -> dict[str, Any]:
        """The log's first record of this attempt: the run's setup, or where it resumes."""
        if start_step:
            return {
                "event": "resume",
                "step": start_step,
                "checkpoint_dir": self.tc.checkpoint_dir,
                "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            }
        return {
            "event": "start",
            "config": self.cfg.to_dict(),
            "world_size": self.world,
            "device": str(self.device),
            "torch": torch.__version__,
            "link": describe_link(self.link),
            "note": self.strategy.note,
        }

    def _progress_bar(self, start_step: int) -> tqdm:
        return tqdm(
            total=self.tc.steps,
            initial=start_step,
            desc=self.tc.algorithm,
            disable=self.rank != 0 or not self.tc.progress,
            dynamic_ncols=True,
        )

    def _trace(self, start_step: int) -> TraceObserver | None:
        """The trace of ``train.trace_steps`` iterations from the first timed one (not from before a resume)."""
        if not self.tc.trace:
            return None
        recorder = TraceRecorder(self.tc.trace, max(start_step, self.tc.timing_warmup), self.tc.trace_steps)
        return TraceObserver(recorder, self.strategy)

    def _summarize(
        self, start_step: int, steps_done: int, channel_busy: float | None, val_loss: float, log: RankZeroLog
    ) -> dict[str, Any] | None:
        """Collective: every rank's figures to rank 0, which writes and returns the summary."""
        ranks = gather_rank_records(self.totals.rank_record(self.rank, channel_busy))
        if ranks is None:
            return None
        facts = RunFacts(
            algorithm=self.tc.algorithm,
            world_size=self.world,
            steps=steps_done,
            resumed_from=start_step,
            period=self.strategy.period,
            link=describe_link(self.link),
            note=self.strategy.note,
            samples_per_step=self.samples_per_step,
        )
        summary = job_summary(facts, self.totals, ranks, channel_busy, val_loss)
        log.write({"event": "summary", "summary": summary})
        return summary

    def close(self, after_failure: bool = False) -> None:
        """Release what holds the process group or a port: the strategy's wrappers, the metrics server.

        ``after_failure``: the run is already failing; an error finishing what is in flight (a dead
        peer's collective) is logged, not raised over the first one.
        """
        try:
            self.strategy.close()
        except Exception as err:  # noqa: BLE001 - only after a failure, which is what gets reported
            if not after_failure:
                raise
            logger.debug("closing after a failure: %s", err)
        finally:
            if self.metrics is not None:
                self.metrics.close()

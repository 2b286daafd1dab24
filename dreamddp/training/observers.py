"""What watches each finished iteration: the JSONL log and progress bar, the metrics endpoint, the trace.

Each is a small object with ``on_iteration(result)``; the trainer's loop hands every
iteration to all of them and knows nothing of what they record.
"""

from __future__ import annotations

from typing import Protocol

from tqdm import tqdm

from dreamddp.ops.metrics import IterationSample, TrainingMetrics
from dreamddp.ops.trace import IterationMarks, TraceRecorder
from dreamddp.training.iteration import IterationResult
from dreamddp.training.run_log import RankZeroLog
from dreamddp.training.strategies import Strategy

__all__ = ["IterationObserver", "MetricsObserver", "ProgressReporter", "TraceObserver"]


class IterationObserver(Protocol):
    def on_iteration(self, it: IterationResult) -> None: ...


class ProgressReporter:
    """One log record per iteration (rank 0) and the progress bar."""

    def __init__(self, log: RankZeroLog, bar: tqdm, samples_per_step: int) -> None:
        self.log, self.bar, self.samples_per_step = log, bar, samples_per_step

    def on_iteration(self, it: IterationResult) -> None:
        self.log.write(
            {
                "step": it.step,
                "loss": it.loss,
                "iter_s": it.elapsed_s,
                "comm_wait_s": it.comm.wait_s,
                "bytes_sent": it.comm.bytes_sent,
                "throughput": self.samples_per_step / it.elapsed_s,
            }
        )
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{it.loss:.3f}", it_s=f"{it.elapsed_s:.3f}")

    def close(self) -> None:
        self.bar.close()


class MetricsObserver:
    """Feeds the Prometheus endpoint of this rank."""

    def __init__(self, metrics: TrainingMetrics, samples_per_step: int) -> None:
        self.metrics, self.samples_per_step = metrics, samples_per_step

    def on_iteration(self, it: IterationResult) -> None:
        self.metrics.observe(
            IterationSample(
                iteration=it.step,
                iteration_s=it.elapsed_s,
                exposed_comm_s=it.comm.wait_s,
                hidden_comm_s=it.comm.hidden_s,
                bytes_sent=it.comm.bytes_sent,
                units_synced=it.comm.units_synced,
                loss=it.loss,
                throughput=self.samples_per_step / it.elapsed_s,
            )
        )


class TraceObserver:
    """Keeps the traced iterations' marks; ``write`` (collective) gathers them into the trace file.

    ``period`` is the H the strategy runs (the schedule's), so a slice's phase is the one the
    wrapper really used.
    """

    def __init__(self, recorder: TraceRecorder, strategy: Strategy) -> None:
        self.recorder, self.strategy = recorder, strategy

    def on_iteration(self, it: IterationResult) -> None:
        if not self.recorder.wants(it.step):
            return
        t, comm = it.times, it.comm
        self.recorder.add(
            IterationMarks(
                it.step,
                self.strategy.phase_of(it.step),  # asked each time: re-planning may change H
                t.start,
                t.forward_end,
                t.backward_end,
                t.optimizer_end,
                t.end,
                backward_wait_s=comm.backward_wait_s,
                after_step_wait_s=comm.after_step_wait_s,
                forward_events=list(comm.forward_events),
            )
        )

    def write(self, strategy: Strategy, method: str) -> None:
        self.recorder.write(strategy.observed_timings(), method)

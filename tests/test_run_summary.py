"""The run summary's compute probe: a forward's time less the waits for averages inside it."""

from __future__ import annotations

import pytest

from dreamddp.training.iteration import IterationResult, StepTimes
from dreamddp.training.strategies import CommStats
from dreamddp.training.summary import RunTotals, forward_compute_s


def _iteration(step: int, forward_ms: int, comm: CommStats) -> IterationResult:
    ms = 1_000_000
    times = StepTimes(start=0, forward_end=forward_ms * ms, backward_end=300 * ms, optimizer_end=310 * ms, end=320 * ms)
    return IterationResult(step, 1.0, times, comm)


def test_forward_stalls_are_taken_out_and_end_of_backward_waits_are_not_in_it():
    # Forward overlap: 30 ms waited in total, 20 of it at the end of backward, 5 after the step.
    overlapped = CommStats(0.030, 0, backward_wait_s=0.020, after_step_wait_s=0.005)
    assert forward_compute_s(_iteration(0, 100, overlapped)) == pytest.approx(0.095)
    # Backward mode: every wait is outside the forward.
    assert forward_compute_s(_iteration(0, 100, CommStats(0.040, 0, backward_wait_s=0.040))) == pytest.approx(0.1)
    # Torch DDP: the wait is not observable, and none of it is in the forward.
    assert forward_compute_s(_iteration(0, 100, CommStats(None, 0))) == pytest.approx(0.1)


def test_the_rank_record_reports_the_median_forward_after_warmup():
    totals = RunTotals(timing_warmup=1)
    for step, forward_ms in enumerate([500, 100, 120, 110]):
        totals.on_iteration(_iteration(step, forward_ms, CommStats(0.0, 0)))
    record = totals.rank_record(0, None)
    assert record["forward_s_median"] == pytest.approx(0.110)
    assert RunTotals(timing_warmup=0).rank_record(0, None)["forward_s_median"] is None

"""Issue 18, predictions within 10%: a shaper's burst after idle, the relative fit, and torch
DDP's buckets as its reducer really builds them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from dreamddp.core.schedule import Schedule
from dreamddp.planning import simulate, simulate_method
from dreamddp.planning.simulate import CostModel, ddp_buckets
from profiler import CommModel, Profile
from profiler.comm import fit_with_burst

from .dist_utils import run_workers

SIZES = [4096, 16384, 65536, 262144, 1048576, 4194304]


def _sweep(alpha: float, beta: float, burst: float, repeats: int) -> list[tuple[int, float]]:
    """What the profiler's sweep measures: each batch of ``repeats`` begins with a full bucket."""
    return [(x, alpha + beta * x - min(burst, repeats * beta * x) / repeats) for x in SIZES]


def test_relative_fit_recovers_a_line_and_is_not_the_line_through_the_largest_message():
    exact = CommModel.fit([(x, 0.05 + 4e-7 * x) for x in SIZES])
    assert exact.alpha_s == pytest.approx(0.05, rel=1e-9) and exact.beta_s_per_byte == pytest.approx(4e-7, rel=1e-9)
    # The largest message 20% slow (TCP under a full shaper queue): the small ones still priced right.
    points = [(x, 0.05 + 4e-7 * x * (1.2 if x == SIZES[-1] else 1.0)) for x in SIZES]
    fit = CommModel.fit(points)
    beta, alpha = np.polyfit([x for x, _ in points], [t for _, t in points], 1)  # ordinary least squares

    def worst(price) -> float:  # over the sizes that are on the line
        return max(abs(price(x) / (0.05 + 4e-7 * x) - 1) for x in SIZES[:-1])

    assert worst(fit.predict) < 0.08 and worst(fit.predict) < 0.5 * worst(lambda x: alpha + beta * x)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.001, 0.1), st.floats(1e-9, 1e-6), st.floats(0.0, 0.2), st.integers(2, 8), st.sampled_from(SIZES[3:]))
def test_fit_with_burst_recovers_alpha_beta_and_the_burst(alpha, beta, burst, repeats, probe):
    burst = min(burst, beta * probe)  # a probe smaller than the bucket shows only its own transfer
    after_idle = [alpha + beta * probe - burst] * 3
    fit = fit_with_burst(_sweep(alpha, beta, burst, repeats), repeats, probe, after_idle)
    assert fit.alpha_s == pytest.approx(alpha, rel=1e-6, abs=1e-9)
    assert fit.beta_s_per_byte == pytest.approx(beta, rel=1e-6)
    assert fit.burst_s == pytest.approx(burst, rel=1e-6, abs=1e-9)


def test_no_burst_without_idle_advantage():
    fit = fit_with_burst(_sweep(0.02, 8e-8, 0.0, 5), 5, 2**20, [0.02 + 8e-8 * 2**20 + 0.001] * 3)
    assert fit.burst_s == 0.0


def _two_units(burst: float) -> Profile:
    profile = Profile.synthetic([0.1, 0.1], [0.0, 0.0], forward_s=0.1, nbytes=[100_000, 100_000])
    return profile.with_comm(CommModel(0.01, 1e-6, burst_s=burst))


def test_the_first_message_after_idle_spends_the_burst_and_the_next_pays_in_full():
    model = CostModel(_two_units(0.05))
    # Unit 1 alone, ready at 0.2: 0.01 latency + 0.1 transfer, less 0.05 of burst.
    assert model.exposed([1]) == pytest.approx(0.06)
    assert CostModel(_two_units(0.0)).exposed([1]) == pytest.approx(0.11)
    # Units 0 and 1 adjacent: one bucket of 200 kB.
    assert model.exposed([0, 1]) == pytest.approx(0.01 + 0.2 - 0.05)
    # A burst larger than the transfer saves the transfer, never the latency.
    assert CostModel(_two_units(5.0)).exposed([1]) == pytest.approx(0.01)
    schedule = Schedule(2, {"u1": [0], "u0": [1]})
    with_burst, without = (simulate(_two_units(b), schedule) for b in (0.05, 0.0))
    # Iteration 0 saves the burst; in iteration 1 unit 0's message (ready at 0.1) now ends
    # before backward does, so the 0.01 it stuck out is hidden too.
    assert without.period_s - with_burst.period_s == pytest.approx(0.05 + 0.01)


def test_baselines_spend_the_burst_once_per_idle_gap():
    with_burst, without = _two_units(0.05), _two_units(0.0)
    saved = simulate_method(without, "local_sgd", 4).period_s - simulate_method(with_burst, "local_sgd", 4).period_s
    assert saved == pytest.approx(0.05)  # one average per period, after H iterations of silence
    saved = simulate_method(without, "ssgd", 1).period_s - simulate_method(with_burst, "ssgd", 1).period_s
    assert saved == pytest.approx(0.05)


def test_profiles_keep_the_burst_and_older_ones_read_zero(tmp_path):
    path = tmp_path / "p.json"
    _two_units(0.05).to_json(path)
    assert Profile.from_json(path).comm.burst_s == 0.05
    data = json.loads(path.read_text())
    del data["comm"]["burst_s"]
    path.write_text(json.dumps(data))
    assert Profile.from_json(path).comm.burst_s == 0.0
    data["comm"]["burst_s"] = -1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"comm burst_s must be a finite number >= 0, got -1"):
        Profile.from_json(path)


def test_ddp_bucket_rule():
    mib = 2**20
    assert ddp_buckets([mib // 2] * 5, 1.0) == [[0, 1], [2, 3], [4]]  # closed when the cap is reached
    assert ddp_buckets([mib // 3] * 4, 1.0) == [[0, 1, 2, 3]]  # 4/3 MiB: the crossing tensor joins
    assert ddp_buckets([100] * 3, 25.0) == [[0, 1, 2]]  # no separate 1 MiB first bucket


def _ddp_bucket_bytes(rank: int, world: int, cap_mb: float) -> list[list[int]]:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(64, 64, bias=False) for _ in range(8)))
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=cap_mb)
    seen: list[int] = []

    def hook(state, bucket):  # unannotated: DDP checks annotations, and this module's are strings
        seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]

    ddp.register_comm_hook(None, hook)
    per_iteration = []
    for _ in range(3):  # the reducer rebuilds its buckets after the first iteration
        seen.clear()
        ddp(torch.randn(4, 64)).sum().backward()
        per_iteration.append(list(seen))
    del ddp
    dist.barrier()
    return per_iteration


@pytest.mark.parametrize("cap_mb", [25.0, 0.04])
def test_ddp_buckets_are_what_torch_ddp_launches(cap_mb):
    launched = run_workers(_ddp_bucket_bytes, 2, cap_mb)[0][-1]
    unit_bytes = [64 * 64 * 4] * 8  # backward order: last layer first
    predicted = [sum(unit_bytes[i] for i in b) for b in ddp_buckets(unit_bytes, cap_mb)]
    assert sorted(launched) == sorted(predicted), (launched, predicted)


def test_refresh_counts_the_burst_back_in_and_scales_it_with_the_link():
    from dreamddp.core.timing import ObservedBucket, ObservedIteration
    from profiler import refresh

    base = _two_units(0.05)  # alpha 10 ms, beta 1 us/byte, a 50 ms burst

    def observed(beta: float, burst: float) -> list[ObservedIteration]:
        its = []
        for i, first_bytes in enumerate([100_000, 20_000, 200_000]):
            took = 0.01 + beta * first_bytes - min(burst, beta * first_bytes)  # after idle
            first = ObservedBucket(["u1"], first_bytes, 0.0, took)
            second = ObservedBucket(["u0"], 30_000, took, took + 0.01 + beta * 30_000)  # back to back
            its.append(ObservedIteration(i, 0, {"u1": 0.1, "u0": 0.2}, [first, second]))
        return its

    same = refresh(base, observed(1e-6, 0.05)).comm
    assert same.alpha_s == pytest.approx(0.01) and same.beta_s_per_byte == pytest.approx(1e-6)
    assert same.burst_s == pytest.approx(0.05)
    # Without counting the burst back in, the first buckets would make the line too cheap.
    assert (
        CommModel.fit(
            [(b.nbytes, b.done_s - b.launch_s) for it in observed(1e-6, 0.05) for b in it.buckets[:1]]
        ).beta_s_per_byte
        < 0.9e-6
    )
    # Slower link: the same bucket of bytes is worth proportionally more time.
    slower = refresh(base, observed(2e-6, 0.10)).comm
    assert slower.burst_s == pytest.approx(0.05 * slower.beta_s_per_byte / 1e-6)
    assert slower.beta_s_per_byte > 1.5e-6


def test_predictions_at_the_runs_compute_speed_scale_compute_not_the_link():
    from dreamddp.tools.bench.predict import predict_methods, with_compute_scaled

    profile = _two_units(0.05)
    slower = with_compute_scaled(profile, 1.5)
    assert slower.compute_s == pytest.approx(1.5 * profile.compute_s)
    assert slower.comm == profile.comm and [u.nbytes for u in slower.units] == [u.nbytes for u in profile.units]
    schedules = {name: Schedule(2, {"u1": [0], "u0": [1]}) for name in ("dreamddp", "dreamddp+fill")}
    base, scaled = predict_methods(profile, {}, 2), predict_methods(slower, {}, 2)
    assert scaled["none"] == pytest.approx(1.5 * base["none"])
    # S-SGD's one bucket is launched at the end of backward: its exposure does not scale.
    assert scaled["ssgd"] - scaled["none"] == pytest.approx(base["ssgd"] - base["none"])
    assert set(predict_methods(profile, schedules, 2)) >= {"ssgd", "local_sgd", "plsgd", "none", "dreamddp"}
    with pytest.raises(ValueError, match="compute scale must be > 0, got 0"):
        with_compute_scaled(profile, 0)

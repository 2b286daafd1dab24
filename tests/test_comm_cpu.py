"""Compute that transfers in flight take: measured on real gloo ranks, priced in backward mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dreamddp.core.schedule import Schedule
from dreamddp.planning import simulate, simulate_method
from dreamddp.planning.jitter import expected_iteration_s
from dreamddp.planning.search import fill_in
from profiler import CommModel, Profile
from profiler.comm_cpu import CommCpuCost, profile_comm_cpu

from .dist_utils import run_workers

NS = 1e-9


def _profile(cpu_per_byte: float) -> Profile:
    """Two units of 100 kB, each 0.1 s of backward; 0.01 s + 1 us/byte per all-reduce."""
    profile = Profile.synthetic([0.1, 0.1], [0.0, 0.0], forward_s=0.1, optimizer_s=0.01, nbytes=[100_000, 100_000])
    return dataclasses.replace(profile.with_comm(CommModel(0.01, 1e-6)), comm_cpu_s_per_byte=cpu_per_byte)


def test_bytes_in_flight_during_backward_stretch_it_and_bytes_after_it_do_not():
    free, costly = _profile(0.0), _profile(100 * NS)
    # Unit 0 alone: ready at 0.1, its 0.11 s all-reduce ends at 0.21, 0.01 past backward.
    # 0.1 of its 0.11 s is in flight while backward runs: 100 kB * 100 ns * 0.1/0.11 taken.
    taken = 100_000 * 100 * NS * 0.1 / 0.11
    plain, priced = (simulate(p, Schedule(2, {"u0": [0], "u1": [1]})).iterations[0] for p in (free, costly))
    assert plain.exposed_s == pytest.approx(0.01)
    assert priced.comm_cpu_s == pytest.approx(taken)
    assert priced.compute_s == pytest.approx(plain.compute_s + taken)
    # The stretched backward hides more of the transfer: exposed shrinks by what was taken.
    assert priced.exposed_s == pytest.approx(max(0.0, 0.01 - taken))
    # S-SGD's one bucket starts when backward ends: nothing is in flight while it computes.
    assert simulate_method(costly, "ssgd", 1).iteration_s == pytest.approx(simulate_method(free, "ssgd", 1).iteration_s)
    # The replay without spread is the timeline, compute taken included.
    timeline = simulate(costly, Schedule(2, {"u0": [0], "u1": [1]}))
    assert expected_iteration_s(costly, timeline, 2) == pytest.approx(timeline.iteration_s, rel=1e-12)


def test_fill_in_adds_no_sync_whose_bytes_cost_compute():
    profile = Profile.synthetic([0.2, 0.2, 0.2], [0.0] * 3, forward_s=0.1, nbytes=[10_000] * 3)
    schedule = Schedule(3, {"u0": [0], "u1": [1], "u2": [2]})
    free = profile.with_comm(CommModel(0.001, 1e-7))
    free_syncs = fill_in(schedule, free).syncs_per_period()
    assert free_syncs > 3  # idle link: extra syncs are free
    costly = dataclasses.replace(free, comm_cpu_s_per_byte=1e-9)
    filled = fill_in(schedule, costly)
    for before, after in zip(simulate(costly, schedule).iterations, simulate(costly, filled).iterations):
        assert after.iteration_s <= before.iteration_s + 1e-15
    # Only a sync whose stolen compute the iteration's exposed tail absorbs stays.
    assert 3 <= filled.syncs_per_period() < free_syncs


def test_profile_keeps_the_measured_figure_and_older_profiles_read_zero(tmp_path):
    profile = _profile(3 * NS)
    profile.to_json(tmp_path / "p.json")
    assert Profile.from_json(tmp_path / "p.json").comm_cpu_s_per_byte == pytest.approx(3 * NS)
    raw = profile.to_dict()
    del raw["iteration"]["comm_cpu_s_per_byte"]
    assert Profile.from_dict(raw).comm_cpu_s_per_byte == 0.0
    with pytest.raises(ValueError, match="comm_cpu_s_per_byte must be a finite number >= 0, got -1"):
        dataclasses.replace(profile, comm_cpu_s_per_byte=-1)


def test_the_cost_is_per_byte_and_never_negative():
    assert CommCpuCost(0.30, 0.33, 3_000_000).s_per_byte == pytest.approx(10 * NS)
    assert CommCpuCost(0.30, 0.29, 3_000_000).s_per_byte == 0.0


def _measure(rank: int, world: int) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    batches = [(torch.randn(64, 256), torch.randint(0, 10, (64,))) for _ in range(8)]
    cost = profile_comm_cpu(model, lambda s: batches[s % 8], nn.functional.cross_entropy, 1 << 20, iters=3)
    untouched = all(p.grad is None for p in model.parameters())
    dist.barrier()
    return cost.alone_s, cost.with_transfer_s, cost.nbytes if untouched else -1


@pytest.mark.timeout(120)
def test_measured_on_two_gloo_ranks():
    for alone, with_transfer, nbytes in run_workers(_measure, 2):
        assert alone > 0 and with_transfer > 0
        assert nbytes == 1 << 20  # and the gradients were left unset

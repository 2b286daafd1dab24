"""torch's ``Join([ddp])`` with uneven inputs: no hang or abort, averages over the ranks still training.

Two gloo ranks; rank 1 runs out of data first (or never has any). Checked against a
pure-Python reference of partial local SGD whose averages are over the ranks that still have
data (joined ranks keep their own weights), and, in the paper's mode, bit for bit: an
average over one rank is that rank's weights, over two it is (w0 + w1) / 2. A Join where no
rank runs out changes nothing, bit for bit, and outside Join nothing extra is sent.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join

from dreamddp import DreamDDP, Schedule, sync_units
from dreamddp.emulation.link import link_from_settings

from .dist_utils import run_workers

LR = 0.1
ASSIGNMENT = {"0": [0], "2": [1], "4": [0, 1]}  # two phases with different buckets: a misaligned phase aborts
PLAIN = Schedule(period=2, assignment=ASSIGNMENT)
FORWARD = Schedule(period=2, assignment=ASSIGNMENT, overlap="forward")
DELAYED = Schedule(period=2, assignment=ASSIGNMENT, delays={"2": 1}, overlap="forward")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _unit_slices() -> dict[str, slice]:
    """Each unit's slice of ``_flat`` (its parameters are consecutive in ``parameters()``)."""
    out, offset = {}, 0
    for name, p in _model().named_parameters():
        unit = name.rpartition(".")[0]
        start = out[unit].start if unit in out else offset
        offset += p.numel()
        out[unit] = slice(start, offset)
    return out


# ------------------------------------------------------------------------ on the ranks
def _train(rank: int, schedule: Schedule, steps: list[int], use_join: bool = True, link: str | None = None) -> dict:
    """``steps[rank]`` iterations inside Join, then one synchronising iteration on every rank."""
    model = _model()
    ddp = DreamDDP(model, schedule, link=link_from_settings(link, 2) if link else None)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    ddp.register_optimizer(opt)
    pre, post = [], []
    with Join([ddp]) if use_join else contextlib.nullcontext():
        for step in range(steps[rank]):
            opt.zero_grad()
            x, y = _batch(rank, step)
            loss = nn.functional.cross_entropy(ddp(x), y)
            pre.append(_flat(model))  # what this iteration averages (forward landed what was due)
            loss.backward()
            post.append(_flat(model))  # the paper's mode: averaged
            opt.step()
    in_flight = len(ddp._landing.pending)  # a rank that shadowed has landed its own averages first
    ddp.flush()
    final, iteration = _flat(model), ddp.iteration
    # After Join every rank is at the same iteration, so the next average meets the same buckets.
    x, y = _batch(rank, 99)
    nn.functional.cross_entropy(ddp(x), y).backward()
    ddp.flush()
    return {
        "pre": pre,
        "post": post,
        "final": final,
        "iteration": iteration,
        "after": _flat(model),
        "in_flight": in_flight,
    }


def _uneven(rank: int, world: int, scenarios: list[tuple[str, list[int]]]) -> list[dict]:
    schedules = {"plain": PLAIN, "forward": FORWARD, "linked": FORWARD, "delayed": DELAYED}
    link = {"linked": "100mbit,2ms"}  # shadowed buckets are booked on the simulated link too
    return [_train(rank, schedules[name], steps, link=link.get(name)) for name, steps in scenarios]


class CountingAllReduce:
    """Counts calls of torch.distributed.all_reduce (Join's and ours), wrapping the real one."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = dist.all_reduce

    def __enter__(self) -> CountingAllReduce:
        def counted(*args, **kwargs):
            self.calls += 1
            return self._real(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._real


def _even(rank: int, world: int) -> dict:
    out: dict = {}
    for name, schedule in (("plain", PLAIN), ("forward", FORWARD)):
        for use_join in (False, True):
            with CountingAllReduce() as counter:
                result = _train(rank, schedule, [4, 4], use_join=use_join)
            out[name, use_join] = (result["final"], result["after"], counter.calls)
    out["second_joinable"] = _second_joinable(rank)
    return out


def _second_joinable(rank: int, world: int = 2) -> str:
    """DreamDDP must be the first joinable: the others never learn how many ranks still train."""
    first, second = DreamDDP(_model(), PLAIN), DreamDDP(_model(), PLAIN)
    try:
        with Join([first, second]):
            x, _ = _batch(rank, 0)
            second(x).sum().backward()
    except ValueError as exc:
        return str(exc)
    return ""


# ------------------------------------------------------------------------ the reference
def _reference(schedule: Schedule, steps: list[int]) -> list[dict]:
    """Partial local SGD, one model per rank; averages over the ranks that still have data.

    A delayed unit's snapshot is averaged over the ranks active when it was launched; those
    ranks add ``mean - snapshot`` before the forward of iteration t + 1 + d (or at the end).
    """
    world = len(steps)
    models = [_model() for _ in range(world)]
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in models]
    params = [dict(m.named_parameters()) for m in models]
    names = {u: [n for n in params[0] if n.rpartition(".")[0] == u] for u in ASSIGNMENT}
    pre: list[list[torch.Tensor]] = [[] for _ in range(world)]
    in_flight: list[tuple[int, str, dict[int, list[torch.Tensor]]]] = []

    @torch.no_grad()
    def land(now: float) -> None:
        nonlocal in_flight
        for _, unit, snaps in [f for f in in_flight if f[0] <= now]:
            for k, n in enumerate(names[unit]):
                mean = torch.stack([s[k] for s in snaps.values()]).mean(0)
                for r, s in snaps.items():
                    params[r][n].add_(mean - s[k])
        in_flight = [f for f in in_flight if f[0] > now]

    for t in range(max(steps)):
        land(t)
        active = [r for r in range(world) if t < steps[r]]
        for r in active:
            opts[r].zero_grad()
            x, y = _batch(r, t)
            nn.functional.cross_entropy(models[r](x), y).backward()
            pre[r].append(_flat(models[r]))
        with torch.no_grad():
            for unit in schedule.units_at(t % schedule.period):
                if schedule.delay_of(unit):
                    snaps = {r: [params[r][n].clone() for n in names[unit]] for r in active}
                    in_flight.append((t + 1 + schedule.delay_of(unit), unit, snaps))
                    continue
                for n in names[unit]:
                    mean = torch.stack([params[r][n] for r in active]).mean(0)
                    for r in active:
                        params[r][n].copy_(mean)
        for r in active:
            opts[r].step()
    land(float("inf"))
    return [{"pre": pre[r], "final": _flat(models[r])} for r in range(world)]


def _check_against_reference(results: list[dict], schedule: Schedule, steps: list[int]) -> None:
    reference = _reference(schedule, steps)
    for rank, (got, want) in enumerate(zip(results, reference)):
        assert len(got["pre"]) == steps[rank]
        for t, (g, w) in enumerate(zip(got["pre"], want["pre"])):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}, iteration {t}")
        np.testing.assert_allclose(got["final"], want["final"].numpy(), rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}")
        assert got["iteration"] == max(steps), (rank, got["iteration"])
        if steps[rank] < max(steps):  # it shadowed: its own last averages landed before
            assert got["in_flight"] == 0, (rank, got["in_flight"])
    # One iteration after Join on both ranks (phase max(steps) % 2): its units equal everywhere.
    for unit in schedule.units_at(max(steps) % schedule.period):
        cut = _unit_slices()[unit]
        assert np.array_equal(results[0]["after"][cut], results[1]["after"][cut]), unit


def _check_exact_averages(results: list[dict], schedule: Schedule, steps: list[int]) -> None:
    """The paper's mode: the averaged units right after backward, bit for bit."""
    cuts = _unit_slices()
    for t in range(max(steps)):
        active = [r for r in range(2) if t < steps[r]]
        for unit in schedule.units_at(t % schedule.period):
            cut = cuts[unit]
            if len(active) == 2:  # gloo sums two float32s exactly, then halves
                want = (results[0]["pre"][t][cut] + results[1]["pre"][t][cut]) / np.float32(2)
            else:  # an average over rank 0 alone is rank 0's weights
                want = results[0]["pre"][t][cut]
            for r in active:
                assert np.array_equal(results[r]["post"][t][cut], want), (t, unit, r, len(active))


# ------------------------------------------------------------------------------- tests
@pytest.mark.timeout(90)
def test_join_uneven_inputs_paper_mode():
    scenarios = [("plain", [6, 3]), ("plain", [3, 0])]  # 3 fewer; none at all (before the order rebuild)
    per_rank = run_workers(_uneven, 2, scenarios, timeout=60)
    for i, (_, steps) in enumerate(scenarios):
        results = [per_rank[0][i], per_rank[1][i]]
        _check_exact_averages(results, PLAIN, steps)
        _check_against_reference(results, PLAIN, steps)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_join_uneven_inputs_forward_overlap():
    scenarios = [("forward", [6, 3]), ("linked", [2, 5]), ("delayed", [6, 3]), ("delayed", [2, 5])]
    per_rank = run_workers(_uneven, 2, scenarios, timeout=60)
    for i, (name, steps) in enumerate(scenarios):
        _check_against_reference([per_rank[0][i], per_rank[1][i]], {"delayed": DELAYED}.get(name, FORWARD), steps)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_join_without_uneven_inputs_changes_nothing():
    for rank, out in enumerate(run_workers(_even, 2, timeout=60)):
        for name in ("plain", "forward"):
            (final, after, plain_calls), (join_final, join_after, join_calls) = out[name, False], out[name, True]
            assert np.array_equal(final, join_final) and np.array_equal(after, join_after), (rank, name)
            # Outside Join only the buckets are all-reduced (4 + 1 iterations, two buckets at phase 0,
            # one at phase 1); inside it, one count per iteration and one for Join's exit, and after it none.
            assert plain_calls == 2 + 1 + 2 + 1 + 2, (rank, name, plain_calls)
            assert join_calls == plain_calls + 4 + 1, (rank, name, join_calls)
        assert "first joinable" in out["second_joinable"], out["second_joinable"]


def _throwing(rank: int, world: int) -> str:
    """Join(throw_on_early_termination=True): the rank that ran out stops everyone, in one line."""
    model = _model()
    ddp = DreamDDP(model, Schedule.every_step([u.name for u in sync_units(model)]))
    try:
        with Join([ddp], throw_on_early_termination=True):
            for step in range(5 if rank == 0 else 3):
                x, y = _batch(rank, step)
                nn.functional.cross_entropy(ddp(x), y).backward()
    except RuntimeError as err:
        return str(err)
    return "no error"


def test_join_can_stop_every_rank_when_one_runs_out():
    messages = run_workers(_throwing, 2, timeout=60)
    assert messages == [
        "Detected at least one rank that exhausted inputs. Throwing across all ranks.",
        "Rank 1 exhausted all inputs.",
    ], messages

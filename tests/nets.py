"""Small models and a pure-Python reference of partial local SGD, for the wrapper's tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dreamddp import Schedule, sync_units


class MLP(nn.Module):
    """Four units with a BatchNorm in the middle, so buffers ride along with a unit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BatchNorm after the nonlinearity: fc1.bias before a BatchNorm would get an exactly-zero
        # gradient, whose rounding noise Adam amplifies to a full step.
        return self.head(torch.relu(self.fc2(self.bn(torch.tanh(self.fc1(x))))))


class ScrambledMLP(nn.Module):
    """Registers its layers in the reverse of forward order, so the static guess of backward
    order is wrong and the wrapper must learn the real one."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Linear(16, 4)
        self.b = nn.Linear(16, 16)
        self.a = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (GPT-2 style)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(idx))))


def make_batch(kind: str, rank: int, step: int, same_data: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * (0 if same_data else rank + 1) + step)
    if kind == "lm":
        idx = torch.randint(0, 11, (4, 6), generator=g)
        return idx, torch.roll(idx, -1, dims=1)
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


def loss_of(kind: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if kind == "lm":
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    return nn.functional.cross_entropy(out, target)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, kind: str, rank: int, steps: int) -> None:
    """``steps`` plain iterations on ``make_batch``'s data for this rank: zero_grad, loss, backward, step."""
    for step in range(steps):
        opt.zero_grad()
        x, y = make_batch(kind, rank, step)
        loss_of(kind, model(x), y).backward()
        opt.step()


def every_step_beside_ddp(
    base: nn.Module, kind: str, rank: int, steps: int, same_data: bool
) -> tuple[nn.parallel.DistributedDataParallel, nn.Module]:
    """torch DDP and DreamDDP with every unit every step, from copies of ``base``, stepped in turn
    on the same batches with SGD (lr 0.1): (ddp, dreamddp), for S-SGD parity checks."""
    from dreamddp import DreamDDP

    ref = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    ours = DreamDDP(copy.deepcopy(base), Schedule.every_step([u.name for u in sync_units(base)]))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(steps):
        x, y = make_batch(kind, rank, step, same_data=same_data)
        for model, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            loss_of(kind, model(x), y).backward()
            opt.step()
    return ref, ours


def make_optimizer(name: str, params) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05)
    if name == "momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    raise ValueError(name)


def random_schedule(names: Sequence[str], period: int, seed: int) -> Schedule:
    """Each unit at one or two random iterations: non-contiguous, sometimes empty phases."""
    g = torch.Generator().manual_seed(seed)
    assignment = {}
    for n in names:
        k = int(torch.randint(1, 3, (1,), generator=g))
        assignment[n] = sorted({int(torch.randint(0, period, (1,), generator=g)) for _ in range(k)})
    return Schedule(period=period, assignment=assignment)


def reference_partial_local_sgd(
    make_model: Callable[[], nn.Module],
    schedule: Schedule,
    world_size: int,
    steps: int,
    optimizer: str,
    kind: str,
    site_of: Sequence[int] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Partial local SGD written the slow, obvious way: one model copy per rank in one process.

    ``site_of`` (two-level): after every backward, the ranks of a site take their site's mean
    gradients and floating buffers, so they are one replica; the scheduled means are then
    over all ranks, which is the mean over sites.

    Each step: every copy computes its local gradient; the units scheduled at h = t mod H
    have their parameters and floating buffers replaced by the mean over copies; then every
    copy steps its own optimizer with its own gradient. A unit the schedule delays by d is
    snapshotted instead, and before the forward of step t + 1 + d each copy adds
    mean(snapshots) - its snapshot, keeping the local progress it made meanwhile.
    """
    torch.manual_seed(0)
    base = make_model()
    models = [copy.deepcopy(base) for _ in range(world_size)]
    optims = [make_optimizer(optimizer, m.parameters()) for m in models]
    units_per_rank = [sync_units(m) for m in models]
    in_flight: list[tuple[int, int, list[list[torch.Tensor]]]] = []  # (due, unit index, per-rank snapshots)

    @torch.no_grad()
    def land(due_by: float) -> None:
        """Delayed averages due now: every copy adds mean(snapshots) - its own snapshot."""
        nonlocal in_flight
        for _due, u_index, snaps in [f for f in in_flight if f[0] <= due_by]:
            for t_index in range(len(units_per_rank[0][u_index].tensors)):
                mean = torch.stack([snaps[r][t_index] for r in range(world_size)]).mean(0)
                for r in range(world_size):
                    units_per_rank[r][u_index].tensors[t_index].add_(mean - snaps[r][t_index])
        in_flight = [f for f in in_flight if f[0] > due_by]

    for step in range(steps):
        land(step)
        for rank, (model, opt) in enumerate(zip(models, optims)):
            opt.zero_grad()
            x, y = make_batch(kind, rank, step)
            loss_of(kind, model(x), y).backward()
        if site_of is not None:
            _site_means(models, units_per_rank, site_of)
        h = step % schedule.period
        with torch.no_grad():
            for u_index, unit in enumerate(units_per_rank[0]):
                if h not in schedule.iterations_of(unit.name):
                    continue
                if schedule.delay_of(unit.name):
                    snaps = [[t.clone() for t in units_per_rank[r][u_index].tensors] for r in range(world_size)]
                    in_flight.append((step + 1 + schedule.delay_of(unit.name), u_index, snaps))
                    continue
                for t_index in range(len(unit.tensors)):
                    copies = [units_per_rank[r][u_index].tensors[t_index] for r in range(world_size)]
                    mean = torch.stack(copies).mean(0)
                    for c in copies:
                        c.copy_(mean)
        for opt in optims:
            opt.step()
    land(float("inf"))  # what is still in flight lands at the end (the wrapper's flush)
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


@torch.no_grad()
def _site_means(models: list[nn.Module], units_per_rank: list, site_of: Sequence[int]) -> None:
    """Every rank takes its site's mean gradients and floating buffers (two-level's inner level)."""
    for site in set(site_of):
        ranks = [r for r, s in enumerate(site_of) if s == site]
        params = [list(models[r].parameters()) for r in ranks]
        for same in zip(*params, strict=True):
            if same[0].grad is not None:
                mean = torch.stack([p.grad for p in same]).mean(0)
                for p in same:
                    p.grad.copy_(mean)
        for u_index in range(len(units_per_rank[0])):
            for b_index in range(len(units_per_rank[0][u_index].buffers)):
                copies = [units_per_rank[r][u_index].buffers[b_index] for r in ranks]
                mean = torch.stack(copies).mean(0)
                for c in copies:
                    c.copy_(mean)

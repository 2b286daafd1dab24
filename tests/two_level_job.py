"""A job for tests/test_cluster.py, run under torchrun on every site of an emulated cluster.

    torchrun --nproc-per-node 2 tests/two_level_job.py MODE STEPS

Trains a 1 MiB linear model for STEPS iterations with every unit averaged every iteration
(period 1), two-level (``MODE=hierarchical``) or flat, and prints the bytes its wrapper
accounted; the test compares them with what the kernel counted on each site's uplink.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from dreamddp import DreamDDP, Schedule, sync_units


def main() -> None:
    mode, steps = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Linear(512, 512, bias=False)  # 1 MiB of fp32
    ddp = DreamDDP(model, Schedule.every_step([u.name for u in sync_units(model)]), hierarchy=mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sent = 0
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 512, generator=torch.Generator().manual_seed(dist.get_rank() * 1000 + step))
        ddp(x).square().mean().backward()
        opt.step()
        sent += ddp.last_stats.bytes_sent
    print(f"rank {dist.get_rank()} accounted {sent}", flush=True)
    del ddp
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

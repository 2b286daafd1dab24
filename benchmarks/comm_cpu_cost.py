"""How much compute a real transfer steals: forward+backward with and without an all-reduce in flight.

The cost model treats a transfer as free for the compute it hides behind. On a CPU machine
gloo's threads and the kernel's TCP path run on the same cores, so check it, on the
emulated cluster (2 sites x 1 process):

    dreamddp cluster up --sites 2 --wan 100mbit --wan-delay 20ms
    dreamddp cluster run -- python benchmarks/comm_cpu_cost.py
    dreamddp cluster down

Every repeat times the tiny GPT's forward+backward alone, then again while a 4 MB all-reduce
(about 0.35 s at 100 Mbit/s, longer than the compute) is in flight; medians on rank 0.
"""

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from dreamddp.training.config import load_config  # noqa: E402
from dreamddp.training.data import build_data  # noqa: E402
from dreamddp.training.loss import loss_for_task  # noqa: E402
from dreamddp.training.models import build_model  # noqa: E402


def main(repeats: int = 8, nbytes: int = 4 * 2**20) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["NODE_RANK"]), world_size=int(os.environ["NNODES"]))
    cfg = load_config("configs/gpt-tiny.toml", [])
    torch.manual_seed(0)
    model = build_model(cfg.model_name, cfg.model_options)
    data = build_data(
        cfg.data.name,
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        vocab_size=256,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        seed=0,
        max_bytes=cfg.data.max_bytes,
    )
    loss_fn = loss_for_task("lm")

    def compute(step: int) -> float:
        x, y = data.batch(step)
        start = time.perf_counter()
        loss_fn(model(x), y).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for step in range(3):
        compute(step)
    buffer = torch.zeros(nbytes // 4)
    alone, with_transfer = [], []
    for step in range(repeats):
        dist.barrier()
        alone.append(compute(step))
        dist.barrier()
        work = dist.all_reduce(buffer, async_op=True)
        with_transfer.append(compute(step))
        work.wait()
    if dist.get_rank() == 0:
        a, b = statistics.median(alone), statistics.median(with_transfer)
        print(
            f"forward+backward alone {a * 1e3:.1f} ms; with a {nbytes / 2**20:.0f} MiB all-reduce in flight "
            f"{b * 1e3:.1f} ms ({b / a:.3f}x)",
            flush=True,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""A small GPT trained through DeepSpeed, with DreamDDP's parameter averaging instead of its gradient all-reduce.

The training loop is DeepSpeed's own; the only DreamDDP lines are the import and
``dreamddp_ds.initialize`` (which reads the config's ``"dreamddp"`` section) in place of
``deepspeed.initialize``. Launch with either launcher (``launch/deepspeed/run.sh`` does):

    deepspeed --num_gpus 2 launch/deepspeed/train.py --deepspeed_config launch/deepspeed/ds_config.json
    torchrun --nproc-per-node 2 launch/deepspeed/train.py --deepspeed_config launch/deepspeed/ds_config.json

Without a GPU set ``DS_ACCELERATOR=cpu`` (gloo). Rank 0 prints one JSON line per optimizer step.
"""

from __future__ import annotations

import argparse
import gc
import json

import deepspeed
import torch
import torch.distributed as dist
from torch.nn import functional as F

from dreamddp.integrations import deepspeed as dreamddp_ds
from dreamddp.training.data.synthetic import SyntheticTokens
from dreamddp.training.models.gpt import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--save-dir", help="write a DeepSpeed checkpoint here at the end")
    parser.add_argument("--resume", action="store_true", help="load the latest checkpoint from --save-dir first")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(parser)  # --deepspeed_config
    args = parser.parse_args()

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=args.seq_len, n_layer=2, n_head=2, d_model=64))
    engine, _, _, _ = dreamddp_ds.initialize(args=args, model=model, model_parameters=model.parameters())
    group = engine.data_parallel_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if args.resume and args.save_dir:
        engine.load_checkpoint(args.save_dir)  # weights, optimizer state and DreamDDP's counter, per rank
    data = SyntheticTokens(256, engine.train_micro_batch_size_per_gpu(), args.seq_len, rank, world, seed=0)

    micro = engine.global_steps * engine.gradient_accumulation_steps()
    for _ in range(args.steps):
        for _ in range(engine.gradient_accumulation_steps()):
            x, y = (t.to(engine.device) for t in data.batch(micro))
            micro += 1
            logits = engine(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            engine.backward(loss)
            engine.step()
        stats = engine.dreamddp.last_stats
        if dist.get_rank() == 0:
            print(
                json.dumps(
                    {
                        "step": engine.global_steps,
                        "loss": round(loss.item(), 4),
                        "dreamddp_iteration": engine.dreamddp.iteration,
                        "phase": stats.phase,
                        "units_averaged": len(stats.units),
                        "bytes_sent": stats.bytes_sent,
                    }
                ),
                flush=True,
            )
    if args.save_dir:
        engine.save_checkpoint(args.save_dir)  # every rank's local state: resume continues mid-period
    engine.dreamddp.average_all()  # one model for evaluation or export
    if dist.get_rank() == 0:
        print(json.dumps({"done": engine.global_steps, "bytes_sent_total": engine.dreamddp.total_bytes_sent}))
    # Tear down in order: the engine (and the wrapper's hooks and process-group references)
    # first, then every rank past the last collective, then the group. Exiting with the group
    # still alive can abort a rank ("terminate called without an active exception").
    del engine
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Launched by test_trainer.py under `torchrun --nproc_per_node 2` (gloo, CPU): a few pruning steps per rank."""

import json
import sys

import torch.distributed as dist
from safetensors.torch import save_file
from tiny import end_process_group, tiny_trainer


def main(out: str) -> None:
    trainer = tiny_trainer(
        f"{out}/run", max_steps=3, prune_end_step=2, ddp_backend="gloo", prune_scorer="wanda"
    )  # wanda: activation statistics differ per rank and must be reduced
    trainer.train()
    rank = dist.get_rank()
    save_file({k: v.contiguous() for k, v in trainer.pruner.masks.items()}, f"{out}/masks_rank{rank}.safetensors")
    with open(f"{out}/ddp_rank{rank}.json", "w") as f:
        json.dump({"world_size": dist.get_world_size(), "sparsity": trainer.pruner.sparsity()}, f)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

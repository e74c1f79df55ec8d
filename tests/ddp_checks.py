"""Launched by test_trainer.py under `torchrun --nproc_per_node 2` (gloo, CPU): what DDP ranks must agree on.

``mixed_signal``: the statistic (mama, alpha > 0) and distillation on, rank 0's rewards constant (every advantage
zero there) and rank 1's varying. Every decision at a prune event must come from values reduced across ranks, or
rank 1 waits in a collective that rank 0 skipped (a hang) and the masks differ.

``resume``: a run that checkpoints at step 2 and goes on to step 4, and a second run resumed from that checkpoint.
Activation statistics are per-rank sums; the checkpoint must hold them for every rank exactly once, so that the
resumed run ends with the uninterrupted run's masks and statistics.

Each rank writes ``<mode>_rank{r}.json`` and its masks, for the test to compare.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from tiny import end_process_group, tiny_trainer, varied_reward

COMMON = dict(ddp_backend="gloo", mama_alpha=0.5, mama_min_updates=1, distill_coef=1.0)


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


def figures(trainer) -> dict:
    """Masks, the reward statistic and the activation statistics reduced over the ranks (a collective)."""
    pruner = trainer.pruner
    acts = pruner.indicators.reduced_activations()
    return {
        "masks": {n: m.contiguous() for n, m in pruner.masks.items()},
        "movement": pruner.movement,
        "rms": acts.rms,
        "updates": pruner.movement_updates,
        "sparsity": pruner.sparsity(),
        "events": [e["step"] for e in trainer.prune_events],
    }


def mixed_signal(out: str, rank: int) -> dict:
    reward = constant_reward if rank == 0 else varied_reward
    trainer = tiny_trainer(f"{out}/mixed", reward=reward, max_steps=3, prune_start_step=2, prune_end_step=3, **COMMON)
    trainer.train()
    result = figures(trainer)
    zero_std = [e["frac_reward_zero_std"] for e in trainer.state.log_history if "frac_reward_zero_std" in e]
    return {**result, "mixed": [e.get("statistic_mixed") for e in trainer.prune_events], "zero_std": zero_std}


def resume(out: str, rank: int) -> dict:
    kwargs = dict(max_steps=4, prune_start_step=1, prune_end_step=4, save_strategy="steps", save_steps=2, **COMMON)
    full = tiny_trainer(f"{out}/full", **kwargs)
    full.train()
    uninterrupted = figures(full)
    resumed = tiny_trainer(f"{out}/resumed", **kwargs)
    resumed.train(resume_from_checkpoint=f"{out}/full/checkpoint-2")
    again = figures(resumed)
    equal = {}
    for key in ("masks", "movement", "rms"):
        equal[key] = all(
            torch.allclose(again[key][n].float(), t.float(), rtol=1e-5) for n, t in uninterrupted[key].items()
        )
    return {
        **uninterrupted,
        "equal": equal,
        "updates_resumed": again["updates"],
        "events_resumed": again["events"],
    }


def main(mode: str, out: str) -> None:
    rank = int(os.environ["RANK"])  # the process group starts with the first trainer
    result = {"mixed_signal": mixed_signal, "resume": resume}[mode](out, rank)
    save_file(result.pop("masks"), f"{out}/{mode}_masks_rank{rank}.safetensors")
    result.pop("movement")
    result.pop("rms")
    with open(f"{out}/{mode}_rank{rank}.json", "w") as f:
        json.dump({"world_size": dist.get_world_size(), **result}, f)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Launched by test_fsdp2.py under `torchrun --nproc_per_node 1` (gloo, CPU): the trainer's teacher under FSDP2.

Accelerate's FSDP plugin does not engage on CPU, so the trainer's teacher is sharded here by the function a run
uses, `Distiller._prepare_fsdp` (each decoder layer, the head group, then the root), with the plugin's settings.
The sharded run trains two steps with rollout KD, the hidden-state term and text distillation on, and must log the
same distillation losses and end with the same weights as the run with a plain teacher. The teacher's backbone called directly (skipping the root's pre-forward
gathering) failed at the first loss with ``aten.embedding got mixed torch.Tensor and DTensor``.
"""

import json
import sys
from types import SimpleNamespace

import torch
from tiny import end_process_group, tiny_trainer
from torch.distributed.fsdp import FSDPModule

from grpo_prune.distiller import Distiller

KEYS = ("distill/loss", "distill/hidden_loss", "distill/text_loss")


def run(out: str, text: str, wrap: str | None) -> dict:
    trainer = tiny_trainer(
        f"{out}/{wrap}",
        max_steps=2,
        prune_end_step=1,
        ddp_backend="gloo",
        distill_coef=1.0,
        distill_hidden_coef=1.0,
        distill_dataset=text,
        distill_text_length=16,
    )
    distiller = trainer.distiller
    if wrap == "layers":
        plugin = SimpleNamespace(
            fsdp_version=2,
            mixed_precision_policy=None,
            reshard_after_forward=True,
            cpu_offload=None,
            ignored_modules=None,
        )
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"))
        distiller.teacher = Distiller._prepare_fsdp(SimpleNamespace(accelerator=accelerator), distiller.teacher)
        assert isinstance(distiller.teacher.model.layers[0], FSDPModule)
    if wrap is not None:
        assert isinstance(distiller.teacher, FSDPModule)
    trainer.train()
    logs = {k: [e[k] for e in trainer.state.log_history if k in e] for k in KEYS}
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {"logs": logs, "weights": weights, "sparsity": trainer.pruner.sparsity()}


def main(out: str, text: str) -> None:
    plain = run(out, text, None)
    result = {"plain": plain["logs"]}
    for wrap in ("layers",):
        sharded = run(out, text, wrap)
        result[wrap] = sharded["logs"]
        result[f"{wrap}_weights_equal"] = all(
            torch.allclose(sharded["weights"][n], w, atol=1e-6) for n, w in plain["weights"].items()
        )
        result[f"{wrap}_sparsity"] = sharded["sparsity"]
    with open(f"{out}/fsdp2_teacher.json", "w") as f:
        json.dump(result, f)
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

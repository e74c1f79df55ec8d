"""Bytes per pruned weight of the pruner's state, per indicator, as `MamaGRPOTrainer` builds it (issue 12).

Builds the trainer (no training step) on the embedded SmolLM2-135M-Instruct for each configuration below and reads
`Pruner.memory_bytes()`: masks, `|W0|` (read from the distillation teacher, or from the checkpoint file the model
was loaded from, else a 16-bit snapshot), the reward statistic (mama with alpha > 0) and the activation statistics.
Then the per-GPU figure for an 8B model (Llama-3-8B: 6.98e9 weights in decoder linears) from the measured bytes per
weight, under DDP (every rank holds everything) and FSDP2 over 8 GPUs (each rank its shard).

    OMP_NUM_THREADS=2 python scripts/measure_pruner_memory.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

CONFIGS = {
    # label: (MamaGRPOConfig fields, change the model after loading so that no checkpoint file matches it)
    "wanda, distillation": (dict(prune_scorer="wanda", distill_coef=1.0), False),
    "wanda, no distillation": (dict(prune_scorer="wanda", distill_coef=0.0), False),
    "mama a=0.2 (statistic), distillation": (dict(prune_scorer="mama", mama_alpha=0.2, distill_coef=1.0), False),
    "mama a=0.2 (statistic), no distillation": (dict(prune_scorer="mama", mama_alpha=0.2, distill_coef=0.0), False),
    "mama a=0.2, no distillation, model changed in memory": (
        dict(prune_scorer="mama", mama_alpha=0.2, distill_coef=0.0),
        True,
    ),
}
#: Before issue 12 (fp32 |W0| copy, fp32 statistic, bool masks), bytes per weight.
BEFORE = {"masks": 1.0, "magnitude": 4.0, "movement": 4.0}
LLAMA3_8B_LINEAR_WEIGHTS = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336)


def measure(fields: dict, change: bool) -> dict:
    import torch

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct")
    if change:
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with tempfile.TemporaryDirectory() as out:
        args = MamaGRPOConfig(
            output_dir=out,
            max_steps=10,
            per_device_train_batch_size=2,
            num_generations=2,
            report_to="none",
            bf16=False,
            prune_target_sparsity=0.5,
            **fields,
        )
        trainer = MamaGRPOTrainer(
            model=model,
            reward_funcs=[reward_fns.get("math_answer")],
            args=args,
            train_dataset=load_prompt_dataset("arithmetic", "train", num_samples=8),
            processing_class=load_tokenizer("smollm2-135m-instruct"),
        )
        pruner = trainer.pruner
        weights = sum(m.numel() for m in pruner.masks.values())
        mem = pruner.memory_bytes()
        return {
            "weights": weights,
            "magnitude_source": pruner.indicators.magnitude_source,
            "bytes": mem,
            "bytes_per_weight": {k: v / weights for k, v in mem.items()},
            "total_per_weight": sum(mem.values()) / weights,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    results = {label: measure(fields, change) for label, (fields, change) in CONFIGS.items()}
    print("\nPruner state of MamaGRPOTrainer on SmolLM2-135M-Instruct, 50% unstructured (bytes per pruned weight)\n")
    print(
        "| configuration | |W0| from | masks | |W0| | statistic | activations | total | 8B model, per GPU: DDP | FSDP2 x8 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        b = r["bytes_per_weight"]
        total = r["total_per_weight"]
        gb = total * LLAMA3_8B_LINEAR_WEIGHTS / 1e9
        print(
            f"| {label} | {r['magnitude_source']} | {b['masks']:.2f} | {b['magnitude']:.2f} | {b['movement']:.3f} | "
            f"{b['activations']:.4f} | {total:.2f} | {gb:.1f} GB | {gb / 8:.1f} GB |"
        )
    before = sum(BEFORE.values())
    print(
        f"\nBefore: masks {BEFORE['masks']:g} + |W0| {BEFORE['magnitude']:g} + statistic {BEFORE['movement']:g} = "
        f"{before:g} B per weight with the statistic ({before * LLAMA3_8B_LINEAR_WEIGHTS / 1e9:.0f} GB per GPU for "
        f"an 8B model under DDP), 5 B without."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "before": BEFORE, "llama3_8b_linear_weights": LLAMA3_8B_LINEAR_WEIGHTS}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

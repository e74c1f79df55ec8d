"""How much signal does GRPO's reward-weighted movement carry in a short run? (Why ``mama_alpha`` defaults to 0.)

Trains the embedded SmolLM2-135M-Instruct with `MamaGRPOTrainer` for ``--steps`` steps on the ``arithmetic``
prompts (reward ``math_answer``), tracking movement ``R += -(grad * W)`` without pruning (the one prune event is
scheduled after the last step) and without distillation (before the first event the teacher equals the student, so
its gradient is zero anyway). Movement is split at the middle step into the first half's sum ``R1`` and the second
half's ``R2``. If movement measured a property of the weights, the two halves would agree; if it is mostly noise
from a few sampled completions, they do not. Reported:

* how many steps had a non-zero advantage (a group whose rewards were not all equal): the others give GRPO a zero
  gradient, so they add nothing to movement;
* per layer, the correlation of ``R1`` and ``R2`` (Pearson), and the fraction of weights on which their signs agree
  (0.5 = chance), as median and range over the 210 pruned matrices;
* the same split-half correlation of the Wanda term ``|W0| * ||x||`` (activation statistics of the two halves), for
  scale: an indicator that measures the weights.

    OMP_NUM_THREADS=2 python scripts/measure_movement_signal.py [--steps 12] [--temperature 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch
from _short_run import short_run_fields

from grpo_prune.fileio import write_json_atomic


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def _summary(values: list[float]) -> str:
    finite = [v for v in values if v == v]
    if not finite:
        return "n/a (all zero)"
    q = statistics.quantiles(finite, n=10) if len(finite) > 1 else [finite[0]] * 9
    return f"{statistics.median(finite):.3f} (p10 {q[0]:.3f}, p90 {q[-1]:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps (even; split in two halves)")
    parser.add_argument("--completions", type=int, default=4, help="completions per step (one prompt group)")
    parser.add_argument("--tokens", type=int, default=32, help="max completion length")
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be an even number >= 2")

    from transformers import PrinterCallback, TrainerCallback

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    half = args.steps // 2
    with tempfile.TemporaryDirectory(prefix="movement-signal-") as output_dir:
        config = MamaGRPOConfig(
            **short_run_fields(
                output_dir, args.steps, args.completions, args.tokens, args.learning_rate, args.temperature
            ),
            prune_target_sparsity=0.5,
            prune_scorer="mama",
            mama_alpha=0.5,  # any alpha > 0 tracks movement; no event happens before the last step
            prune_schedule="oneshot",
            prune_start_step=args.steps,
            prune_end_step=args.steps,
            distill_coef=0.0,
        )
        trainer = MamaGRPOTrainer(
            model=model,
            reward_funcs=[reward_fns.get("math_answer")],
            args=config,
            train_dataset=load_prompt_dataset("arithmetic", "train", num_samples=64),
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        pruner = trainer.pruner
        snapshots: dict[str, dict] = {}

        def activation_sums() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {n: (st.sumsq.clone(), st.count.clone()) for n, st in pruner.activations.items()}

        class Split(TrainerCallback):
            def on_step_end(self, args_, state, control, **kwargs):
                if state.global_step == half:
                    snapshots["movement"] = {n: t.clone() for n, t in pruner.movement.items()}
                    snapshots["acts"] = activation_sums()

        trainer.add_callback(Split())
        trainer.train()
        # The last step's prune event uses the movement and activations; read them before anything else changes.
        final_movement = pruner.movement
        final_acts = activation_sums()
        log = [e for e in trainer.state.log_history if "reward" in e]

    movement_corr, sign_agree, wanda_corr = [], [], []
    zero_layers = 0
    for name, total in final_movement.items():
        first = snapshots["movement"][name]
        second = total - first
        if not first.any() or not second.any():
            zero_layers += 1
        movement_corr.append(_corr(first, second))
        both = (first != 0) & (second != 0)
        sign_agree.append(float(((first > 0) == (second > 0))[both].float().mean()) if both.any() else float("nan"))
        sumsq1, n1 = snapshots["acts"][name]
        sumsq2, n2 = final_acts[name][0] - sumsq1, final_acts[name][1] - n1
        w0 = pruner.magnitude[name].float()
        rms1, rms2 = (sumsq1 / n1).sqrt().float(), (sumsq2 / n2).sqrt().float()
        wanda_corr.append(_corr(w0 * rms1, w0 * rms2))

    informative = [e for e in log if e.get("reward_std", 0.0) > 0]
    result = {
        "steps": args.steps,
        "completions": args.completions,
        "tokens": args.tokens,
        "temperature": args.temperature,
        "rewards": [e["reward"] for e in log],
        "steps_with_nonzero_advantage": len(informative),
        "movement_split_half_corr": movement_corr,
        "movement_sign_agreement": sign_agree,
        "wanda_split_half_corr": wanda_corr,
        "layers_with_zero_movement_in_a_half": zero_layers,
    }
    print(
        f"\nSmolLM2-135M-Instruct, {args.steps} GRPO steps x {args.completions} completions x {args.tokens} tokens, "
        f"temperature {args.temperature}, lr {args.learning_rate}; halves: steps 1-{half} and {half + 1}-{args.steps}\n"
    )
    print(f"rewards per step: {', '.join(f'{r:.2f}' for r in result['rewards'])}")
    print(f"steps with a non-zero advantage: {len(informative)} of {len(log)}\n")
    print("| indicator | split-half correlation per layer, median (p10, p90) | sign agreement (0.5 = chance) |")
    print("|---|---|---|")
    print(f"| movement -(grad * W) | {_summary(movement_corr)} | {_summary(sign_agree)} |")
    print(f"| Wanda term abs(W0) * rms(x) | {_summary(wanda_corr)} | |")
    if args.json:
        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

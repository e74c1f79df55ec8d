"""How reliable is each form of the reward-driven statistic over a short GRPO run? (Chooses `mama_statistic`.)

Trains the embedded SmolLM2-135M-Instruct with `MamaGRPOTrainer` on the ``arithmetic`` prompts (reward
``math_answer``), without distillation, so that the gradient at every optimizer step is the GRPO loss's own. From
those same gradients it accumulates all three forms of the statistic at once: ``signed`` ``-(g * W)`` (movement),
``abs`` ``|g * W|`` and ``squared`` ``(g * W)^2``. The run is split at its middle step into two disjoint halves of
rollouts; a statistic that measures the weights ranks them alike in both halves. Reported per form: the per-layer
Spearman correlation of the two halves (over the kept weights, a strided 50k per layer), median and p10 over the 210
pruned matrices, next to TRL's ``frac_reward_zero_std`` (median over steps: 1 means no group taught anything) and
the Wanda term ``|W0| * rms(x)`` of the two halves, for scale.

Conditions: ``dense`` (no pruning) and ``sparse-<s>`` (the first event prunes to ``s`` by the pretrained term alone,
Wanda's, after one step; the halves start after it).

    OMP_NUM_THREADS=2 python scripts/measure_movement_signal.py [--steps 12] [--sparsities 0 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch
from _short_run import short_run_fields

from grpo_prune.fileio import write_json_atomic

FORMS = ("signed", "abs", "squared")
MAX_ENTRIES = 50_000  # per layer, strided: enough for a stable Spearman, and 210 matrices x 4 indicators stay fast


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from grpo_prune.pruning.scores import rank_correlation

    return rank_correlation(a, b, max_entries=MAX_ENTRIES)


def _median_p10(values: list[float]) -> tuple[float | None, float | None]:
    finite = sorted(v for v in values if v == v)
    if not finite:
        return None, None
    return statistics.median(finite), finite[max(0, int(0.1 * len(finite)) - 1)] if len(finite) >= 10 else finite[0]


def run_condition(sparsity: float, args: argparse.Namespace) -> dict:
    from transformers import PrinterCallback, TrainerCallback

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.pruning import scores as S

    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    warm = 1 if sparsity > 0 else 0  # the pruned condition's event happens at the end of step 1
    total = warm + args.steps
    half_end = warm + args.steps // 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="statistic-signal-") as output_dir:
        config = MamaGRPOConfig(
            **short_run_fields(output_dir, total, args.completions, args.tokens, args.learning_rate),
            prune_target_sparsity=sparsity if sparsity > 0 else 0.5,
            prune_scorer="mama",
            mama_alpha=0.5,  # tracks the statistic; it is never mixed in (min updates above the run's length)
            mama_min_updates=10_000,
            prune_schedule="oneshot",
            prune_start_step=0 if sparsity > 0 else total,
            prune_end_step=0 if sparsity > 0 else total,
            distill_coef=0.0,
        )
        trainer = MamaGRPOTrainer(
            model=model,
            reward_funcs=[reward_fns.get("math_answer")],
            args=config,
            train_dataset=load_prompt_dataset(args.dataset, "train", num_samples=256),
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        pruner = trainer.pruner
        targets = pruner.targets
        sums = {f: {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in targets.items()} for f in FORMS}

        def add_all_forms(grads=None) -> bool:  # replaces the indicator's update: the same gradients, three forms
            for name, mod in targets.items():
                g = mod.weight.grad if grads is None else grads.get(name)
                if g is not None:
                    for form in FORMS:
                        S.statistic_update_(sums[form][name], mod.weight.detach(), g, form)
            return True

        pruner.indicators.add_statistic_ = add_all_forms
        snaps: dict[int, dict] = {}

        def snapshot() -> dict:
            acts = {n: (st.sumsq.clone(), st.count.clone()) for n, st in pruner.activations.items()}
            return {"stat": {f: {n: t.clone() for n, t in sums[f].items()} for f in FORMS}, "acts": acts}

        class Split(TrainerCallback):
            def on_step_end(self, args_, state, control, **kwargs):
                if state.global_step in (warm, half_end):
                    snaps[state.global_step] = snapshot()

        if warm == 0:
            snaps[0] = snapshot()
        trainer.add_callback(Split())
        trainer.train()
        snaps[total] = snapshot()
        log = [e for e in trainer.state.log_history if "reward" in e]
        # Dense: every weight counts (the run ends with the never-used event the schedule needs).
        masks = {n: m.clone() if sparsity > 0 else torch.ones_like(m) for n, m in pruner.masks.items()}
        magnitude = {n: t.float() for n, t in pruner.magnitude.items()}
    seconds = time.perf_counter() - started

    def half(key_a: int, key_b: int, form: str, name: str) -> torch.Tensor:
        return snaps[key_b]["stat"][form][name] - snaps[key_a]["stat"][form][name]

    rows = {}
    for form in FORMS:
        corr = []
        for name, keep in masks.items():
            a, b = half(warm, half_end, form, name)[keep], half(half_end, total, form, name)[keep]
            corr.append(_spearman(a, b))
        rows[form] = corr
    wanda = []
    for name, keep in masks.items():
        rms = []
        for k_a, k_b in ((warm, half_end), (half_end, total)):
            sumsq = snaps[k_b]["acts"][name][0] - snaps[k_a]["acts"][name][0]
            count = snaps[k_b]["acts"][name][1] - snaps[k_a]["acts"][name][1]
            rms.append((sumsq / count).sqrt().float())
        wanda.append(_spearman((magnitude[name] * rms[0])[keep], (magnitude[name] * rms[1])[keep]))
    rows["wanda term"] = wanda
    zero_std = [e["frac_reward_zero_std"] for e in log if "frac_reward_zero_std" in e]
    clipped = [e["completions/clipped_ratio"] for e in log if "completions/clipped_ratio" in e]
    return {
        "sparsity": sparsity,
        "steps": args.steps,
        "seconds": seconds,
        "rewards": [e["reward"] for e in log],
        "frac_reward_zero_std": zero_std,
        "clipped_ratio": clipped,
        "spearman": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="GRPO steps measured (even; split in two halves)")
    parser.add_argument("--completions", type=int, default=8, help="completions per step (one prompt group)")
    parser.add_argument("--tokens", type=int, default=48, help="max completion length")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--dataset", default="arithmetic", help="built-in prompt set")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be an even number >= 2")

    results = [run_condition(s, args) for s in args.sparsities]
    print(
        f"\nSmolLM2-135M-Instruct, {args.dataset}, {args.steps} GRPO steps x {args.completions} completions x "
        f"{args.tokens} tokens, lr {args.learning_rate}, no distillation; split-half Spearman per layer over kept "
        "weights\n"
    )
    print(
        "| condition | statistic | Spearman median | Spearman p10 | median frac_reward_zero_std | steps with signal "
        "| median clipped_ratio | run (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        zs = r["frac_reward_zero_std"]
        with_signal = sum(1 for v in zs if v < 1.0)
        for form, corr in r["spearman"].items():
            med, p10 = _median_p10(corr)
            cond = "dense" if r["sparsity"] == 0 else f"sparse-{r['sparsity']:g}"
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(
                f"| {cond} | {form} | {fmt(med)} | {fmt(p10)} | {statistics.median(zs) if zs else float('nan'):.3f} "
                f"| {with_signal}/{len(zs)} | "
                f"{statistics.median(r['clipped_ratio']) if r['clipped_ratio'] else float('nan'):.3f} "
                f"| {r['seconds']:.0f} |"
            )
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())

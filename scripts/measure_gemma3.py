"""One-shot pruning of the embedded Gemma 3 270M base model against dense: held-out perplexity and PIQA.

Conditions: ``dense``; ``wanda-50`` (Wanda, 50% of every decoder linear, per-layer ranking); ``wanda-mlp-25``
(structured, 25% of the MLP intermediate neurons of every layer, activation-aware Wanda group scores; exportable
as a vanilla Gemma3ForCausalLM with intermediate_size 1536). Calibration: ``--calibration-windows`` windows of
``--calibration-length`` tokens of the stdlib's Python documentation (``pydoc_data.topics``), never evaluation text.
Evaluation (:func:`grpo_prune.evaluate.evaluate_model`, same seeded items for every model): LAMBADA perplexity over
``--lambada`` windows of 512 tokens, PIQA 0-shot over ``--piqa`` items.

    OMP_NUM_THREADS=1 python scripts/measure_gemma3.py [--lambada 8] [--piqa 100] [--json results/gemma3_270m.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

MODEL = "gemma3-270m"
CONDITIONS = {
    "dense": None,
    "wanda-50": dict(sparsity=0.5, granularity="unstructured", scorer="wanda"),
    "wanda-mlp-25": dict(sparsity=0.25, granularity="structured", scorer="wanda", structured_units="mlp"),
}


def calibration(tokenizer, windows: int, length: int) -> torch.Tensor:
    """``[windows, length]`` token ids spread evenly over the stdlib's Python documentation."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    stream = tokenizer("\n\n".join(topics[k] for k in sorted(topics)), add_special_tokens=False)["input_ids"]
    stride = len(stream) // windows
    return torch.tensor([stream[i * stride : i * stride + length] for i in range(windows)], dtype=torch.long)


def main() -> None:
    from grpo_prune import prune_oneshot
    from grpo_prune.evaluate import evaluate_model
    from grpo_prune.models import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambada", type=int, default=8, help="LAMBADA perplexity windows (512 tokens)")
    parser.add_argument("--piqa", type=int, default=100, help="PIQA items")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--calibration-length", type=int, default=256)
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    tokenizer = load_tokenizer(MODEL)
    calib = calibration(tokenizer, args.calibration_windows, args.calibration_length)
    results = {}
    for name in args.conditions:
        start = time.perf_counter()
        model = load_model(MODEL).eval()
        prune = CONDITIONS[name]
        report = None
        if prune is not None:
            prune = dict(prune)
            report = prune_oneshot(model, prune.pop("sparsity"), prune.pop("granularity"), calibration=calib, **prune)
        pruned_s = time.perf_counter() - start
        out = evaluate_model(
            model, ["lambada", "piqa"], tokenizer=tokenizer, limits={"lambada": args.lambada, "piqa": args.piqa}
        )
        results[name] = {
            "perplexity": out["tasks"]["lambada"]["perplexity"],
            "piqa_acc": out["tasks"]["piqa"]["acc"],
            "piqa_acc_norm": out["tasks"]["piqa"]["acc_norm"],
            "global_sparsity": None if report is None else report.global_sparsity,
            "params_zeroed": None if report is None else report.params_zeroed,
            "load_and_prune_s": round(pruned_s, 1),
            "total_s": round(time.perf_counter() - start, 1),
        }
        print(name, json.dumps(results[name]), flush=True)
        del model
    dense = results.get("dense")
    print("| condition | LAMBADA ppl | x dense | PIQA acc | PIQA acc_norm | time (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ratio = f"{r['perplexity'] / dense['perplexity']:.2f}x" if dense else "n/a"
        print(
            f"| {name} | {r['perplexity']:.2f} | {ratio} | {r['piqa_acc']:.2f} | {r['piqa_acc_norm']:.2f} "
            f"| {r['total_s']:.0f} |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()

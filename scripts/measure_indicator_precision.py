"""Does a lower-precision copy of an indicator keep its ranking? (Chooses how ``|W0|`` and the statistic are stored.)

On the embedded SmolLM2-135M-Instruct, with activation statistics from 8 x 256 tokens of the stdlib's Python
documentation, builds the per-layer masks of 50% unstructured Wanda and of 2:4 Wanda from ``|W0|`` stored in
fp32 (the reference), bf16, fp16 and float8 (e4m3), and reports the fraction of weights whose keep/prune decision
differs from fp32, plus the held-out LAMBADA perplexity of the model pruned with each (4 windows of 512 tokens).

Then the same for the reward statistic's storage: the split-half-free question is whether a bf16 accumulator keeps
the fp32 accumulator's per-layer ranking after N noisy steps; it is simulated with N random gradient draws
(Spearman between the fp32 and the bf16 sums, median over layers).

    OMP_NUM_THREADS=2 python scripts/measure_indicator_precision.py
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from bench_quality import _text_stream, _windows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8-e4m3": torch.float8_e4m3fn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50, help="simulated statistic updates")
    args = parser.parse_args(argv)

    from grpo_prune.evaluate import load_lambada_passages, perplexity
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.pruning import masks as M
    from grpo_prune.pruning.pruner import Pruner, PruningSettings
    from grpo_prune.pruning.scores import normalize_scores

    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model.eval()
    calib = torch.tensor(_windows(_text_stream(tokenizer), 8, 256, "pydoc_data.topics"))
    pruner = Pruner(model, PruningSettings(scorer="wanda"))
    pruner.attach_hooks()
    with torch.no_grad():
        for row in calib:
            model(row[None])
    pruner.remove_hooks()
    acts = pruner.indicators.reduced_activations()
    dense = {n: m.weight.detach().clone() for n, m in pruner.targets.items()}
    passages = load_lambada_passages(seed=0)
    base_ppl = perplexity(model, tokenizer, passages, num_windows=args.ppl_windows, progress=False)["perplexity"]

    rows = []
    reference: dict[str, dict[str, torch.Tensor]] = {}
    for label, dtype in DTYPES.items():
        for setting in ("unstructured-50", "2:4"):
            masks = {}
            for name, w in dense.items():
                scores = w.abs().to(dtype).float() * acts.rms[name]
                masks[name] = M.unstructured_mask(scores, 0.5) if setting != "2:4" else M.n_m_mask(scores, 2, 4)
            if label == "fp32":
                reference[setting] = masks
            differ = sum(int((masks[n] != reference[setting][n]).sum()) for n in masks)
            total = sum(m.numel() for m in masks.values())
            with torch.no_grad():
                for name, mod in pruner.targets.items():
                    mod.weight.copy_(dense[name] * masks[name])
            ppl = perplexity(model, tokenizer, passages, num_windows=args.ppl_windows, progress=False)["perplexity"]
            rows.append((label, setting, differ / total, ppl / base_ppl))
    with torch.no_grad():
        for name, mod in pruner.targets.items():
            mod.weight.copy_(dense[name])

    print("\nSmolLM2-135M-Instruct, Wanda masks from |W0| stored in each dtype (activations: 8 x 256 stdlib tokens)")
    print(f"LAMBADA perplexity of the dense model: {base_ppl:.2f} ({args.ppl_windows} x 512 tokens)\n")
    print("| |W0| dtype | bytes/weight | setting | decisions differing from fp32 | perplexity / dense |")
    print("|---|---|---|---|---|")
    for label, setting, frac, ratio in rows:
        size = torch.tensor([], dtype=DTYPES[label]).element_size()
        print(f"| {label} | {size} | {setting} | {100 * frac:.3f}% | {ratio:.3f}x |")

    # Statistic accumulators: fp32 vs bf16 sums of the same noisy per-step saliencies.
    g = torch.Generator().manual_seed(0)
    corr = {"bf16": [], "fp16": []}
    for w in list(dense.values())[:: max(1, len(dense) // 21)]:
        acc32 = torch.zeros_like(w, dtype=torch.float32)
        low = {k: torch.zeros_like(w, dtype=DTYPES[k]) for k in corr}
        signal = torch.randn(w.shape, generator=g) * w.abs()
        for _ in range(args.steps):
            step = (signal + 3 * torch.randn(w.shape, generator=g) * w.abs()).abs() * 1e-6
            acc32 += step
            for k in low:
                low[k] += step.to(DTYPES[k])
        r32 = normalize_scores(acc32, "rank").double().flatten()
        for k in corr:
            rl = normalize_scores(low[k].float(), "rank").double().flatten()
            a, b = r32 - r32.mean(), rl - rl.mean()
            corr[k].append(float((a @ b) / (a.norm() * b.norm())))
    print(
        f"\nReward statistic (abs form), {args.steps} simulated noisy steps: Spearman of a low-precision accumulator"
    )
    print("with the fp32 one, median over 21 layers\n")
    print("| accumulator | bytes/weight | Spearman with fp32 |")
    print("|---|---|---|")
    for k, values in corr.items():
        print(f"| {k} | 2 | {statistics.median(values):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

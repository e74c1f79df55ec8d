"""Does a lower-precision copy of an indicator keep its ranking? (Chooses how ``|W0|`` and the statistic are stored.)

On the embedded SmolLM2-135M-Instruct, with activation statistics from 8 x 256 tokens of the stdlib's Python
documentation, builds the per-layer masks of 50% unstructured Wanda and of 2:4 Wanda from ``|W0|`` stored in
fp32 (the reference), bf16, fp16 and float8 (e4m3), and reports the fraction of weights whose keep/prune decision
differs from fp32, plus the held-out LAMBADA perplexity of the model pruned with each (4 windows of 512 tokens).

Then the same for the reward statistic's storage: does a 2-byte accumulator keep the fp32 accumulator's per-layer
ranking after N noisy steps? Simulated with N random saliency draws of the size of |g * W| (1e-6 relative to the
weights, heavy-tailed) on 21 of the model's matrices: Spearman between the fp32 sum and a plain bf16 sum, a plain
fp16 sum, and the row-scaled fp16 accumulator the pruner uses (:class:`grpo_prune.pruning.compact.RowScaledHalf`),
median over layers, and the fraction of 50% keep/prune decisions (statistic alone, per layer) that differ.

    OMP_NUM_THREADS=2 python scripts/measure_indicator_precision.py [--statistic-only] [--steps 50 200 1000]
        [--page results/statistic/storage.md] [--tables-only]

``--page`` writes the statistic table as a results page with its generated header (command, device, date, budget),
and its figures as JSON beside it (``storage.json``); ``--tables-only --page PATH`` rewrites the page from that JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import _results_page as results_page
import torch
from bench_quality import _text_stream, _windows

from grpo_prune.fileio import write_json_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8-e4m3": torch.float8_e4m3fn}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppl-windows", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200, 1000], help="simulated statistic updates")
    parser.add_argument("--statistic-only", action="store_true", help="only the statistic section (no model run)")
    parser.add_argument(
        "--page", metavar="PATH", help="also write the statistic table as a results page here, its JSON beside it"
    )
    parser.add_argument("--tables-only", action="store_true", help="with --page: rewrite it from its JSON, no run")
    args = parser.parse_args(argv)
    if args.tables_only:
        if not args.page or not Path(args.page).with_suffix(".json").is_file():
            parser.error("--tables-only needs --page PATH with PATH's .json beside it")
        data = json.loads(Path(args.page).with_suffix(".json").read_text())
        print(write_statistic_page(args.page, data))
        return 0
    run = results_page.run_record("cpu", argv, __file__)
    if args.statistic_only:
        from grpo_prune.models import load_model

        weights = [
            m.weight.detach() for n, m in load_model("smollm2-135m-instruct").named_modules() if n.endswith("_proj")
        ]
        statistic_result(weights, args.steps, args.page, run)
        return 0

    from grpo_prune.evaluate import load_lambada_passages, perplexity
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.pruning import masks as M
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

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

    statistic_result(list(dense.values()), args.steps, args.page, run)
    return 0


def statistic_result(weights: list[torch.Tensor], steps_list: list[int], page: str | None, run: dict) -> None:
    """Measure the statistic-storage table, print it, and with ``page`` write it as a page with its JSON."""
    start = time.process_time()
    chosen = weights[:: max(1, len(weights) // 21)][:21]
    rows = statistic_rows(chosen, steps_list)
    data = {"matrices": len(chosen), "steps": steps_list, "rows": rows, "cpu_seconds": time.process_time() - start}
    data["run"] = run
    if page:
        write_json_atomic(Path(page).with_suffix(".json"), data)
        write_statistic_page(page, data)
    print("\n" + statistic_markdown(data))


def statistic_markdown(data: dict) -> str:
    """The statistic-storage table of :func:`statistic_rows`' figures."""
    lines = [
        "Reward statistic (abs form): a 2-byte accumulator against the fp32 sum of the same noisy saliencies,",
        f"median over {data['matrices']} of SmolLM2's matrices",
        "",
        "| steps | accumulator | Spearman with fp32 | 50% decisions differing |",
        "|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(f"| {r['steps']} | {r['accumulator']} | {r['spearman']:.4f} | {100 * r['differing']:.3f}% |")
    return "\n".join(lines) + "\n"


def write_statistic_page(page: str, data: dict) -> str:
    """The results page of the statistic table: title, generated header from ``data["run"]``, table."""
    run = data.get("run") or {}
    header = results_page.page_header(
        generated_by=f"python scripts/measure_indicator_precision.py --tables-only --page {page}",
        command=run.get("command"),
        device=run.get("device"),
        date=results_page.date_span([run.get("date")]),
        budget=f"{' and '.join(map(str, data['steps']))} simulated steps on {data['matrices']} matrices, "
        f"{data['cpu_seconds']:.0f} CPU-seconds in all",
    )
    text = "# Reward statistic storage\n\n" + header + "\n" + statistic_markdown(data)
    results_page.write_page(page, text)
    return text


def statistic_rows(chosen: list[torch.Tensor], steps_list: list[int]) -> list[dict]:
    """Per number of simulated steps and accumulator: median Spearman with the fp32 sum over the ``chosen``
    matrices, and the median fraction of 50% keep/prune decisions that differ from it (see the module docstring)."""
    from grpo_prune.pruning import masks as M
    from grpo_prune.pruning.compact import RowScaledHalf
    from grpo_prune.pruning.scores import rank_correlation

    rows = []
    for steps in steps_list:
        corr: dict[str, list[float]] = {"bf16 sum": [], "fp16 sum": [], "row-scaled fp16 (used)": []}
        differ: dict[str, list[float]] = {k: [] for k in corr}
        g = torch.Generator().manual_seed(0)
        for w in chosen:
            w = w.float()
            acc32 = torch.zeros_like(w)
            low = {
                "bf16 sum": torch.zeros_like(w, dtype=torch.bfloat16),
                "fp16 sum": torch.zeros_like(w, dtype=torch.float16),
            }
            scaled = RowScaledHalf(w.shape)
            signal = torch.randn(w.shape, generator=g) * w.abs()
            for _ in range(steps):
                step = (signal + 3 * torch.randn(w.shape, generator=g) * w.abs()).abs() * 1e-6
                acc32 += step
                for k in low:
                    low[k] += step.to(low[k].dtype)
                scaled.add_(step)
            ref_mask = M.unstructured_mask(acc32, 0.5)
            for k, value in (*((k, v.float()) for k, v in low.items()), ("row-scaled fp16 (used)", scaled.value())):
                corr[k].append(rank_correlation(value, acc32))
                differ[k].append(float((M.unstructured_mask(value, 0.5) != ref_mask).float().mean()))
        for k in corr:
            rows.append(
                {
                    "steps": steps,
                    "accumulator": k,
                    "spearman": statistics.median(corr[k]),
                    "differing": statistics.median(differ[k]),
                }
            )
    return rows


if __name__ == "__main__":
    sys.exit(main())

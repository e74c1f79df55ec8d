"""One-shot ``wanda`` against ``sparsegpt`` (OBS reconstruction) on the embedded SmolLM2-135M-Instruct.

For 50% unstructured and 2:4, each scorer prunes a freshly loaded model with ``prune_oneshot`` from the same
calibration batches (``--calib-windows`` x ``--calib-length`` tokens of the stdlib's Python documentation, the
helper of ``scripts/bench_quality.py``; never evaluation text), then held-out perplexity is measured on LAMBADA
(``--eval-windows`` non-overlapping windows of ``--eval-length`` tokens, ``grpo_prune.evaluate.perplexity``).
Prints a markdown table: perplexity, ratio to dense, sparsity reached and the pruning time.

    OMP_NUM_THREADS=1 python scripts/bench_sparsegpt.py [--calib-windows 8] [--calib-length 256]
        [--eval-windows 8] [--eval-length 512] [--settings "50% unstructured" 2:4] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch
from bench_quality import Calibration, calibration_batches

from grpo_prune.fileio import write_json_atomic

MODEL = "smollm2-135m-instruct"
SETTINGS = (("50% unstructured", "unstructured", 0.5), ("2:4", "n:m", 0.5))
SCORERS = ("wanda", "sparsegpt")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows (default 8)")
    parser.add_argument("--calib-length", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--eval-windows", type=int, default=8, help="LAMBADA windows scored (default 8)")
    parser.add_argument("--eval-length", type=int, default=512, help="tokens per LAMBADA window (default 512)")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=[label for label, _, _ in SETTINGS],
        default=[label for label, _, _ in SETTINGS],
        help="which settings to run (default: all)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grpo_prune import prune_oneshot
    from grpo_prune.evaluate import load_lambada_passages, perplexity
    from grpo_prune.models import load_model, load_tokenizer

    t_start = time.perf_counter()
    tokenizer = load_tokenizer(MODEL)
    passages = load_lambada_passages(seed=0)
    calib = calibration_batches(tokenizer, Calibration("text", args.calib_windows, args.calib_length))

    def held_out(model: Any) -> float:
        result = perplexity(
            model, tokenizer, passages, max_length=args.eval_length, num_windows=args.eval_windows, progress=False
        )
        return result["perplexity"]

    torch.manual_seed(0)
    model = load_model(MODEL)
    rows: list[dict[str, Any]] = [{"setting": "dense", "scorer": "-", "sparsity": 0.0, "seconds": 0.0}]
    t0 = time.perf_counter()
    rows[0]["ppl"] = held_out(model)
    rows[0]["eval_seconds"] = time.perf_counter() - t0
    print(f"dense: ppl {rows[0]['ppl']:.2f}, eval {rows[0]['eval_seconds']:.1f} s", flush=True)
    del model
    for label, granularity, sparsity in SETTINGS:
        if label not in args.settings:
            continue
        for scorer in SCORERS:
            model = load_model(MODEL)
            t0 = time.perf_counter()
            report = prune_oneshot(
                model, sparsity, granularity=granularity, n_m="2:4", scorer=scorer, calibration=calib
            )
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            ppl = held_out(model)
            rows.append(
                {
                    "setting": label,
                    "scorer": scorer,
                    "sparsity": report.global_sparsity,
                    "seconds": seconds,
                    "ppl": ppl,
                    "eval_seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"{label} {scorer}: ppl {ppl:.2f}, prune {seconds:.1f} s, eval {rows[-1]['eval_seconds']:.1f} s",
                flush=True,
            )
            del model
            gc.collect()

    dense = rows[0]["ppl"]
    lines = [
        f"Calibration: {args.calib_windows} x {args.calib_length} tokens of pydoc_data.topics; held-out: LAMBADA, "
        f"{args.eval_windows} x {args.eval_length}-token windows; torch threads {torch.get_num_threads()}.",
        "",
        "| setting | scorer | sparsity | LAMBADA ppl | ppl / dense | prune time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        row["ratio"] = row["ppl"] / dense
        lines.append(
            f"| {row['setting']} | {row['scorer']} | {row['sparsity']:.3f} | {row['ppl']:.2f} | "
            f"{row['ratio']:.2f}x | {row['seconds']:.1f} |"
        )
    total = time.perf_counter() - t_start
    lines += ["", f"Total wall time: {total:.0f} s."]
    print("\n".join(lines))
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "rows": rows, "total_seconds": total})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

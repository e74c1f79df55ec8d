"""Speed of the model's own samples (``prune_calibration: self``, ``distill_dataset: self``) on the embedded model.

The quickstart's cold start samples 32k tokens from the dense SmolLM2-135M-Instruct, half answers to the arithmetic
train prompts (``task``) and half continuations of neutral openings (``open``). This script times both kinds in two
ways, side by side in one process:

* ``transformers top_p, 16 rows``: the recipe before version 2 of the sample cache: transformers' ``TopPLogitsWarper``
  (a sort of the whole vocabulary at every step), 16 samples a ``generate`` call for both kinds;
* ``NucleusWarper, by kind``: what ``grpo_prune.data`` samples with now: the same top-p rule on the top
  candidates only, and ``SELF_BATCH_SIZE`` rows a call (wider for ``open``).

Each variant generates the same number of samples per kind (the larger of the two batch sizes, in batches of its
own size), ``--repeats`` times; the table gives the median tokens (prompt + sample, as the cache counts them) per
CPU-second of this process and the ratio of the two. Run one thread and quote the ratio: this machine is shared.

    OMP_NUM_THREADS=1 python scripts/bench_sampling.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def time_kind(model, tokenizer, kind: str, rows: int, batch: int, nucleus) -> tuple[int, float]:
    """Tokens made and CPU-seconds spent sampling ``rows`` samples of ``kind``, ``batch`` rows a call."""
    from grpo_prune import data
    from grpo_prune.evaluation.batching import pad_id

    prompts = data._self_prompts(tokenizer, kind, "arithmetic", 0)
    pad = pad_id(tokenizer, tokenizer.eos_token_id)
    tokens, start = 0, time.process_time()
    for b in range(rows // batch):
        picked = [prompts[(b * batch + i) % len(prompts)] for i in range(batch)]
        out = data._generate_batch(model, picked, data.SELF_MAX_NEW_TOKENS[kind], pad, seed=b, nucleus=nucleus)
        tokens += sum(map(len, out))
    return tokens, time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args()

    import torch
    from transformers import TopPLogitsWarper

    from grpo_prune import data
    from grpo_prune.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct").eval()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    top_p = data.SELF_SAMPLING["top_p"]
    variants = {
        "transformers top_p, 16 rows": (lambda kind: 16, lambda: TopPLogitsWarper(top_p)),
        "NucleusWarper, by kind": (lambda kind: data.SELF_BATCH_SIZE[kind], lambda: data.NucleusWarper(top_p)),
    }
    results: dict[str, dict[str, list[float]]] = {}
    for kind in ("task", "open"):
        rows = max(16, data.SELF_BATCH_SIZE[kind])
        for _ in range(args.repeats):
            for name, (batch, nucleus) in variants.items():
                tokens, seconds = time_kind(model, tokenizer, kind, rows, batch(kind), nucleus())
                results.setdefault(kind, {}).setdefault(name, []).append(tokens / seconds)
    names = list(variants)
    print(f"| kind | {' | '.join(f'{n}: tokens / CPU-s' for n in names)} | ratio |")
    print("| --- | " + " | ".join("---:" for _ in names) + " | ---: |")
    for kind, by_name in results.items():
        medians = [statistics.median(by_name[n]) for n in names]
        print(f"| {kind} | " + " | ".join(f"{m:.0f}" for m in medians) + f" | {medians[1] / medians[0]:.2f}x |")
    print(f"median of {args.repeats} repeats; threads: {torch.get_num_threads()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

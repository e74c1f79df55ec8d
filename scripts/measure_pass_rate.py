"""How often does the dense model solve the arithmetic task at the training temperature? (GRPO signal per group.)

GRPO learns only from groups whose rewards differ: with pass rate ``p`` and ``G`` completions per prompt, a group
has reward variance with probability ``1 - p^G - (1-p)^G``. This script samples completions of the embedded
SmolLM2-135M-Instruct exactly as TRL's GRPO rollouts do (``do_sample``, temperature, ``top_k=0``, ``top_p=1``, the
chat template with the generation prompt), scores them with ``math_answer`` (and ``math_answer_partial``), and
prints a markdown table per difficulty setting: pass rate ``p``, the predicted chance that a group has variance for
G = 4 and 8, the fraction of sampled groups of ``--generations`` that actually had variance (exact reward), the
mean partial-credit reward, and the clipped fraction (completions that hit ``--tokens`` without an end token, TRL's
``completions/clipped_ratio``).

    OMP_NUM_THREADS=1 python scripts/measure_pass_rate.py [--prompts 32] [--generations 8] [--tokens 32]
        [--settings arithmetic-easy,arithmetic,...] [--json out.json]

A setting is a built-in dataset name (``arithmetic``, ``arithmetic-easy``, ``arithmetic-hard``) or ``name:k=v;k=v``
with builder options (``arithmetic:operations=+;max_operand=20``; ``operations`` is a string of the operators).
Prompts are the first ``--prompts`` rows of the train split (operation-balanced); sampling is seeded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from grpo_prune.fileio import write_json_atomic

DEFAULT_SETTINGS = (
    "arithmetic:operations=+;max_operand=10",
    "arithmetic:operations=+;max_operand=20",
    "arithmetic:operations=+;max_operand=50",
    "arithmetic:operations=+-;max_operand=20",
    "arithmetic:operations=*;max_operand=10;max_factor=10",
    "arithmetic:operations=+-*;max_operand=30;max_factor=12",
)


def parse_setting(text: str) -> tuple[str, dict]:
    """``"arithmetic:operations=+-;max_operand=20"`` -> ``("arithmetic", {"operations": "+-", "max_operand": 20})``."""
    name, _, rest = text.partition(":")
    options: dict = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        options[key] = tuple(value) if key == "operations" else int(value)
    return name, options


def p_variance(p: float, group: int) -> float:
    """Chance that a group of ``group`` independent pass/fail rewards with pass rate ``p`` is not all equal."""
    return 1.0 - p**group - (1.0 - p) ** group


@torch.no_grad()
def sample(model, tokenizer, prompts: list, generations: int, tokens: int, temperature: float, batch: int):
    """Completions (text) and whether each was clipped, ``generations`` per prompt, prompt-major order.

    The prompts of a call are prefilled once and their KV cache is repeated ``generations`` times, so the sampling
    cost is the decode alone (``generate`` with ``num_return_sequences`` would prefill every copy: on a CPU that
    is most of the time). Sampling matches TRL's rollouts: temperature, ``top_k=0``, ``top_p=1``.
    """
    from transformers import DynamicCache

    texts, clipped = [], []
    tokenizer.padding_side = "left"
    per_call = max(1, batch // generations)
    for start in range(0, len(prompts), per_call):
        chunk = [
            tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + per_call]
        ]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        # Cache every prompt token but the last; generate then feeds only that one (per copy) before sampling.
        cache = DynamicCache(config=model.config)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        model(
            input_ids=ids[:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=position_ids[:, :-1],
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_repeat_interleave(generations)
        out = model.generate(
            input_ids=ids.repeat_interleave(generations, 0),
            attention_mask=mask.repeat_interleave(generations, 0),
            past_key_values=cache,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion_ids = out[:, ids.shape[1] :]
        for row in completion_ids:
            clipped.append(not bool((row == tokenizer.eos_token_id).any()))
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, clipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help="comma-separated settings")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per setting (first rows of the train split)")
    parser.add_argument("--generations", type=int, default=8, help="samples per prompt (GRPO's num_generations)")
    parser.add_argument("--tokens", type=int, default=32, help="max completion length")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64, help="sequences per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model",
        default=None,
        help="model to sample (default: the embedded dense model); e.g. a "
        "pruned `output_dir` of `grpo-prune train`, to see how much signal survives pruning",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import reward_fns
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.models import load_model, load_tokenizer

    model = load_model(args.model).eval() if args.model else load_model().eval()
    tokenizer = load_tokenizer(args.model) if args.model else load_tokenizer()
    rows, started = [], time.time()
    for setting in args.settings.split(","):
        name, options = parse_setting(setting)
        ds = load_prompt_dataset(name, "train", args.prompts, seed=0, **options)
        torch.manual_seed(args.seed)
        t0 = time.time()
        texts, clipped = sample(
            model, tokenizer, ds["prompt"], args.generations, args.tokens, args.temperature, args.batch
        )
        answers = [a for a in ds["answer"] for _ in range(args.generations)]
        exact = reward_fns.math_answer(None, texts, answer=answers)
        partial = reward_fns.math_answer_partial(None, texts, answer=answers)
        groups = [exact[i : i + args.generations] for i in range(0, len(exact), args.generations)]
        p = statistics.fmean(exact)
        rows.append(
            {
                "setting": setting,
                "pass_rate": p,
                "p_variance_g4": p_variance(p, 4),
                "p_variance_g8": p_variance(p, 8),
                "groups_with_variance": statistics.fmean(len(set(g)) > 1 for g in groups),
                "partial_mean": statistics.fmean(partial),
                "partial_groups_with_variance": statistics.fmean(
                    len(set(partial[i : i + args.generations])) > 1 for i in range(0, len(partial), args.generations)
                ),
                "clipped": statistics.fmean(clipped),
                "seconds": round(time.time() - t0, 1),
                "example": texts[0],
            }
        )
        print(f"{setting}: p={p:.3f} clipped={rows[-1]['clipped']:.3f} ({rows[-1]['seconds']} s)", file=sys.stderr)

    g = args.generations
    print(
        f"\n{args.model or 'dense embedded model'}: {args.prompts} prompts x {g} samples, temperature "
        f"{args.temperature}, max {args.tokens} tokens, seed {args.seed} ({time.time() - started:.0f} s)\n"
    )
    print(
        f"| setting | pass rate p | P(var) G=4 | P(var) G=8 | groups of {g} with variance | partial reward mean "
        f"| partial groups with variance | clipped |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| `{r['setting']}` | {r['pass_rate']:.3f} | {r['p_variance_g4']:.2f} | {r['p_variance_g8']:.2f} "
            f"| {r['groups_with_variance']:.2f} | {r['partial_mean']:.3f} | {r['partial_groups_with_variance']:.2f} "
            f"| {r['clipped']:.3f} |"
        )
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

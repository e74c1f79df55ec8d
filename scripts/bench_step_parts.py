"""Two parts of a GRPO step on a CPU, each timed both ways in one process, on the embedded SmolLM2-135M-Instruct.

The micro-batch is the quickstart's: one arithmetic train prompt in its chat template (87 tokens), repeated for
``--completions`` completions of ``--tokens`` tokens (random ids: the cost does not depend on them).

* ``policy log-probs, forward + backward``: TRL's fused LM head as `GRPOTrainer` calls it, every position projected
  through the vocabulary (TRL off Triton devices) against the completion positions only
  (`grpo_prune.trl_compat.compact_fused_lm_head_on_cpu`, what `MamaGRPOTrainer` turns on). The log-probabilities
  must come out equal.
* ``sampling the completions``: the policy's ``generate`` as TRL calls it (sampling at temperature 1, up to
  ``--tokens`` new tokens), prefilling the prompt once per completion, against
  `grpo_prune.prefix.share_prompt_prefill`, which prefills it once. The sampled tokens must come out equal.
* ``teacher forward for distillation``: `Distiller.teacher_hidden` over the whole micro-batch, against
  `Distiller.teacher_prediction_hidden`, which runs the shared prompt once and its key/value cache for the
  completions. The largest difference of the hidden states is printed.

The table gives the median CPU-seconds of this process over ``--repeats`` interleaved runs and their ratio. Run one
thread and quote the ratios: this machine is shared.

    OMP_NUM_THREADS=1 python scripts/bench_step_parts.py [--repeats 7] [--completions 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def cpu_seconds(fn) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--completions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()

    import torch
    from accelerate import Accelerator
    from transformers import GenerationConfig
    from trl.kernels.chunked_logprob import _use_triton as trl_decision
    from trl.trainer import utils as trl_utils

    from grpo_prune import MamaGRPOConfig
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.distiller import Distiller
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.prefix import share_prompt_prefill
    from grpo_prune.trl_compat import compact_fused_lm_head_on_cpu

    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    prompt = load_prompt_dataset("arithmetic", "train", num_samples=1)["prompt"][0]
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    torch.manual_seed(0)
    rows, prompt_length = args.completions, len(prompt_ids)
    ids = torch.cat(
        [torch.tensor(prompt_ids).expand(rows, -1), torch.randint(0, len(tokenizer), (rows, args.tokens))], dim=1
    )
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.arange(ids.size(1)) < prompt_length, -100)

    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    compact_fused_lm_head_on_cpu()
    compacted = trl_utils._use_triton

    def policy(decision):
        def run():
            trl_utils._use_triton = decision
            model.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
            (out.log_probs.sum() + out.entropy.sum()).backward()
            return out.log_probs.detach()

        return run

    config = MamaGRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-step-parts-"),
        distill_coef=1.0,
        prune_target_sparsity=0.0,
        report_to="none",
    )
    distiller = Distiller(config, Accelerator(cpu=True), model)
    share_prompt_prefill(model)
    sampling = GenerationConfig(
        max_new_tokens=args.tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        disable_compile=True,
    )
    prompts, prompt_mask = ids[:, :prompt_length], mask[:, :prompt_length]

    def sample(generate):
        def run():
            torch.manual_seed(0)
            with torch.no_grad():
                return generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=sampling).float()

        return run

    n_predicted = ids.size(1) - prompt_length
    parts = {
        "policy log-probs, forward + backward": (
            ("every position (TRL off Triton)", policy(trl_decision)),
            ("completion positions only", policy(compacted)),
        ),
        "sampling the completions": (
            ("prompt prefilled per completion", sample(model.generate.__wrapped__)),
            ("prompt prefilled once", sample(model.generate)),
        ),
        "teacher forward for distillation": (
            (
                "whole sequence per row",
                lambda: distiller.teacher_hidden(ids, mask, layers=False)[0][:, -n_predicted - 1 : -1],
            ),
            ("prompt once, then its cache", lambda: distiller.teacher_prediction_hidden(ids, mask, prompt_length)),
        ),
    }
    print(f"{rows} completions of {args.tokens} tokens after a {prompt_length}-token prompt; {args.repeats} repeats")
    print()
    print("| part | before (CPU-s) | after (CPU-s) | after / before | largest difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for part, ((_, before), (_, after)) in parts.items():
        times: dict[str, list[float]] = {"before": [], "after": []}
        outputs = {}
        for _ in range(args.repeats):
            for key, fn in (("before", before), ("after", after)):
                seconds, outputs[key] = cpu_seconds(fn)
                times[key].append(seconds)
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        difference = (outputs["before"] - outputs["after"]).abs().max().item()
        print(f"| {part} | {b:.3f} | {a:.3f} | {a / b:.2f} | {difference:.1e} |")
    trl_utils._use_triton = compacted
    print()
    for part, ((before_name, _), (after_name, _)) in parts.items():
        print(f"- {part}: before = {before_name}; after = {after_name}")


if __name__ == "__main__":
    main()

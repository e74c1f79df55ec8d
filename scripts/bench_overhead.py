"""Overhead of MAMA pruning and distillation on a GRPO step, on the embedded SmolLM2-135M-Instruct.

Runs three variants on the same settings, each in its own process so that peak memory is its own:

* ``plain``: TRL's `GRPOTrainer` (with the same fused-LM-head switch on CPU as ours,
  `grpo_prune.trl_compat.compact_fused_lm_head_on_cpu`);
* ``prune``: `MamaGRPOTrainer` with pruning (unstructured MAMA, cubic schedule), no distillation;
* ``prune+distill``: the same plus distillation from the frozen dense teacher.

For each it reports the median wall time of an optimizer step (from `on_step_begin` to `on_step_end`, so
generation, loss, optimizer and the prune events are all inside), over all steps and over the steps without a prune
event; the time inside the pruner's seams on a step without an event (movement accumulation, gradient and weight
masking, the schedule clock) and the time of one prune event, with the two amortised over the steps between events;
and the peak resident memory of the process. Ratios are to ``plain``'s median step. Quote medians and ratios: this
machine is shared and noisy.

    OMP_NUM_THREADS=2 python scripts/bench_overhead.py [--steps 9] [--alpha 0.1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _short_run import short_run_fields

from grpo_prune.fileio import write_json_atomic

VARIANTS = ("plain", "prune", "prune+distill")
EVERY = 2  # optimizer steps between prune events: half the timed steps have one


def run_variant(
    variant: str, steps: int, completions: int, tokens: int, alpha: float, statistic: str, out_json: str
) -> None:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.pruning.indicators import Indicators
    from grpo_prune.trl_compat import compact_fused_lm_head_on_cpu

    torch.manual_seed(0)
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    dataset = load_prompt_dataset("arithmetic", "train", num_samples=64)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    output_dir = tempfile.mkdtemp(prefix=f"bench-{variant.replace('+', '-')}-")
    common = short_run_fields(output_dir, steps, completions, tokens)
    if variant == "plain":
        # MamaGRPOTrainer makes TRL's fused LM head skip the prompt positions on CPU; the baseline gets the same
        # switch, so that the ratios measure pruning and distillation, not that speed-up.
        compact_fused_lm_head_on_cpu()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[reward_fns.get("math_answer")],
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    else:
        args = MamaGRPOConfig(
            **common,
            prune_target_sparsity=0.5,
            prune_scorer="mama",
            mama_alpha=alpha,  # > 0 turns the reward statistic on: the worst case for the pruner's per-step cost
            mama_statistic=statistic,
            mama_min_updates=1,
            prune_start_step=0,
            prune_end_step=steps - 2,
            prune_every=EVERY,
            distill_coef=1.0 if variant == "prune+distill" else 0.0,
        )
        trainer = MamaGRPOTrainer(
            model=model,
            reward_funcs=[reward_fns.get("math_answer")],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    # Time inside the pruner's seams, per step: gradient processing (movement, gradient masks), weight enforcement,
    # the activation-statistics hooks in the training forward, and the step-end hook (schedule clock, reward guard,
    # prune events).
    seam_time = {"step": 0.0, "event": 0.0}
    if variant != "plain":
        make_hook = Indicators._make_hook

        def timed_make_hook(self, stats):
            hook = make_hook(self, stats)

            def timed_hook(*a):
                t0 = time.perf_counter()
                hook(*a)
                seam_time["step"] += time.perf_counter() - t0

            return timed_hook

        Indicators._make_hook = timed_make_hook
        seams = [
            (trainer, n, "step")
            for n in ("process_pruning_gradients", "enforce_pruning_masks", "_reward_statistic_seam")
        ]
        seams.append((trainer.pruning_callback, "on_step_end", "event"))
        for owner, name, key in seams:
            original = getattr(owner, name)

            def timed(*a, _original=original, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    seam_time[_key] += time.perf_counter() - t0

            setattr(owner, name, timed)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self._t0 = 0.0
            self._events = 0

        def on_step_begin(self, args, state, control, **kwargs):
            seam_time.update(step=0.0, event=0.0)
            self._events = len(getattr(trainer, "prune_events", []))
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(
                {
                    "seconds": time.perf_counter() - self._t0,
                    "event": len(getattr(trainer, "prune_events", [])) > self._events,
                    "seam_s": seam_time["step"],
                    "step_end_s": seam_time["event"],
                }
            )

    timer = StepTimer()
    trainer.add_callback(timer)  # after the pruning callback: its on_step_end (prune events) is inside the step
    trainer.train()
    # The first step pays one-off costs (allocations, lazy init); it is left out of every statistic.
    steps = timer.steps[1:] or timer.steps
    quiet = [s for s in steps if not s["event"]] or steps
    events = [s for s in steps if s["event"]]
    result = {
        "variant": variant,
        "steps": len(timer.steps),
        "first_step_s": timer.steps[0]["seconds"],
        "median_step_s": statistics.median(s["seconds"] for s in steps),
        "mean_step_s": statistics.fmean(s["seconds"] for s in steps),
        "median_quiet_step_s": statistics.median(s["seconds"] for s in quiet),
        "median_seam_s": statistics.median(s["seam_s"] + s["step_end_s"] for s in quiet),
        "events_timed": len(events),
        "median_event_s": statistics.median(s["step_end_s"] for s in events) if events else 0.0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": rss_loaded,
        "sparsity": trainer.pruner.sparsity() if getattr(trainer, "pruner", None) else 0.0,
        "indicator_bytes": trainer.pruner.memory_bytes() if getattr(trainer, "pruner", None) else {},
    }
    with open(out_json, "w") as f:
        json.dump(result, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--completions", type=int, default=4, help="completions per step (one prompt group)")
    parser.add_argument("--tokens", type=int, default=32, help="max completion length")
    parser.add_argument("--alpha", type=float, default=0.0, help="mama_alpha (0: the default; 0.1: movement on)")
    parser.add_argument("--statistic", default="signed", choices=("signed", "abs", "squared"))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        run_variant(args.variant, args.steps, args.completions, args.tokens, args.alpha, args.statistic, args.out)
        return 0

    results = {}
    for variant in VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--out",
            out,
            "--steps",
            str(args.steps),
            "--completions",
            str(args.completions),
            "--tokens",
            str(args.tokens),
            "--alpha",
            str(args.alpha),
            "--statistic",
            args.statistic,
        ]
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            results[variant] = json.load(f)
        os.unlink(out)

    base = results["plain"]
    plain = base["median_step_s"]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"\nSmolLM2-135M-Instruct, {args.completions} completions x {args.tokens} tokens per step, {args.steps} steps "
        f"(the first left out), a prune event every {EVERY} steps, mama_alpha={args.alpha}, "
        f"OMP_NUM_THREADS={threads}\n"
    )
    print(
        "| variant | median step (s) | x plain | median step without event (s) | x plain | pruner per step (s) "
        f"| per step, % of plain | prune event (s) | amortised, event every {EVERY} | event every 50 "
        "| peak RSS (MiB) | RSS over plain (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, r in results.items():
        cells = [
            variant,
            f"{r['median_step_s']:.2f}",
            f"{r['median_step_s'] / plain:.3f}",
            f"{r['median_quiet_step_s']:.2f}",
            f"{r['median_quiet_step_s'] / plain:.3f}",
        ]
        if variant == "plain":
            cells += ["", "", "", "", ""]
        else:
            seam, event = r["median_seam_s"], r["median_event_s"]
            cells += [
                f"{seam:.3f}",
                f"{100 * seam / plain:.1f}%",
                f"{event:.2f}",
                f"{100 * (seam + event / EVERY) / plain:.1f}%",
                f"{100 * (seam + event / 50) / plain:.1f}%",
            ]
        cells += [
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{(r['peak_rss_bytes'] - base['peak_rss_bytes']) / 2**20:+.0f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print(
        "\n'pruner per step': median, over steps without a prune event, of the time inside the pruner's seams "
        "(movement, gradient masks, weight enforcement, activation-statistics hooks, schedule). 'amortised': that "
        "plus one event's time spread over the steps between events, as a share of the plain step."
    )
    indicators = results["prune"]["indicator_bytes"]
    if indicators:
        print(
            "\nPruner state (bytes, from Pruner.memory_bytes()): "
            + ", ".join(f"{k}: {v / 2**20:.0f} MiB" for k, v in indicators.items())
        )
    if args.json:
        write_json_atomic(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

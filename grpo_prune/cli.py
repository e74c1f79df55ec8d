"""Command line: ``grpo-prune train | eval | export``.

``train`` follows TRL's script conventions: one ``--config file.yaml`` merged with ``--field value`` flags by
`trl.TrlParser`, over three dataclasses (`TrainScriptArguments`, `MamaGRPOConfig`, `trl.ModelConfig`). Everything
a run needs (fields, reward names, dataset, model availability) is validated before any model is loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from grpo_prune.fileio import write_json_atomic

logger = logging.getLogger("grpo_prune")

COMMANDS = {
    "train": "GRPO training with MAMA pruning and distillation, from a YAML config (TRL's TrlParser conventions).",
    "eval": "Evaluate a model (task accuracy, perplexity, multiple choice, throughput), optionally against another.",
    "export": "Export a pruned checkpoint: zeros + masks, or a physically smaller model for structured pruning.",
}


@dataclass
class TrainScriptArguments:
    """What to train on: the data and the reward functions (the model is `ModelConfig.model_name_or_path`)."""

    dataset_name: str = field(
        default="arithmetic",
        metadata={"help": "Built-in prompt dataset (arithmetic, gsm8k) or a local JSONL / `datasets` folder."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    num_train_samples: int | None = field(
        default=None, metadata={"help": "Seeded subset of the training split (all rows when unset)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: built-in names (see reward_fns.available()) or 'package.module:function'. "
            "Default: the built-in dataset's own reward."
        },
    )


@dataclass
class TrainRun:
    """Everything `train` resolved from the command line before loading anything heavy."""

    script: TrainScriptArguments
    training: Any  # MamaGRPOConfig
    model: Any  # trl.ModelConfig
    model_name_or_path: str
    reward_specs: list[str]
    reward_funcs: list[Any]
    peft_config: Any


def parse_train_args(argv: list[str]) -> TrainRun:
    """Parse and validate a `train` command line (config file + overrides). Raises ValueError on any problem."""
    from trl import ModelConfig, TrlParser, get_peft_config

    import reward_fns
    from grpo_prune.config import MamaGRPOConfig
    from grpo_prune.data import dataset_reward, validate_dataset_name
    from grpo_prune.models import DEFAULT_MODEL, validate_model_name_or_path

    parser = TrlParser((TrainScriptArguments, MamaGRPOConfig, ModelConfig), prog="grpo-prune train")
    script_args, training_args, model_args = parser.parse_args_and_config(args=argv)
    model_name = model_args.model_name_or_path or DEFAULT_MODEL
    validate_model_name_or_path(model_name)
    validate_dataset_name(script_args.dataset_name, script_args.dataset_train_split)
    specs = list(script_args.reward_funcs or [])
    if not specs:
        default = dataset_reward(script_args.dataset_name)
        if default is None:
            raise ValueError(
                f"`reward_funcs` is required for the local dataset {script_args.dataset_name!r}: name built-in "
                f"rewards ({', '.join(reward_fns.available())}) or 'package.module:function'."
            )
        specs = [default]
    funcs = [reward_fns.resolve(spec) for spec in specs]
    peft_config = get_peft_config(model_args)
    if peft_config is not None and training_args.pruning_enabled:
        raise ValueError(
            "`use_peft: true` (LoRA) cannot be combined with pruning: set `prune_target_sparsity: 0` to train LoRA "
            "with distillation only (see the README)."
        )
    return TrainRun(script_args, training_args, model_args, model_name, specs, funcs, peft_config)


def _count_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return total, nonzero


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else None


def run_train(run: TrainRun) -> dict[str, Any]:
    """Load, train, save; returns the run summary (also written to ``output_dir/run_summary.json``)."""
    from grpo_prune.data import load_prompt_dataset, prompt_format_for, stop_at_line_end_
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.trainer import MamaGRPOTrainer

    args = run.training
    start = time.time()
    load_kwargs = {}
    if run.model.attn_implementation:
        load_kwargs["attn_implementation"] = run.model.attn_implementation
    model = load_model(run.model_name_or_path, dtype=run.model.dtype or "float32", **load_kwargs)
    tokenizer = load_tokenizer(run.model_name_or_path)
    # A base model (no chat template) gets plain-text prompts and stops at the end of its one-line answer.
    prompt_format = prompt_format_for(tokenizer)
    if prompt_format == "text":
        stop_at_line_end_(model, tokenizer)
    train_dataset = load_prompt_dataset(
        run.script.dataset_name,
        run.script.dataset_train_split,
        run.script.num_train_samples,
        seed=args.seed,
        prompt_format=prompt_format,
    )
    total_before, nonzero_before = _count_params(model)
    trainer = MamaGRPOTrainer(
        model=model,
        reward_funcs=run.reward_funcs,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=run.peft_config,
    )
    resume = args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "latest"):
        resume = True
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)

    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    window = max(1, min(args.reward_window, len(rewards) // 2 or 1))
    total_after, nonzero_after = _count_params(trainer.accelerator.unwrap_model(trainer.model))
    summary = {
        "output_dir": os.path.abspath(args.output_dir),
        "model": run.model_name_or_path,
        "dataset": run.script.dataset_name,
        "reward_funcs": run.reward_specs,
        "steps": trainer.state.global_step,
        "target_sparsity": args.prune_target_sparsity if trainer.pruner else 0.0,
        "sparsity_reached": trainer.pruner.sparsity() if trainer.pruner else 0.0,
        "params_total": total_after,
        "params_nonzero_before": nonzero_before,
        "params_nonzero_after": nonzero_after,
        "reward_first": _mean(rewards[:window]),
        "reward_last": _mean(rewards[-window:]),
        "wall_time_s": round(time.time() - start, 1),
    }
    if trainer.accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, "run_summary.json"), summary)
        print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    removed = s["params_nonzero_before"] - s["params_nonzero_after"]
    return "\n".join(
        [
            "",
            "grpo-prune: run finished",
            f"  steps            {s['steps']}  ({s['wall_time_s']} s)",
            f"  sparsity         {s['sparsity_reached']:.4f} of the pruned layers (target {s['target_sparsity']})",
            f"  parameters       {s['params_nonzero_after']:,} non-zero of {s['params_total']:,} "
            f"(before: {s['params_nonzero_before']:,}; {removed:,} zeroed)",
            f"  reward           first {fmt(s['reward_first'])} -> last {fmt(s['reward_last'])} (rolling means)",
            f"  outputs          {s['output_dir']}  (model, pruner_state.*, pruning_report.json, run_summary.json)",
            "",
        ]
    )


def train_main(argv: list[str]) -> int:
    run = parse_train_args(argv)
    run_train(run)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-prune",
        description="Prune and distil a language model while it is post-trained with GRPO (MAMA pruning).",
        epilog="Run `grpo-prune COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r} (choose from {', '.join(COMMANDS)})")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if command == "train":
        return train_main(rest)
    if command == "eval":
        from grpo_prune.evaluate import main as eval_main

        return eval_main(rest)
    from grpo_prune.export import main as export_main

    return export_main(rest)


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``grpo-prune train | eval | export``.

``train`` follows TRL's script conventions: one ``--config file.yaml`` merged with ``--field value`` flags by
`trl.TrlParser`, over three dataclasses (`TrainScriptArguments`, `MamaGRPOConfig`, `TrainModelConfig`). Everything
a run needs (fields, reward names, dataset, model availability) is validated before any model is loaded.

Every usage or configuration error of every subcommand is one line on stderr, ``grpo-prune <command>: error:
<message>``, with exit status 2 and no traceback (``--debug`` shows it); see `grpo_prune.usage`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from grpo_prune.fileio import write_json_atomic
from grpo_prune.usage import EXIT_USAGE, UsageError, did_you_mean, one_line, unknown_arguments_message

logger = logging.getLogger("grpo_prune")

COMMANDS = {
    "train": "GRPO training with MAMA pruning and distillation, from a YAML config (TRL's TrlParser conventions).",
    "eval": "Evaluate a model (task accuracy, perplexity, multiple choice, throughput), optionally against another.",
    "export": "Export a pruned checkpoint: zeros + masks, or a physically smaller model for structured pruning.",
    "oneshot": "Prune a model in one step on calibration text (sparsegpt, wanda, ...) and export it.",
    "soup": "Average models recovered from one pruned start (runs differing in their seed); the mask is kept.",
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


def _model_config_class():
    """`trl.ModelConfig` with ``dtype: auto`` by default (TRL defaults to float32 even where bf16 is available)."""
    from trl import ModelConfig

    @dataclass
    class TrainModelConfig(ModelConfig):
        dtype: str | None = field(
            default="auto",
            metadata={
                "help": "Weights dtype. 'auto': bfloat16 on an accelerator that supports it, float32 on a CPU.",
                "choices": ["auto", "bfloat16", "float16", "float32"],
            },
        )

    return TrainModelConfig


#: Flags of `grpo-prune train` itself (not fields of a config dataclass).
TRAIN_FLAGS = {
    "--config": "YAML file with any of the fields below (flags override it)",
    "--help-all": "list every option, TRL's GRPOConfig and transformers' TrainingArguments included",
    "--debug": "show the full traceback of an error instead of one line",
}


def _train_parser():
    """`trl.TrlParser` over the train dataclasses, whose argparse errors raise `UsageError`."""
    from trl import TrlParser

    from grpo_prune.config import MamaGRPOConfig

    class Parser(TrlParser):
        def error(self, message):  # argparse would print the whole usage (hundreds of lines) and exit
            raise UsageError(message)

    return Parser((TrainScriptArguments, MamaGRPOConfig, _model_config_class()), prog="grpo-prune train")


def _check_unknown_fields(parser, argv: list[str]) -> None:
    """Reject unknown YAML fields and flags, with a close-match suggestion, before any dataclass is built."""
    import yaml

    fields = sorted({a.dest for a in parser._actions if a.option_strings} - {"help"})
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise UsageError("`--config` needs the path of a YAML file")
        path = argv[index + 1]
        if not os.path.isfile(path):
            raise UsageError(f"config file {path!r} does not exist")
        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise UsageError(f"config file {path!r} is not valid YAML: {one_line(err)}") from err
        if not isinstance(config, dict):
            raise UsageError(f"config file {path!r} must hold a YAML mapping of `field: value`")
        for key in config:
            if key != "env" and key not in fields:
                raise UsageError(
                    f"unknown field `{key}` in {path}{did_you_mean(str(key), fields)} (`--help` lists the fields)"
                )
        argv = argv[:index] + argv[index + 2 :]
    _, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UsageError(unknown_arguments_message(unknown, parser._option_string_actions))


def _is_own_action(action) -> bool:
    """Options of this project, listed first in the help: script, pruning and distillation fields, the model."""
    from grpo_prune.config import MamaGRPOConfig

    own = set(TrainScriptArguments.__dataclass_fields__) | {"model_name_or_path", "dtype"}
    own |= set(MamaGRPOConfig.__annotations__)  # only the fields MamaGRPOConfig itself declares
    return action.dest in own


def train_help(full: bool = False) -> str:
    """``grpo-prune train --help``: this project's options and ``--config`` (``full``: then every other option)."""
    parser = _train_parser()
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    own = [a for a in actions if _is_own_action(a)]
    formatter = parser._get_formatter()
    formatter.add_usage("grpo-prune train --config CONFIG.yaml [--FIELD VALUE ...]", None, [])
    formatter.add_text(
        "GRPO training with MAMA pruning and distillation from the frozen dense teacher. A YAML config holds any "
        "field below (as `field: value`); a `--field value` flag overrides it. Errors are one line, exit status 2."
    )
    formatter.start_section("grpo-prune train")
    for flag, text in TRAIN_FLAGS.items():
        formatter.add_argument(argparse.Action([flag], dest=flag, nargs=0, default=argparse.SUPPRESS, help=text))
    formatter.end_section()
    formatter.start_section("model, data, pruning and distillation")
    formatter.add_arguments(own)
    formatter.end_section()
    if full:
        formatter.start_section("TRL GRPOConfig, transformers TrainingArguments and TRL ModelConfig")
        formatter.add_arguments([a for a in actions if not _is_own_action(a)])
        formatter.end_section()
    else:
        formatter.add_text(
            f"Every field of TRL's GRPOConfig, transformers' TrainingArguments and TRL's ModelConfig (max_steps, "
            f"learning_rate, num_generations, ... {len(actions) - len(own)} more) is accepted too: `grpo-prune "
            "train --help-all` lists them."
        )
    return formatter.format_help()


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
    """Parse and validate a `train` command line (config file + overrides). Raises ValueError (`UsageError` for an
    unknown field or flag, with a "did you mean") or FileNotFoundError (a model that cannot be found) on any problem.
    """
    from trl import get_peft_config

    import reward_fns
    from grpo_prune.data import dataset_reward, validate_dataset_name
    from grpo_prune.models import DEFAULT_MODEL, validate_model_name_or_path

    argv = list(argv)
    parser = _train_parser()
    _check_unknown_fields(parser, argv)
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
    from grpo_prune.models import load_model, load_tokenizer, resolve_dtype
    from grpo_prune.trainer import MamaGRPOTrainer

    args = run.training
    start = time.time()
    load_kwargs = {}
    if run.model.attn_implementation:
        load_kwargs["attn_implementation"] = run.model.attn_implementation
    dtype = resolve_dtype(run.model.dtype, use_cpu=args.use_cpu)
    model = load_model(run.model_name_or_path, dtype=dtype, **load_kwargs)
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
    from transformers import TrainerCallback

    class StepStarted(TrainerCallback):  # errors before the first step are the config's or the checkpoint's
        started = False

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = True

    started = StepStarted()
    trainer.add_callback(started)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except _user_errors() as err:
        if not started.started:  # a config or checkpoint mistake found as training begins: one usage line
            raise
        # Past the first step it is not a usage mistake (a Gram matrix not positive definite, NaN scores): the
        # traceback is shown and the exit status is Python's 1, not the usage status 2.
        raise TrainingError(f"training failed at step {trainer.state.global_step}: {one_line(err)}") from err
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
        # Two counts, both exact: entries the masks prune (the report's `params_pruned`, including weights that were
        # already zero in the dense model), and non-zero weights that pruning set to zero (before - after).
        "params_pruned": trainer.pruner.num_pruned() if trainer.pruner else 0,
        "params_zeroed": nonzero_before - nonzero_after,
        "reward_first": _mean(rewards[:window]),
        "reward_last": _mean(rewards[-window:]),
        **_grpo_signal(trainer),
        "wall_time_s": round(time.time() - start, 1),
    }
    if trainer.accelerator.is_main_process:
        write_json_atomic(os.path.join(args.output_dir, "run_summary.json"), summary)
        print(format_summary(summary))
    # Destroys the process group under torchrun / accelerate launch (accelerate's recommended last call); left to
    # interpreter exit, gloo can abort a finished rank ("terminate called without an active exception").
    trainer.accelerator.end_training()
    return summary


class TrainingError(RuntimeError):
    """An error raised once training had started: reported with its traceback, not as a usage error."""


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _grpo_signal(trainer) -> dict[str, Any]:
    """Whether GRPO had a gradient: TRL's `frac_reward_zero_std` (1 = every group's rewards were equal, so every
    advantage was zero) as a median over steps, over all of them and over those after the first prune event, and
    the median `completions/clipped_ratio` (completions cut by `max_completion_length`)."""
    log = trainer.state.log_history
    zero_std = [(e["step"], e["frac_reward_zero_std"]) for e in log if "frac_reward_zero_std" in e]
    first_event = min((e["step"] for e in trainer.prune_events if e["sparsity"] > 0), default=None)
    after = [v for step, v in zero_std if first_event is not None and step > first_event]
    return {
        "frac_reward_zero_std_median": _median([v for _, v in zero_std]),
        "frac_reward_zero_std_median_after_pruning": _median(after),
        "clipped_ratio_median": _median(
            [e["completions/clipped_ratio"] for e in log if "completions/clipped_ratio" in e]
        ),
    }


def format_summary(s: dict[str, Any]) -> str:
    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    zeroed = s["params_nonzero_before"] - s["params_nonzero_after"]
    already_zero = s.get("params_pruned", zeroed) - zeroed
    return "\n".join(
        [
            "",
            "grpo-prune: run finished",
            f"  steps            {s['steps']}  ({s['wall_time_s']} s)",
            f"  sparsity         {s['sparsity_reached']:.4f} of the pruned layers (target {s['target_sparsity']})",
            f"  parameters       {s['params_nonzero_after']:,} non-zero of {s['params_total']:,} "
            f"(before: {s['params_nonzero_before']:,})",
            f"  pruned           {s.get('params_pruned', zeroed):,} weights masked (params_pruned); non-zero "
            f"parameters fell by {zeroed:,} (params_zeroed): {already_zero:,} masked weights were already zero",
            f"  reward           first {fmt(s['reward_first'])} -> last {fmt(s['reward_last'])} (rolling means)",
            f"  GRPO signal      frac_reward_zero_std median {fmt(s.get('frac_reward_zero_std_median'))}, after "
            f"pruning began {fmt(s.get('frac_reward_zero_std_median_after_pruning'))} (1 = no group taught anything); "
            f"clipped_ratio median {fmt(s.get('clipped_ratio_median'))}",
            f"  outputs          {s['output_dir']}  (model with exact zeros, tokenizer, pruning_masks.safetensors, "
            "pruning_report.json, run_summary.json; the pruner's training state only in checkpoint-*)",
            "",
        ]
    )


def train_main(argv: list[str]) -> int:
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(train_help(full="--help-all" in argv))
        return 0
    run = parse_train_args(argv)
    run_train(run)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grpo-prune",
        description="Prune and distil a language model while it is post-trained with GRPO (MAMA pruning).",
        epilog="Run `grpo-prune COMMAND --help` for a command's options. Errors are one line with exit status 2; add "
        "--debug to any command to see the traceback instead.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your command or config": shown as one line. Anything else keeps its traceback."""
    from grpo_prune.trl_compat import TrlSeamError

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, NotImplementedError, TrlSeamError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"grpo-prune: error: unknown command {command!r}{did_you_mean(command, COMMANDS)} (choose from "
            f"{', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run_command(command, rest)
    except _user_errors() as err:
        if debug:
            raise
        print(f"grpo-prune {command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE


def _run_command(command: str, rest: list[str]) -> int:
    if command == "train":
        return train_main(rest)
    if command == "eval":
        from grpo_prune.evaluate import main as eval_main

        return eval_main(rest)
    if command == "oneshot":
        from grpo_prune.oneshot_cli import main as oneshot_main

        return oneshot_main(rest)
    if command == "soup":
        from grpo_prune.soup import main as soup_main

        return soup_main(rest)
    from grpo_prune.export import main as export_main

    return export_main(rest)


if __name__ == "__main__":
    sys.exit(main())

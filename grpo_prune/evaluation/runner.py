"""One model on several tasks: load it (or take it loaded), run each task's scorer on the task's seeded items, time
each task, and count parameters; :func:`compare` does it for a dense and a pruned model and tables them side by
side. :func:`generation_throughput` times generation itself.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from grpo_prune.data import prompt_format_for, stop_at_line_end_
from grpo_prune.evaluation.batching import encode, eval_mode, model_device, pad_id, progress_bar, sync
from grpo_prune.evaluation.report import Comparison, compare_results
from grpo_prune.evaluation.scoring import multiple_choice_accuracy, perplexity, task_accuracy
from grpo_prune.evaluation.tasks import (
    DEFAULT_TASKS,
    DEFAULT_WORDINGS,
    TASKS,
    check_task_data,
    check_tasks,
    check_wordings,
    limits_for,
    load_generation_dataset,
    load_lambada_passages,
    load_multiple_choice,
)
from grpo_prune.models import load_model, load_tokenizer, validate_model_name_or_path

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("grpo_prune.evaluate")

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
    base = encode(tokenizer, THROUGHPUT_PROMPT)
    prompt = (base * (prompt_tokens // len(base) + 1))[:prompt_tokens]
    device = model_device(model)
    pad = pad_id(tokenizer, tokenizer.eos_token_id)
    result: dict[str, Any] = {}
    with eval_mode(model):
        for b in batch_sizes:
            ids = torch.tensor([prompt] * b, device=device)
            mask = torch.ones_like(ids)
            latencies = []
            for call in progress_bar(range(warmup + repeats), progress, desc=f"throughput batch {b}", unit="call"):
                sync(device)
                start = time.perf_counter()
                out = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=pad,
                    use_cache=True,  # even for a model whose trainer turned the config's off
                )
                sync(device)
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
    wordings: Sequence[str] = DEFAULT_WORDINGS,
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
        wordings: prompt wordings of the generation tasks (:data:`~grpo_prune.evaluation.tasks.PROMPT_WORDINGS`),
            each scored on the same items; the first one's metrics are the task's, and with any other than
            ``("train",)`` every wording's metrics are under ``"wordings"``.

    Returns:
        ``{"model", "seed", "dtype", **parameter_counts, "tasks": {task: metrics, with "seconds" (wall time)},
        "seconds"}``; metrics as returned by the task's function (multiple choice and accuracies are fractions).
    """
    tasks = check_tasks(tasks)
    task_limits = limits_for(tasks, limit, limits)
    wordings = check_wordings(wordings)
    for task in tasks:
        check_task_data(task)
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
            budget = spec.max_new_tokens if max_new_tokens is None else max_new_tokens
            by_wording = {}
            for wording in wordings:
                dataset = load_generation_dataset(task, task_limit, seed, prompt_format=prompt_format, wording=wording)
                desc = task if wording == "train" else f"{task} ({wording})"
                by_wording[wording] = task_accuracy(
                    model, tokenizer, dataset, "math_answer", budget, batch_size, progress=progress, desc=desc
                )
            # The first wording's figures at the top level (the table's headline); every wording's beside them.
            metrics = dict(by_wording[wordings[0]])
            if list(wordings) != ["train"]:
                metrics["wordings"] = by_wording
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

"""How each kind of task is scored, on a loaded model and tokenizer (no state; benchmark scripts call these on
in-memory pruned models):

- :func:`perplexity`: ``exp(mean NLL)`` over non-overlapping windows of running text;
- :func:`multiple_choice_accuracy` (with :func:`continuation_logprobs`, :func:`score_choices`): 0-shot multiple
  choice by log-likelihood of each answer given the question, as lm-eval's ``multiple_choice`` tasks;
- :func:`task_accuracy`: greedy answers to a prompt dataset, scored by a reward function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from grpo_prune.evaluation.batching import (
    accepts,
    encode,
    eval_mode,
    left_padded,
    longest_first_batches,
    model_device,
    pad_id,
    progress_bar,
)
from grpo_prune.evaluation.tasks import MultipleChoiceExample

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

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
    sep = encode(tokenizer, separator) if separator else []
    stream: list[int] = []
    for text in texts:
        if needed is not None and len(stream) >= needed:
            break
        stream += (sep if stream else []) + encode(tokenizer, text)
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

    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with eval_mode(model):
        for batch in progress_bar(batches, progress, desc="perplexity", unit="batch"):
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
        return [prefix], encode(tokenizer, continuation)
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
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
    scores = [0.0] * len(encoded)
    device = model_device(model)
    pad = pad_id(tokenizer, 0)
    keep_logits = accepts(model, "logits_to_keep")
    batches = longest_first_batches([len(inp) for inp, _ in encoded], batch_size)
    with eval_mode(model):
        for batch in progress_bar(batches, progress, desc=desc, unit="batch"):
            keep = max(len(encoded[i][1]) for i in batch)
            ids, mask = left_padded([encoded[i][0] for i in batch], pad)
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

    import reward_fns

    reward_fn = reward_fns.resolve(reward)
    rows = [dict(row) for row in dataset]
    if not rows:
        raise ValueError("empty dataset")
    if "prompt" not in rows[0]:
        raise ValueError(f"the dataset needs a 'prompt' column; it has {sorted(rows[0])}")
    texts = [_prompt_text(tokenizer, row["prompt"]) for row in rows]
    encoded = [encode(tokenizer, t) for t in texts]
    completions_ids: list[list[int]] = [[] for _ in rows]
    device = model_device(model)
    pad = pad_id(tokenizer, tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    batches = longest_first_batches([len(ids) for ids in encoded], batch_size)
    with eval_mode(model):
        for batch in progress_bar(batches, progress, desc=desc, unit="batch"):
            ids, mask = left_padded([encoded[i] for i in batch], pad)
            width = ids.shape[1]
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=sorted(eos_ids) or None,
                use_cache=True,  # even for a model whose trainer turned the config's off
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

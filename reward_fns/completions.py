"""What every reward shares: the text of a completion, dataset columns, and a per-sample safety net.

TRL calls a reward as ``fn(prompts=..., completions=..., completion_ids=..., **columns)``, where ``columns`` holds one
list per dataset column (one value per completion) plus TRL's own extras (``trainer_state``, ``log_extra``,
``log_metric``, ``environments``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Keyword arguments TRL passes that are not dataset columns; left out of "columns present" in error messages.
TRL_EXTRAS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


class RewardFunctionWarning(UserWarning):
    """A built-in reward hit a bug on one sample (scored 0.0) or met dataset rows it cannot score (None)."""


def completion_text(completion: Any) -> str:
    """The text a reward scores for one completion.

    A string is returned as is. A chat completion (a list of ``{"role": ..., "content": ...}`` messages, or one such
    message) gives the content of its last assistant message; a message without a ``role`` counts as the assistant's.
    Content may be a string, ``None`` (a tool call only: ``""``) or a list of parts (``{"type": "text", "text": ...}``
    or strings), whose texts are joined. A chat completion with no assistant message gives ``""``.

    Raises:
        TypeError: ``completion`` is neither a string nor chat messages (a programming error, not model output).
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _message_text(completion)
    if isinstance(completion, Sequence) and not isinstance(completion, (bytes, bytearray)):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
                return _message_text(message)
        return ""
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}: "
        f"{completion!r:.80}"
    )


def _message_text(message: Mapping) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def column(reward: str, columns: Mapping[str, Any], name: str, n: int, what: str = "") -> list:
    """The dataset column ``name`` as a list of ``n`` values, or a ``ValueError`` naming the column and the reward.

    A missing or mis-sized column is a configuration error, so it raises at the first call instead of scoring 0.0.
    """
    if name not in columns:
        present = sorted(key for key in columns if key not in TRL_EXTRAS)
        raise ValueError(
            f"reward {reward!r} reads the dataset column {name!r}{f' ({what})' if what else ''}, but the batch has no "
            f"such column (dataset columns present: {present}). Add it to the dataset, or rename yours with "
            f"dataset.rename_column(old, {name!r})."
        )
    values = columns[name]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n:
        size = len(values) if hasattr(values, "__len__") and not isinstance(values, (str, bytes)) else "not a list"
        raise ValueError(
            f"reward {reward!r}: column {name!r} must be a list with one value per completion ({n}), got {size}"
        )
    return list(values)


def score_each(
    reward: str, score: Callable[..., float | None], completions: Sequence, *columns: Sequence
) -> list[float | None]:
    """``[score(completion_text(c), *values) for c, *values in zip(completions, *columns)]``, where a sample whose
    scoring raises scores 0.0.

    Every built-in is written and fuzz-tested never to raise on model output; this net only keeps a long training
    job alive if one still does, and says so with a :class:`RewardFunctionWarning` (shown once per reward and error).
    A completion that is neither text nor chat messages is the caller's bug, so it raises ``TypeError`` first.
    """
    texts = [completion_text(completion) for completion in completions]
    rewards: list[float | None] = []
    for values in zip(texts, *columns, strict=True):
        try:
            rewards.append(score(*values))
        except Exception as exc:  # one odd completion must not end a training job: see the docstring
            warnings.warn(
                f"reward {reward!r} raised {type(exc).__name__} on a sample and scored it 0.0; this is a bug in "
                f"reward_fns, please report it with the completion",
                RewardFunctionWarning,
                stacklevel=3,
            )
            rewards.append(0.0)
    return rewards


_warned_unusable: set[tuple[str, str]] = set()


def warn_unusable_gold(reward: str, column_name: str, value: Any) -> None:
    """Say (once per reward and column) that a row's reference value cannot be used, so the reward returns None."""
    if (reward, column_name) in _warned_unusable:
        return
    _warned_unusable.add((reward, column_name))
    warnings.warn(
        f"reward {reward!r} cannot use the {column_name!r} value of some rows (first seen: {value!r:.80}); "
        f"it returns None (not applicable) for them",
        RewardFunctionWarning,
        stacklevel=5,  # the code that called the reward
    )

"""Text answers: ``exact_match`` (normalised string equality) and ``multiple_choice`` (letter or option text)."""

from __future__ import annotations

import numbers
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from .completions import column, score_each, warn_unusable_gold
from .extract import MAX_SPAN, final_answer

_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textit|mathrm)\{([^{}]{0,200})\}")
_ARTICLE = re.compile(r"(?:a|an|the)\s")
_WRAPPERS = " \t\r\n\"'`*_"
_TRAILING = ".,;:!?"


def normalize_answer(text: str) -> str:
    """Unicode NFKC, ``\\text{x}`` → ``x``, case-folded, whitespace runs → one space, surrounding quotes and
    markdown emphasis (``**``, ``_``, backticks) and trailing ``.,;:!?`` removed, a leading article (a, an, the)
    dropped. Inner punctuation stays: ``3.5`` and ``35`` differ."""
    text = unicodedata.normalize("NFKC", text)
    text = _LATEX_TEXT.sub(r"\1", text).casefold()
    text = " ".join(text.split()).strip(_WRAPPERS).rstrip(_TRAILING).strip(_WRAPPERS)
    article = _ARTICLE.match(text)
    return text[article.end() :] if article else text


def _bounded(span: str) -> str | None:
    """The span without surrounding whitespace, or None past :data:`MAX_SPAN` characters: only an unmarked
    completion can be that long, and a whole essay is not a short answer (this also bounds the normalising work)."""
    span = span.strip()
    return span if len(span) <= MAX_SPAN else None


def _gold_texts(gold: Any) -> list[str] | None:
    if isinstance(gold, str):
        golds = [gold]
    elif isinstance(gold, (int, float)) and not isinstance(gold, bool):
        golds = [str(gold)]
    elif isinstance(gold, Sequence) and not isinstance(gold, (bytes, bytearray)):
        golds = [g for g in gold if isinstance(g, str)]
    else:
        return None
    normalized = [normalize_answer(g) for g in golds]
    return [g for g in normalized if g] or None


def exact_match(prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion's final answer equals the gold answer after :func:`normalize_answer`, else 0.0.

    Reads the dataset column ``answer``: a string, or a list of acceptable strings (aliases); a number is compared
    as its ``str``.

    The final answer is the span given by :func:`reward_fns.extract.final_answer` (the last ``<answer>`` tag, else
    the last ``\\boxed{}``, else the line after the last "answer is" / "answer:"), or the whole completion when it
    has none of these markers (a span longer than 1,000 characters after trimming never matches).

    Returns per completion: 1.0 (match), 0.0 (no match, including empty output), or None when that row's gold is
    missing or empty (not applicable; warned once).
    """
    golds = column("exact_match", columns, "answer", len(completions), "the gold answer or a list of aliases")

    def score(completion: str, gold: Any) -> float | None:
        expected = _gold_texts(gold)
        if expected is None:
            warn_unusable_gold("exact_match", "answer", gold)
            return None
        span = _bounded(final_answer(completion)[0])
        return 1.0 if span is not None and normalize_answer(span) in expected else 0.0

    return score_each("exact_match", score, completions, golds)


# A label in a final-answer span: "B", "(B)", "B)", "B.", "**B**", "[b]"; not a letter inside a word.
_LABEL_IN_SPAN = re.compile(r"(?<![^\W_])(?:([A-Z])|[(\[]([A-Za-z])[)\]])(?![^\W_])")
# An unmarked completion that starts with its label: "B", "(B)", "(b)", "B) Paris", "B. Paris", "**B**: Paris".
_LABEL_AT_START = re.compile(r"[\s*]{0,8}(?:[(\[]([A-Za-z])[)\]]|([A-Z])(?:[\s*]{0,8}$|[*]{0,2}[).:\]]))")


def _options(choices: Any) -> tuple[list[str], list[str]] | None:
    """(labels, option texts) from a list of texts, or an ARC-style ``{"label": [...], "text": [...]}``."""
    if isinstance(choices, Mapping):
        texts, labels = choices.get("text"), choices.get("label")
    else:
        texts, labels = choices, None
    if not isinstance(texts, Sequence) or isinstance(texts, (str, bytes)) or not texts:
        return None
    texts = [str(t) for t in texts]
    if labels is None:
        if len(texts) > 26:
            return None
        labels = list(string.ascii_uppercase[: len(texts)])
    elif not isinstance(labels, Sequence) or len(labels) != len(texts):
        return None
    return [str(label).strip().upper() for label in labels], texts


def _label_for_text(text: str, labels: list[str], texts: list[str] | None) -> str | None:
    text = _bounded(text)
    if not texts or text is None:
        return None
    wanted = normalize_answer(text)
    hits = [label for label, option in zip(labels, texts, strict=True) if normalize_answer(option) == wanted]
    return hits[0] if len(hits) == 1 else None


def _gold_label(gold: Any, labels: list[str], texts: list[str] | None) -> str | None:
    if isinstance(gold, numbers.Integral) and not isinstance(gold, bool):
        return labels[int(gold)] if 0 <= gold < len(labels) else None  # a 0-based index, as in MMLU
    if not isinstance(gold, str):
        return None
    stripped = gold.strip().strip("()[]. ").upper()
    if stripped in labels:
        return stripped
    return _label_for_text(gold, labels, texts)


def _predicted_label(text: str, labels: list[str], texts: list[str] | None) -> str | None:
    span, marked = final_answer(text)
    by_text = _label_for_text(span, labels, texts)
    if by_text is not None:
        return by_text
    if marked:
        for match in _LABEL_IN_SPAN.finditer(span):
            letter = (match.group(1) or match.group(2)).upper()
            if letter in labels:
                return letter
        return None
    match = _LABEL_AT_START.match(text)
    letter = (match.group(1) or match.group(2)).upper() if match else None
    return letter if letter in labels else None


def multiple_choice(prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion picks the gold option, by letter or by the option's text, else 0.0.

    Reads the dataset column ``answer`` (the gold option: a letter such as ``"B"``, a 0-based index such as ``1``,
    or the option's text) and, when present, ``choices`` (the option texts in order, labelled A, B, C, ...; or an
    ARC-style ``{"label": [...], "text": [...]}``). Without ``choices`` the labels are A-Z and only letters count.

    The pick: the final-answer span (:func:`reward_fns.extract.final_answer`) when it equals one option's text
    (normalised as in :func:`normalize_answer`), else the first stand-alone label letter in it (``B``, ``(B)``,
    ``B)``, ``**B**``; lower case only in brackets, ``(b)``). A completion without an answer marker must start with
    the letter (``B``, ``(B) Paris``, ``(b)``, ``B. Paris``; not ``A train...``) or be exactly an option's text.

    Returns per completion: 1.0 (right option), 0.0 (wrong option or no recognisable pick), or None when that row's
    gold cannot be mapped to an option (not applicable; warned once).
    """
    golds = column("multiple_choice", columns, "answer", len(completions), "the gold option")
    choices = columns.get("choices")
    choices = (
        [None] * len(completions) if choices is None else column("multiple_choice", columns, "choices", len(golds))
    )

    def score(completion: str, gold: Any, options: Any) -> float | None:
        parsed = _options(options) if options is not None else None
        labels, texts = parsed if parsed is not None else (list(string.ascii_uppercase), None)
        expected = _gold_label(gold, labels, texts)
        if expected is None:
            warn_unusable_gold("multiple_choice", "answer", gold)
            return None
        return 1.0 if _predicted_label(completion, labels, texts) == expected else 0.0

    return score_each("multiple_choice", score, completions, golds, choices)

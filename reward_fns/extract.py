"""Where the final answer sits in a completion: ``<answer>`` tags, ``\\boxed{}``, or "the answer is".

Every function here runs in time linear in the text (``str.rfind`` and regexes without nested or adjacent
unbounded quantifiers), and a span is at most :data:`MAX_SPAN` characters, so callers can afford anything on it.
"""

from __future__ import annotations

import re
from collections import deque

MAX_SPAN = 1000
"""Characters kept after an answer marker: enough for any real final answer, small enough to parse freely."""

# "The answer is", "Final Answer:", "**Answer:**", "answer = ". One quantifier before a literal keeps it linear.
# It runs on lower-cased text: a literal prefix lets the regex engine skip ahead, where IGNORECASE or a leading \b
# would test every position (ten times slower); the lookbehind stands in for \b.
_PHRASE = r"answer(?<!\wanswer)\b(?:[ \t]+(?:is|was|would be|will be|should be)\b[ \t*]*:?|[ \t*]*[:=])"
_ANSWER_PHRASE = re.compile(_PHRASE)
_ANSWER_PHRASE_ANY_CASE = re.compile(_PHRASE, re.IGNORECASE)
_BRACE = re.compile(r"[{}]")
_NON_SPACE = re.compile(r"\S")


def last_match(pattern: re.Pattern, text: str, pos: int = 0) -> re.Match | None:
    """The last non-overlapping match of ``pattern`` in ``text[pos:]`` (lookbehinds still see before ``pos``)."""
    tail = deque(pattern.finditer(text, pos), maxlen=1)
    return tail[0] if tail else None


def answer_tag(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>``, up to its ``</tag>`` (or the end of the text when unclosed); ``None`` if none."""
    start = text.rfind(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start, start + MAX_SPAN)
    return text[start : end if end >= 0 else start + MAX_SPAN]


def boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or the token after ``\\boxed `` without braces.

    ``None`` when there is no ``\\boxed``, or its braces do not close within :data:`MAX_SPAN` characters.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    match = _NON_SPACE.search(text, start + 6, start + 6 + MAX_SPAN)
    if match is None:
        return None
    if match.group() != "{":  # "\boxed 5"
        end = match.start()
        while end < len(text) and end - match.start() < MAX_SPAN and not text[end].isspace() and text[end] != "$":
            end += 1
        return text[match.start() : end] or None
    depth = 0
    for brace in _BRACE.finditer(text, match.start(), match.start() + MAX_SPAN):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[match.start() + 1 : brace.start()]
    return None


def answer_phrase(text: str) -> str | None:
    """The line after the last "answer is" / "answer:" (case-insensitive), skipping blank lines; ``None`` if none."""
    lowered = text.lower()
    # lower() maps characters one to one unless it lengthens the text (only "İ" does), so positions carry over.
    last = (
        last_match(_ANSWER_PHRASE, lowered) if len(lowered) == len(text) else last_match(_ANSWER_PHRASE_ANY_CASE, text)
    )
    if last is None:
        return None
    first = _NON_SPACE.search(text, last.end(), last.end() + MAX_SPAN)
    if first is None:
        return None
    end = text.find("\n", first.start(), first.start() + MAX_SPAN)
    return text[first.start() : end if end >= 0 else first.start() + MAX_SPAN]


def final_answer(text: str) -> tuple[str, bool]:
    """The final-answer span of a completion and whether an explicit marker delimited it.

    Rules, the first that applies:

    1. the content of the last ``<answer>...</answer>`` (an unclosed tag runs to the end), itself narrowed by
       rules 2-3 when it contains a ``\\boxed{}`` or an answer phrase;
    2. the content of the last ``\\boxed{...}``;
    3. the rest of the line after the last "answer is" / "answer:" / "answer =" (any case; "The final answer is",
       "**Answer:**" too), or the next non-blank line when the phrase ends its line;
    4. otherwise the whole text, with ``False``: the caller decides what an unmarked completion means.
    """
    tagged = answer_tag(text)
    if tagged is not None and tagged.strip():
        inner = boxed(tagged)
        if inner is None:
            inner = answer_phrase(tagged)
        return (inner if inner is not None and inner.strip() else tagged), True
    for rule in (boxed, answer_phrase):
        span = rule(text)
        if span is not None and span.strip():
            return span, True
    return text, False

"""``format_tags``: the completion follows a tag layout such as ``<think>...</think><answer>...</answer>``."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .completions import score_each

_TAG_NAME = re.compile(r"[A-Za-z_][\w.-]*")
_NON_SPACE = re.compile(r"\S")


class FormatTags:
    """A configured ``format_tags`` reward (see :func:`format_tags`); a class, not a closure, so it pickles."""

    def __init__(self, tags: Sequence[str], allow_extra_text: bool, name: str):
        self.tags = tuple(tags)
        self.allow_extra_text = allow_extra_text
        self.__name__ = name
        self._tag = re.compile("<(/?)(" + "|".join(re.escape(tag) for tag in self.tags) + ")>")

    def __repr__(self) -> str:
        return f"format_tags(tags={self.tags!r}, allow_extra_text={self.allow_extra_text!r})"

    def follows_layout(self, text: str) -> bool:
        """Whether ``text`` is exactly the tag blocks in order, each non-blank, with nothing else between or around
        them but whitespace (or any text, with ``allow_extra_text``)."""
        expected = [(closing, tag) for tag in self.tags for closing in ("", "/")]
        found = []
        for match in self._tag.finditer(text):  # stops at the first surplus tag: bounded work on any input
            found.append(match)
            if len(found) > len(expected) or (match.group(1), match.group(2)) != expected[len(found) - 1]:
                return False
        if len(found) != len(expected):
            return False
        # Gaps alternate: outside (before the first block), inside block 1, outside, inside block 2, ..., outside.
        edges = [0, *(pos for match in found for pos in (match.start(), match.end())), len(text)]
        for i in range(0, len(edges), 2):
            start, end = edges[i], edges[i + 1]
            inside = (i // 2) % 2 == 1
            blank = _NON_SPACE.search(text, start, end) is None
            if (inside and blank) or (not inside and not blank and not self.allow_extra_text):
                return False
        return True

    def __call__(self, prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
        return score_each(self.__name__, lambda text: 1.0 if self.follows_layout(text) else 0.0, completions)


def format_tags(
    tags: Sequence[str] = ("think", "answer"), *, allow_extra_text: bool = False, name: str | None = None
) -> FormatTags:
    """A reward that is 1.0 when the completion is exactly the given tag blocks in order, else 0.0.

    With the defaults the layout is ``<think>reasoning</think> <answer>answer</answer>``: each tag opens and closes
    exactly once, in that order, no block is blank, and only whitespace lies before, between and after the blocks.
    Tags are case-sensitive. Reads no dataset column; never returns None.

    Args:
        tags: the block names in order, e.g. ``("reasoning", "answer")`` or ``("think",)``.
        allow_extra_text: accept any text outside the blocks, e.g. a final answer after ``</think>`` with
            ``tags=("think",)``.
        name: the ``__name__`` TRL logs the reward under; by default ``format_tags`` for the default layout, else
            ``format_tags_`` plus the tag names (and ``_extra_text``), e.g. ``format_tags_reasoning_answer``.

    Raises:
        ValueError: no tags, a repeated tag, or a tag name that is not a plain name (``think``, ``my-tag``).
    """
    if isinstance(tags, str):
        tags = (tags,)
    tags = tuple(tags)
    if not tags or len(set(tags)) != len(tags) or not all(isinstance(t, str) and _TAG_NAME.fullmatch(t) for t in tags):
        raise ValueError(
            f"format_tags: `tags` must be distinct plain tag names such as ('think', 'answer'), got {tags!r}"
        )
    if name is None:
        default = tags == ("think", "answer") and not allow_extra_text
        name = "format_tags" if default else "_".join(["format_tags", *tags] + (["extra_text"] * allow_extra_text))
    return FormatTags(tags, allow_extra_text, name)

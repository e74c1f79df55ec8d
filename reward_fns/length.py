"""``length_penalty``: a soft penalty that pulls completion length toward a target."""

from __future__ import annotations

import math
from typing import Any

from .completions import TRL_EXTRAS, score_each

UNITS = ("tokens", "chars", "words")


class LengthPenalty:
    """A configured ``length_penalty`` reward (see :func:`length_penalty`); a class, not a closure, so it pickles."""

    def __init__(self, target: float, unit: str, scale: float, two_sided: bool, name: str):
        self.target, self.unit, self.scale, self.two_sided = target, unit, scale, two_sided
        self.__name__ = name

    def __repr__(self) -> str:
        return (
            f"length_penalty(target={self.target!r}, unit={self.unit!r}, scale={self.scale!r}, "
            f"two_sided={self.two_sided!r})"
        )

    def penalty(self, length: float) -> float:
        """``-min(1, |length - target| / scale)``; 0.0 for any length up to the target when one-sided."""
        excess = length - self.target
        if excess <= 0 and not self.two_sided:
            return 0.0
        penalty = min(1.0, abs(excess) / self.scale)
        return -penalty if penalty else 0.0  # not -0.0 at the target

    def __call__(self, prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
        if self.unit == "tokens":
            ids = columns.get("completion_ids")
            if ids is None or len(ids) != len(completions):
                present = sorted(key for key in columns if key not in TRL_EXTRAS)
                raise ValueError(
                    f"reward {self.__name__!r} counts tokens, so it reads TRL's `completion_ids` (one list of token "
                    f"ids per completion), which this call {'did not pass' if ids is None else 'passed mis-sized'} "
                    f"(other columns: {present}). GRPOTrainer always passes it; when calling the reward yourself, "
                    f"pass completion_ids=... or use length_penalty(unit='chars')."
                )
            return score_each(self.__name__, lambda _, token_ids: self.penalty(len(token_ids)), completions, ids)
        if self.unit == "chars":
            return score_each(self.__name__, lambda text: self.penalty(len(text)), completions)
        return score_each(self.__name__, lambda text: self.penalty(len(text.split())), completions)


def length_penalty(
    target: float = 200,
    *,
    unit: str = "tokens",
    scale: float | None = None,
    two_sided: bool = True,
    name: str | None = None,
) -> LengthPenalty:
    """A reward in [-1, 0] that is 0 at the target length and falls linearly to -1 at ``scale`` away from it.

    ``penalty = -min(1, |length - target| / scale)``: soft (no cliff), bounded (a runaway completion costs at most
    -1), and with the default ``scale = target`` an empty completion and one twice the target both get -1. Reads no
    dataset column; with ``unit="tokens"`` it reads TRL's ``completion_ids``. Never returns None.

    Args:
        target: the length to pull toward (> 0), in ``unit``.
        unit: ``"tokens"`` (len of TRL's ``completion_ids``: what ``max_completion_length`` counts), ``"chars"``
            or ``"words"`` (whitespace-separated) of the completion text.
        scale: the distance from the target at which the penalty reaches -1 (> 0); defaults to ``target``.
        two_sided: penalise shorter completions too; ``False`` only penalises exceeding the target (brevity).
        name: the ``__name__`` TRL logs the reward under; by default ``length_penalty`` for the default settings,
            else ``length_penalty_`` plus what differs, e.g. ``length_penalty_300``, ``length_penalty_300_chars``,
            ``length_penalty_200_one_sided``.

    Raises:
        ValueError: a non-positive ``target`` or ``scale``, or an unknown ``unit``.
    """
    if unit not in UNITS:
        raise ValueError(f"length_penalty: `unit` must be one of {UNITS}, got {unit!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) or target <= 0:
        raise ValueError(f"length_penalty: `target` must be a positive number, got {target!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"length_penalty: `scale` must be a positive number or None, got {scale!r}")
    if name is None:
        parts = [f"{target:g}"]
        parts += [unit] if unit != "tokens" else []
        parts += [f"scale{scale:g}"] if scale is not None else []
        parts += ["one_sided"] if not two_sided else []
        default = target == 200 and parts == ["200"]
        name = "length_penalty" if default else "_".join(["length_penalty", *parts])
    return LengthPenalty(target, unit, target if scale is None else scale, two_sided, name)

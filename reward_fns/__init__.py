"""Verifiable rewards for GRPO with TRL's signature, and lookup by name or import path.

Every reward is ``fn(prompts, completions, **kwargs) -> list[float | None]``: completions are strings or chat
messages, dataset columns arrive as keyword lists, 0.0 means the model's output is wrong or unparsable, and None
means the reward does not apply to that row (its reference value is unusable). No built-in raises on model output;
a missing dataset column raises a ``ValueError`` naming it at the first call.

>>> import reward_fns
>>> reward_fns.math_answer(None, ["... so she has 72 apples.\\n#### 72"], answer=["#### 72"])
[1.0]
>>> brevity = reward_fns.length_penalty(target=100, unit="words")
>>> brevity.__name__
'length_penalty_100_words'
>>> reward_fns.resolve("math_answer") is reward_fns.math_answer
True
"""

from .arithmetic import countdown
from .completions import RewardFunctionWarning, completion_text
from .length import length_penalty
from .matching import exact_match, multiple_choice
from .numeric import math_answer, math_answer_partial
from .registry import BUILTINS, RewardFunc, available, get, resolve
from .tags import format_tags

__all__ = [
    "BUILTINS",
    "RewardFunc",
    "RewardFunctionWarning",
    "available",
    "completion_text",
    "countdown",
    "exact_match",
    "format_tags",
    "get",
    "length_penalty",
    "math_answer",
    "math_answer_partial",
    "multiple_choice",
    "resolve",
]

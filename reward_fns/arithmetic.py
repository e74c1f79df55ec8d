"""``countdown``: an arithmetic expression that uses the given numbers and reaches the target, checked with ``ast``.

The expression is never passed to ``eval``: it is parsed with :func:`ast.parse` and evaluated by a walk that knows
only integer literals and ``+ - * /`` on exact fractions. With at most :data:`MAX_EXPRESSION` characters and no
power operator, every value stays below ``10**MAX_EXPRESSION``, so ``9**9**9`` or deep nesting cannot stall it.
"""

from __future__ import annotations

import ast
import numbers
import operator
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from .completions import column, score_each, warn_unusable_gold
from .extract import final_answer

MAX_EXPRESSION = 200
"""Longest expression (characters) considered; a Countdown answer over six numbers needs well under 100."""

_SYMBOLS = str.maketrans({"×": "*", "·": "*", "∗": "*", "÷": "/", "−": "-", "–": "-", "[": "(", "]": ")"})
_LATEX = re.compile(r"\\(?:times|cdot|div|left|right)|[${}]|\\[()\[\]]")
_LATEX_OPS = {"\\times": "*", "\\cdot": "*", "\\div": "/"}
_ALLOWED = re.compile(r"[0-9+\-*/() \t.]+")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _Invalid(Exception):
    """The expression breaks the rules (a disallowed node, a division by zero)."""


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Invalid("division by zero")
        return _OPERATORS[type(node.op)](left, right)
    raise _Invalid(f"{type(node).__name__} is not allowed")


def expression_of(text: str) -> str:
    """The candidate expression of a completion: its final-answer span (``<answer>`` tag, ``\\boxed{}``, "answer
    is"), else its last non-blank line; ``×·÷−`` and LaTeX ``\\times \\cdot \\div`` become ``* * / -``, ``$``,
    braces and ``\\left``/``\\right`` go, of ``lhs = rhs`` the first side with an operator is kept, and of that the
    longest run of expression characters (digits, ``+-*/()``, spaces), so "So: (1+2)*3 = 9" gives ``(1+2)*3``."""
    span, marked = final_answer(text)
    if not marked:
        lines = [line for line in text[-4 * MAX_EXPRESSION :].splitlines() if line.strip()]
        span = lines[-1] if lines else ""
    if len(span) > 4 * MAX_EXPRESSION:
        return span  # rejected by the length check; skip the rewriting
    span = _LATEX.sub(lambda m: _LATEX_OPS.get(m.group(), ""), span).translate(_SYMBOLS)
    sides = span.split("=")
    with_operator = [side for side in sides if any(op in side for op in "+-*/")]
    side = with_operator[0] if with_operator else sides[0]
    runs = [run for run in _ALLOWED.findall(side) if any(ch.isdigit() for ch in run)]
    longest = max(reversed(runs), key=len, default="")  # reversed: the last of equally long runs
    return longest.strip().rstrip(".").strip()


def check_expression(expression: str, nums: Sequence[int], target: Fraction) -> bool:
    """Whether ``expression`` uses each of ``nums`` exactly once (all of them, no other literal) with ``+ - * /``
    and parentheses, and equals ``target`` exactly. No unary minus, no powers, no decimals; never raises."""
    if not expression or len(expression) > MAX_EXPRESSION or not _ALLOWED.fullmatch(expression):
        return False
    try:
        tree = ast.parse(expression, mode="eval")
        used: list[int] = []
        value = _evaluate(tree.body, used)
    except (SyntaxError, ValueError, RecursionError, MemoryError, _Invalid):
        return False
    return Counter(used) == Counter(nums) and value == target


def _puzzle(nums: Any, target: Any) -> tuple[list[int], Fraction] | None:
    if isinstance(nums, (str, bytes)) or not isinstance(nums, Sequence) and not hasattr(nums, "tolist"):
        return None
    nums = list(nums.tolist() if hasattr(nums, "tolist") else nums)
    if not nums or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in nums):
        return None
    if isinstance(target, numbers.Real) and not isinstance(target, (bool, numbers.Rational)):
        target = int(target) if float(target).is_integer() else None  # 24.0 from a float column
    if not isinstance(target, numbers.Rational) or isinstance(target, bool):
        return None
    return [int(n) for n in nums], Fraction(int(target.numerator), int(target.denominator))


def countdown(prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion's expression uses every given number exactly once and evaluates to the target.

    Reads the dataset columns ``nums`` (the numbers to use, a list of integers per row) and ``target`` (the integer
    to reach), as in the Countdown-Tasks datasets. The expression is taken by :func:`expression_of` and checked by
    :func:`check_expression` (``ast``, exact fractions, never ``eval``).

    Returns per completion: 1.0 (valid and hits the target), 0.0 (anything else: no expression, a number missing,
    reused or invented, a disallowed operator, a division by zero, a wrong value), or None when that row's
    ``nums``/``target`` are not integers (not applicable; warned once).
    """
    all_nums = column("countdown", columns, "nums", len(completions), "the numbers to use")
    targets = column("countdown", columns, "target", len(completions), "the number to reach")

    def score(completion: str, nums: Any, target: Any) -> float | None:
        puzzle = _puzzle(nums, target)
        if puzzle is None:
            warn_unusable_gold("countdown", "nums/target", (nums, target))
            return None
        return 1.0 if check_expression(expression_of(completion), *puzzle) else 0.0

    return score_each("countdown", score, completions, all_nums, targets)

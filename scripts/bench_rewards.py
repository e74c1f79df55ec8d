"""Time every built-in reward on 1,000 completions of 10,000 characters; print the median per reward.

    OMP_NUM_THREADS=1 python scripts/bench_rewards.py [--n 1000] [--chars 10000] [--repeats 5]

Two loads: "typical" (reasoning-like prose with numbers and a final answer in one of the usual formats) and
"hostile" (shapes that would trip backtracking regexes or unbounded arithmetic: long runs of digits, spaces,
"answer" words, brackets, tags, operators, huge exponents). Every completion is exactly ``--chars`` long.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import reward_fns

_WORDS = "the of and to she he apples each total so then we have cost more than half twice per day".split()
_ENDINGS = [
    "\n#### {a}",
    "\nSo the answer is {a}.",
    "\nTherefore, the final answer is $\\boxed{{{a}}}$.",
    "</think>\n<answer>{a}</answer>",
    "\nAnswer: (B)",
    "\n<answer>(25 - 5) * 2 + 4 - 8</answer>",
    "\nIn total she made {a} dollars",
]
_HOSTILE = [
    "1" * 97 + ",",
    "answer " * 13,
    " " * 97 + "x",
    "(" * 60 + "1" + ")" * 30,
    "<think><answer></think>",
    "#### " + " " * 50 + "5 apples ",
    "\\boxed{" * 12,
    "9**9**9 * 1e999999 ",
    "٧٢٣" * 20 + "\n",
    "-" * 80 + "1/0 ",
]


def typical(rng: random.Random, chars: int) -> str:
    ending = rng.choice(_ENDINGS).format(a=rng.randint(1, 10_000))
    words = []
    length = len(ending)
    while length < chars:
        word = str(rng.randint(0, 999)) if rng.random() < 0.15 else rng.choice(_WORDS)
        word += "\n" if rng.random() < 0.05 else " "
        words.append(word)
        length += len(word)
    body = "".join(words)
    if ending.startswith("</think>"):
        body = "<think>" + body
    return (body + ending)[-chars:] if len(body + ending) > chars else body + ending


def hostile(rng: random.Random, chars: int) -> str:
    pieces = []
    length = 0
    while length < chars:
        piece = rng.choice(_HOSTILE)
        pieces.append(piece)
        length += len(piece)
    return "".join(pieces)[:chars]


def batch_columns(n: int, rng: random.Random, letters: bool) -> dict:
    """The dataset columns the built-ins read, plus TRL's completion_ids (about 4 characters per token)."""
    return {
        "answer": [rng.choice("ABCD") if letters else str(rng.randint(1, 10_000)) for _ in range(n)],
        "choices": [["red", "blue", "green", "white"] for _ in range(n)],
        "nums": [[25, 5, 2, 4, 8] for _ in range(n)],
        "target": [36 for _ in range(n)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="completions per call")
    parser.add_argument("--chars", type=int, default=10_000, help="characters per completion")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per reward and load (median reported)")
    args = parser.parse_args()

    rng = random.Random(0)
    loads = {
        "typical": [typical(rng, args.chars) for _ in range(args.n)],
        "hostile": [hostile(rng, args.chars) for _ in range(args.n)],
    }
    ids = [list(range(args.chars // 4)) for _ in range(args.n)]
    rewards = {name: reward_fns.get(name) for name in reward_fns.available()}
    rewards["length_penalty(unit='chars')"] = reward_fns.length_penalty(unit="chars")
    rewards["length_penalty(unit='words')"] = reward_fns.length_penalty(unit="words")

    print(f"{args.n} completions x {args.chars} characters, median of {args.repeats} calls")
    print(f"| {'reward':<28} | {'typical (s)':>11} | {'hostile (s)':>11} |")
    print(f"|{'-' * 30}|{'-' * 13}|{'-' * 13}|")
    for name, reward in rewards.items():
        columns = batch_columns(args.n, rng, letters=name == "multiple_choice") | {"completion_ids": ids}
        medians = []
        for completions in loads.values():
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                scores = reward(None, completions, **columns)
                times.append(time.perf_counter() - start)
                assert len(scores) == args.n
            medians.append(statistics.median(times))
        print(f"| {name:<28} | {medians[0]:>11.3f} | {medians[1]:>11.3f} |")


if __name__ == "__main__":
    main()

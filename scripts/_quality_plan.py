"""bench_quality's plan: the sparsity settings, scorer rows, training budget and calibration of a run, resolved and
validated from the command line before anything heavy loads; the conditions it measures; and the result cache, keyed
by what each condition was made with (``OUTPUT_DIR/conditions/<condition>.json``).

A sibling module of ``scripts/bench_quality.py`` (the entry point, which re-exports these names); see its docstring.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from grpo_prune import fileio

MODEL = "smollm2-135m-instruct"
EVAL_TASKS = ("lambada", "piqa", "arithmetic")
MODES = ("oneshot", "trained", "recovered")
CALIBRATION_SOURCES = ("mixed", "text", "arithmetic", "self", "mix")
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


# --------------------------------------------------------------------------------------------------------------------
# The result cache: one JSON file per condition, reused while its fingerprint matches
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

"""The sparsity-quality frontier: quality against sparsity for each method, and the highest sparsity that keeps the
task.

Every point is a model made by the user-facing commands (``grpo-prune oneshot`` and ``grpo-prune train``, run as
subprocesses, exactly as printed in the table), then evaluated in this process on held-out data. Methods
(``--methods``):

* ``quickstart``: ``grpo-prune train --config configs/quickstart.yaml`` as shipped, at the point's sparsity: its
  one-shot start (``prune_init_scorer``) and recovery in one command; its CPU-seconds include the start.
  ``quickstart-cool``: the same with rollouts at temperature 0.7; ``quickstart-taskcal-cool`` that with the start's
  calibration 7/8 the task's answers (``recipe-taskcal-cool`` in one command). Every other trained method runs 16
  steps (the config's ``max_steps`` when they were measured) unless given as ``NAME@STEPS``; ``quickstart@16`` is
  the quickstart before it moved to 24 steps.
* ``sparsegpt``: ``grpo-prune oneshot --scorer sparsegpt`` at its defaults (128 x 256 tokens of the dense model's
  own samples, ``results/calibration``); no training.
* ``recipe``: that one-shot model (the same folder: made once per sparsity), then ``grpo-prune train --config
  configs/quickstart.yaml`` with its masks held (``prune_init_masks``), the dense model as teacher, learning rate
  3e-5: GRPO with distillation recovers it, on the config's earlier data (``arithmetic-easy`` prompts, ``+`` and
  ``-``; ``python_docs`` text). ``recipe-mixed``: the same on the mixed ``arithmetic`` prompts (``+``, ``-``,
  ``*``); ``recipe-self``: that, distilling the dense model's own samples (``distill_dataset: self``) instead of
  ``python_docs``: the quickstart's data now; ``recipe-task``: only its answers to the task's train prompts
  (``self:task``), 8 windows a step instead of 2. ``recipe-cool``: ``recipe-self`` with rollouts at temperature
  0.7; ``recipe-kd-cool``: that with the distillation on the rollouts weighted 4 instead of 1 (``distill_coef``), so
  that the teacher's per-token signal on the student's own completions outweighs GRPO's per-group one.
  ``sparsegpt-taskcal`` / ``recipe-taskcal-cool``: the same one-shot and recovery with 7/8 of the calibration's
  tokens the dense model's answers to the task's train prompts instead of half (``--calibration-task-share
  0.875``): the start keeps more of the task and more held-out perplexity.
* ``sparsegpt-24`` / ``recipe-24``: the same for SparseGPT 2:4 (``--granularity n:m``; 50% only), the recovery as
  ``recipe-self``'s with the pattern held. ``wanda-mlp`` / ``recipe-mlp``: whole MLP neurons (the sparsity is the
  fraction of neurons removed), exported physically smaller, then ``recipe-self``'s recovery of that smaller model
  with no masks (``prune_target_sparsity`` 0); ``sparsegpt-mlp`` / ``recipe-sparsegpt-mlp`` the same with the
  neurons chosen by OBS and ``down_proj`` reconstructed. ``wanda-heads`` / ``sparsegpt-heads``: whole query heads,
  as many per KV head (the sparsity is the fraction of heads; ``o_proj`` reconstructed by sparsegpt), and
  ``recipe-sparsegpt-heads`` the recovery of the latter's smaller model; ``sparsegpt-mlp-heads``: both kinds of
  units at the same fraction.
* ``wanda-trained`` / ``mama-trained``: ``grpo-prune train --config configs/quickstart.yaml`` from the dense model,
  pruning during training on the quickstart's cubic schedule with ``mama_alpha`` 0 (the score is then wanda's,
  from the activations training saw) or ``--mama-alpha`` (default 0.2, statistic ``abs``); ``mama-reward``: the
  latter with each decoder layer's sparsity set by the reward statistic's mass (``prune_allocation: reward``).
* ``wanda`` / ``wanda-owl``: ``grpo-prune oneshot --scorer wanda`` on the same calibration, every layer at the
  target or spread by outliers (``--allocation owl``, the global count exact); no training.
* ``join``: ``grpo-prune oneshot --scorer sparsegpt`` at ``--join-start`` of the target (default 0.7: 35% for a
  50% target), then ``grpo-prune train`` from it with ``mama`` events (``--mama-alpha``) up to the target, at the
  recovery learning rate: a sparsegpt start followed by MAMA.
* ``gradual``: the quickstart config with its SparseGPT start at ``--gradual-start`` of the target (default 0.8: 40%
  for a 50% target), then training-time ``sparsegpt`` events (OBS on the Gram matrices of the inputs training saw) at
  steps 8 and 16 up to the target, rollouts at temperature 0.7: pruning in two stages with recovery between them.
* ``soupN-METHOD`` (e.g. ``soup4-recipe-cool@32``): ``grpo-prune soup`` of N seeds of a recipe, which all hold one
  start's masks; its seed s averages the recipe's seeds N*s to N*s+N-1, measured as points of their own first (their
  models kept), and its training tokens and CPU-seconds are their sums.

Evaluation (:func:`grpo_prune.evaluate.evaluate_model`, the same seeded items for every model): LAMBADA perplexity on
``--lambada`` windows of 512 tokens, PIQA ``acc_norm`` on ``--piqa`` validation questions, and greedy accuracy on the
``--arithmetic-task`` test problems (default ``arithmetic``: all 159 of its test split, disjoint from every train
prompt; ``arithmetic_wide`` holds ~1,600) in each of ``--wordings`` (the training format, and wordings never trained
on). Each point reports its training tokens (TRL's ``num_tokens`` of the rollouts, plus the distilled text windows),
the CPU-seconds of its commands (user + system of the subprocesses, every thread) and of its evaluation, and TRL's
``frac_reward_zero_std`` and ``completions/clipped_ratio`` (medians over the run's steps) for trained points.

Headline (per method, per seed, then the worst over seeds): the highest sparsity at which the model keeps at least
``--keep`` (95%) of the dense arithmetic accuracy in every wording measured, at no more than ``--max-ppl`` (1.25x)
the dense perplexity. Points run one at a time, each written to ``OUTPUT_DIR/points/<point>.json`` when done; a
rerun skips finished points (an interrupted run resumes), so two processes with different ``--methods`` can share
one output folder. ``frontier.md``, ``frontier.json`` and ``frontier.png`` are rewritten after every point;
``--tables-only`` rewrites them from the points, measuring nothing.

    OMP_NUM_THREADS=1 python scripts/frontier.py [--methods sparsegpt recipe] [--sparsities 0.3 0.4 0.5 0.6]
        [--seeds 0] [--wordings train zero_shot reworded] [--output-dir results/frontier] [--work-dir /tmp/frontier]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _results_page as results_page

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
CONFIG = "configs/quickstart.yaml"
METHODS = (
    "quickstart",
    "quickstart-cool",
    "quickstart-taskcal-cool",
    "sparsegpt",
    "recipe",
    "recipe-mixed",
    "recipe-self",
    "recipe-task",
    "recipe-24",
    "recipe-mlp",
    "recipe-lr",
    "recipe-cal",
    "recipe-mlp-task",
    "recipe-cool",
    "recipe-wide",
    "recipe-kd-cool",
    "recipe-taskcal-cool",
    "wanda-trained",
    "mama-trained",
    "mama-reward",
    "join",
    "gradual",
    "wanda",
    "wanda-owl",
    "sparsegpt-24",
    "wanda-mlp",
    "sparsegpt-256",
    "sparsegpt-taskcal",
    "wanda-mlp-task",
    "sparsegpt-mlp",
    "recipe-sparsegpt-mlp",
    "recipe-sparsegpt-mlp-cool",
    "wanda-heads",
    "sparsegpt-heads",
    "recipe-sparsegpt-heads",
    "sparsegpt-mlp-heads",
)


def structured(units: str) -> tuple[str, ...]:
    """`grpo-prune oneshot` flags that remove whole ``units`` (mlp, heads, mlp+heads), exported smaller."""
    return ("--granularity", "structured", "--structured-units", units)


MLP_NEURONS = structured("mlp")
HEADS = structured("heads")
#: One-shot methods (no training, so no seeds): method -> the flags of `grpo-prune oneshot` besides the sparsity.
ONESHOT = {
    "sparsegpt": ("--scorer", "sparsegpt"),
    "wanda": ("--scorer", "wanda"),
    "wanda-owl": ("--scorer", "wanda", "--allocation", "owl"),
    "sparsegpt-24": ("--scorer", "sparsegpt", "--granularity", "n:m", "--n-m", "2:4"),
    "wanda-mlp": ("--scorer", "wanda", *MLP_NEURONS),
    "sparsegpt-256": ("--scorer", "sparsegpt", "--calibration-windows", "256"),  # twice the default calibration
    # 7/8 of the self calibration's tokens answers to the task's train prompts (the default half): keeps the task
    "sparsegpt-taskcal": ("--scorer", "sparsegpt", "--calibration-task-share", "0.875"),
    # MLP neurons chosen by their activations on the dense model's answers to the task prompts alone
    "wanda-mlp-task": ("--scorer", "wanda", *MLP_NEURONS, "--calibration", "self:task"),
    # MLP neurons removed with OBS: down_proj reconstructed on the kept ones, layer by layer
    "sparsegpt-mlp": ("--scorer", "sparsegpt", *MLP_NEURONS),
    # whole query heads, as many per KV head (SmolLM2-135M: 3 per KV head, so 1/3 and 2/3 are the reachable points)
    "wanda-heads": ("--scorer", "wanda", *HEADS),
    "sparsegpt-heads": ("--scorer", "sparsegpt", *HEADS),  # o_proj reconstructed on the kept heads
    # both: the same fraction of the MLP neurons and of the query heads of every layer
    "sparsegpt-mlp-heads": ("--scorer", "sparsegpt", *structured("mlp+heads")),
}
#: One-shot methods whose sparsity is fixed by their pattern (a recipe from one of them is fixed alike).
FIXED_SPARSITY = {"sparsegpt-24": 0.5}
#: GRPO on the mixed `arithmetic` train prompts (+, -, *), as the quickstart now does.
MIXED = ("--dataset_name", "arithmetic")
#: The quickstart config's data before it moved to the mixed prompts and `self` text (commit 84287c2): the methods
#: measured with it pin it, so that rerunning them reproduces their points.
EASY_DOCS = ("--dataset_name", "arithmetic-easy", "--distill_dataset", "python_docs")
#: Pruned during training from dense, as measured: the config's one-shot start off, and its learning rate before
#: the start existed (1e-4: results/sweep's best rate for pruning during training).
FROM_DENSE = ("--prune_init_scorer", "none", "--learning_rate", "1e-4", *EASY_DOCS)
SELF_TEXT = (*MIXED, "--distill_dataset", "self")  # the quickstart's data now
#: Rollouts at temperature 0.7: completions nearer the greedy answers the evaluation scores.
COOL = ("--temperature", "0.7")
#: Recovery recipes: method -> (the one-shot method of the start, extra `grpo-prune train` flags).
RECIPES = {
    "recipe": ("sparsegpt", EASY_DOCS),
    "recipe-mixed": ("sparsegpt", (*MIXED, "--distill_dataset", "python_docs")),
    "recipe-self": ("sparsegpt", SELF_TEXT),
    "recipe-task": ("sparsegpt", (*MIXED, "--distill_dataset", "self:task", "--distill_text_batch_size", "8")),
    "recipe-24": ("sparsegpt-24", (*SELF_TEXT, "--prune_granularity", "n:m")),
    "recipe-mlp": ("wanda-mlp", SELF_TEXT),
    "recipe-lr": ("sparsegpt", (*SELF_TEXT, "--learning_rate", "1e-4")),  # recovery at the from-dense rate
    "recipe-cal": ("sparsegpt-256", SELF_TEXT),  # a start calibrated on 64k self tokens
    "recipe-mlp-task": ("wanda-mlp-task", SELF_TEXT),
    "recipe-sparsegpt-mlp": ("sparsegpt-mlp", SELF_TEXT),
    "recipe-sparsegpt-mlp-cool": ("sparsegpt-mlp", (*SELF_TEXT, *COOL)),
    "recipe-sparsegpt-heads": ("sparsegpt-heads", SELF_TEXT),
    "recipe-cool": ("sparsegpt", (*SELF_TEXT, *COOL)),
    "recipe-wide": ("sparsegpt", (*SELF_TEXT, "--per_device_train_batch_size", "16")),  # two prompts a step
    "recipe-kd-cool": ("sparsegpt", (*SELF_TEXT, *COOL, "--distill_coef", "4")),  # on-policy distillation leads
    "recipe-taskcal-cool": ("sparsegpt-taskcal", (*SELF_TEXT, *COOL)),  # recipe-cool from the task-heavy start
}
#: The shipped config in one command: method -> its `grpo-prune train` flags besides the sparsity and seed.
QUICKSTARTS = {
    "quickstart": (),
    "quickstart-cool": COOL,
    # recipe-taskcal-cool in one command: the config's own start with 7/8 of its calibration the task's answers
    "quickstart-taskcal-cool": (*COOL, "--prune_calibration_task_share", "0.875"),
}
#: Optimizer steps of every trained method but `quickstart` when not given as @STEPS: the config's `max_steps` when
#: they were measured (it is 24 since the quickstart moved there), pinned so that their commands reproduce their
#: points.
MEASURED_STEPS = "16"
#: Learning rates measured in results/sweep: 3e-5 recovers a one-shot model (the quickstart's), 1e-4 prunes during
#: training (`FROM_DENSE`).
RECOVER_LR = "3e-5"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("results/frontier"))
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/tmp/frontier"), help="models and logs (large; not results)"
    )
    parser.add_argument(
        "--methods", nargs="+", type=method_spec, default=["sparsegpt", "recipe"], help=method_spec.__doc__
    )
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (one-shot: seed 0 only)")
    parser.add_argument("--mama-alpha", type=float, default=0.2)
    parser.add_argument("--join-start", type=float, default=0.7, help="join: one-shot sparsity / target")
    parser.add_argument("--gradual-start", type=float, default=0.8, help="gradual: one-shot sparsity / target")
    parser.add_argument("--lambada", type=int, default=12, help="LAMBADA windows of 512 tokens")
    parser.add_argument("--piqa", type=int, default=150, help="PIQA validation questions")
    parser.add_argument("--arithmetic-task", default="arithmetic", choices=("arithmetic", "arithmetic_wide"))
    parser.add_argument("--arithmetic", type=int, default=None, help="problems (default: the whole test split)")
    parser.add_argument("--wordings", nargs="+", default=["train", "zero_shot", "reworded"])
    parser.add_argument("--keep", type=float, default=0.95, help="headline: arithmetic kept, fraction of dense")
    parser.add_argument("--max-ppl", type=float, default=1.25, help="headline: largest perplexity / dense")
    parser.add_argument("--keep-models", action="store_true", help="keep trained models (one-shot ones are kept)")
    parser.add_argument("--tables-only", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Points: the commands that make each model
# --------------------------------------------------------------------------------------------------------------------


def point_name(method: str, sparsity: float, seed: int) -> str:
    return "dense" if method == "dense" else f"{method}-{round(100 * sparsity)}-s{seed}"


def plan(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    points = [("dense", 0.0, 0)]
    for sparsity in args.sparsities:
        for seed in args.seeds:  # seed-major: an interrupted run leaves every method with as many seeds
            points += [
                (method, sparsity, seed)
                for method in args.methods
                if (seed == 0 or method not in ONESHOT) and fixed_sparsity(method) in (None, sparsity)
            ]
    return points


def fixed_sparsity(method: str) -> float | None:
    """The only sparsity a method runs at (its one-shot start's pattern), or None."""
    base = method.partition("@")[0]
    return FIXED_SPARSITY.get(RECIPES[base][0] if base in RECIPES else base)


def physically_smaller(method: str) -> bool:
    """Whether a recipe starts from a structured one-shot export, a physically smaller model."""
    return method in RECIPES and "structured" in ONESHOT[RECIPES[method][0]]


def oneshot_dir(args: argparse.Namespace, sparsity: float, method: str = "sparsegpt") -> Path:
    return args.work_dir / f"oneshot-{method}-{round(1000 * sparsity)}"


def oneshot_command(folder: Path, sparsity: float, method: str = "sparsegpt") -> list[str]:
    # 10 digits: a head sparsity such as 1/3 must reach the pruner as a whole number of heads per KV head
    return ["grpo-prune", "oneshot", MODEL, str(folder), "--sparsity", f"{sparsity:.10g}", *ONESHOT[method]]


def train_command(folder: Path, sparsity: float, seed: int, *extra: str) -> list[str]:
    return [
        "grpo-prune", "train", "--config", CONFIG, "--output_dir", str(folder), "--save_strategy", "no",
        "--prune_target_sparsity", f"{sparsity:g}", "--seed", str(seed), *extra,
    ]  # fmt: skip


_SOUP = re.compile(r"soup(\d+)-(.+)")


def soup_of(method: str) -> tuple[int, str] | None:
    """``(members, member method)`` of a ``soupN-METHOD`` method, else None."""
    match = _SOUP.fullmatch(method)
    return (int(match.group(1)), match.group(2)) if match else None


def method_spec(text: str) -> str:
    """A ``--methods`` entry: a method name, or ``NAME@STEPS`` for its training run at ``STEPS`` optimizer steps
    instead of its default (the config's ``max_steps`` for ``quickstart``, :data:`MEASURED_STEPS` for the others; e.g.
    ``recipe@48``: a longer recovery; one-shot methods take no steps); or ``soupN-METHOD`` (e.g.
    ``soup4-recipe-cool@32``), the average (``grpo-prune soup``) of N seeds of a trained method that holds its
    start's masks: seed s averages METHOD's seeds N*s to N*s+N-1, measured as points of their own first."""
    soup = soup_of(text)
    if soup is not None:
        members, member = soup
        if members < 2 or method_spec(member).partition("@")[0] not in RECIPES:
            raise argparse.ArgumentTypeError(f"{text!r}: soupN-METHOD needs N >= 2 and a recipe (e.g. recipe-cool@32)")
        return text
    base, at, steps = text.partition("@")
    if base not in METHODS or (at and (base in ONESHOT or not steps.isdigit() or int(steps) < 1)):
        raise argparse.ArgumentTypeError(
            f"{text!r}: choose from {', '.join(METHODS)}, optionally @STEPS for a trained one (e.g. recipe@48)"
        )
    return text


def commands(args: argparse.Namespace, method: str, sparsity: float, seed: int) -> tuple[list[list[str]], Path]:
    """The commands that make a point's model, and the folder that holds it: a method's training runs for its
    @STEPS, else the config's `max_steps` (`quickstart`) or :data:`MEASURED_STEPS` (every other trained method)."""
    base, _, steps = method.partition("@")
    if base in ONESHOT or (base == "quickstart" and not steps):
        return _commands(args, method, sparsity, seed)
    cmds, folder = _commands(args, base, sparsity, seed)
    if steps:  # the same commands, training into this point's own folder
        folder = args.work_dir / point_name(method, sparsity, seed)
    for c in cmds:
        if c[1] == "train":
            c[c.index("--output_dir") + 1] = str(folder)
            c += ["--max_steps", steps or MEASURED_STEPS]
    return cmds, folder


def _commands(args: argparse.Namespace, method: str, sparsity: float, seed: int) -> tuple[list[list[str]], Path]:
    """`commands` at the config's `max_steps`."""
    name = point_name(method, sparsity, seed)
    trained = args.work_dir / name
    if method == "dense":
        return [], Path(MODEL)
    if method in QUICKSTARTS:  # the shipped config (its one-shot start included), at this sparsity
        return [train_command(trained, sparsity, seed, *QUICKSTARTS[method])], trained
    if method in ONESHOT:
        folder = oneshot_dir(args, sparsity, method)
        return [oneshot_command(folder, sparsity, method)], folder
    if method in RECIPES:
        start_method, extra = RECIPES[method]
        start = oneshot_dir(args, sparsity, start_method)
        recover = [  # the config's own one-shot start is off: the start is the one-shot command's model
            "--model_name_or_path", str(start), "--prune_init_scorer", "none",
            "--teacher_model_name_or_path", MODEL, "--learning_rate", RECOVER_LR,
        ]  # fmt: skip
        if physically_smaller(method):  # nothing to mask, nothing to prune
            train = train_command(trained, 0.0, seed, *recover, *extra)
        else:  # the start's masks are held
            train = train_command(trained, sparsity, seed, *recover, "--prune_init_masks", str(start), *extra)
        return [oneshot_command(start, sparsity, start_method), train], trained
    if method in ("wanda-trained", "mama-trained", "mama-reward"):
        alpha = "0" if method == "wanda-trained" else f"{args.mama_alpha:g}"
        allocation = ["--prune_allocation", "reward"] if method == "mama-reward" else []
        return [train_command(trained, sparsity, seed, *FROM_DENSE, "--mama_alpha", alpha, *allocation)], trained
    if method == "join":
        start_sparsity = round(args.join_start * sparsity, 4)
        start = oneshot_dir(args, start_sparsity)
        join = [
            "--model_name_or_path", str(start), "--prune_init_scorer", "none", "--prune_init_masks", str(start),
            "--teacher_model_name_or_path", MODEL, "--learning_rate", RECOVER_LR,
            "--prune_initial_sparsity", f"{start_sparsity:g}", "--mama_alpha", f"{args.mama_alpha:g}", *EASY_DOCS,
        ]  # fmt: skip
        return [oneshot_command(start, start_sparsity), train_command(trained, sparsity, seed, *join)], trained
    if method == "gradual":
        start_sparsity = round(args.gradual_start * sparsity, 4)
        gradual = [
            "--prune_init_sparsity", f"{start_sparsity:g}", "--prune_scorer", "sparsegpt",
            "--prune_end_step", "16", "--prune_every", "8", *COOL,
        ]  # fmt: skip
        return [train_command(trained, sparsity, seed, *gradual)], trained
    raise ValueError(f"unknown method {method!r}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_LOGGED = re.compile(r"\{'loss'[^{}]*\}")


def run_command(command: list[str], log: Path) -> dict[str, Any]:
    """Run one command (its output to ``log``); its CPU-seconds, wall seconds and, for training, what TRL logged."""
    c0, w0 = _children_cpu(), time.time()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    record: dict[str, Any] = {
        "command": shlex.join(command),
        "cpu_seconds": _children_cpu() - c0,
        "wall_seconds": time.time() - w0,
    }
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(command)} exited {proc.returncode}:\n{tail}")
    if command[1] == "train":
        steps = [eval(m.group(0), {}) for m in _LOGGED.finditer(log.read_text(encoding="utf-8", errors="replace"))]  # noqa: S307 (TRL's own dict repr)
        summary = json.loads((Path(command[command.index("--output_dir") + 1]) / "run_summary.json").read_text())

        def median(key: str) -> float | None:
            values = [float(s[key]) for s in steps if key in s]
            return statistics.median(values) if values else None

        record.update(
            steps=len(steps),
            rollout_tokens=int(float(steps[-1]["num_tokens"])) if steps else None,
            frac_reward_zero_std=median("frac_reward_zero_std"),
            clipped_ratio=median("completions/clipped_ratio"),
            reward_first=summary.get("reward_first"),
            reward_last=summary.get("reward_last"),
            sparsity_reached=summary.get("sparsity_reached"),
        )
    return record


def text_tokens(command: str, steps: int) -> int:
    """Distilled text tokens of a training command: ``distill_text_batch_size`` x ``distill_text_length`` per step,
    from the command's overrides, else the config it names."""
    import yaml

    config = yaml.safe_load((ROOT / CONFIG).read_text())
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word.startswith("--") and word[2:] in config:
            config[word[2:]] = yaml.safe_load(words[i + 1])
    if not config.get("distill_text_coef") or not config.get("distill_dataset"):
        return 0
    return steps * int(config["distill_text_batch_size"]) * int(config["distill_text_length"])


def evaluate(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from grpo_prune.evaluate import evaluate_model

    limits = {"lambada": args.lambada, "piqa": args.piqa, args.arithmetic_task: args.arithmetic}
    c0 = time.process_time()
    result = evaluate_model(
        str(folder), ["lambada", "piqa", args.arithmetic_task], limits=limits, wordings=args.wordings,
        batch_size=16, progress=False,
    )  # fmt: skip
    tasks = result["tasks"]
    arithmetic = tasks[args.arithmetic_task]
    by_wording = arithmetic.get("wordings", {args.wordings[0]: arithmetic})
    return {
        "ppl": tasks["lambada"]["perplexity"],
        "piqa": tasks["piqa"]["acc_norm"],
        "arithmetic": {w: m["accuracy"] for w, m in by_wording.items()},
        "arithmetic_n": arithmetic["scored"],
        "arithmetic_samples": {w: m["samples"] for w, m in by_wording.items()},
        "sparsity": result["layer_sparsity"],
        "eval_cpu_seconds": time.process_time() - c0,
    }


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "lambada": args.lambada,
        "piqa": args.piqa,
        "arithmetic_task": args.arithmetic_task,
        "arithmetic": args.arithmetic,
        "wordings": list(args.wordings),
    }


def soup_point(args: argparse.Namespace, method: str, sparsity: float, seed: int) -> dict[str, Any]:
    """A ``soupN-METHOD`` point: METHOD's N member points (run here, models kept, unless already measured with their
    models still in the work folder), then ``grpo-prune soup`` of their models. Its training tokens and CPU-seconds
    are the members' sums: what the soup cost."""
    from grpo_prune.fileio import write_json_atomic

    members, member = soup_of(method)
    folders, records = [], []
    for s in range(members * seed, members * (seed + 1)):
        name = point_name(member, sparsity, s)
        path = args.output_dir / "points" / f"{name}.json"
        folder = commands(args, member, sparsity, s)[1]
        if not path.exists():
            print(f"[run] {name} (a member of {method})", flush=True)
            write_json_atomic(path, run_point(args, member, sparsity, s, keep_model=True), default=str)
        elif not (folder / "config.json").is_file():
            raise SystemExit(f"{method}: member {name} was measured but its model {folder} is gone; remove {path}")
        folders.append(folder)
        records.append(json.loads(path.read_text()))
    out = args.work_dir / point_name(method, sparsity, seed)
    soup = ["grpo-prune", "soup", *map(str, folders), "--output-dir", str(out)]
    step = run_command(soup, args.work_dir / f"{point_name(method, sparsity, seed)}.log")
    steps = [*(st for r in records for st in r["steps"] if not st.get("reused")), step]
    record = measured(args, method, sparsity, seed, steps, out)
    record["members"] = [point_name(r["method"], r["target"], r["seed"]) for r in records]
    for key in ("training_tokens", "training_cpu_seconds"):
        record[key] = sum(r[key] for r in records)
    record["cpu_seconds"] = sum(r["cpu_seconds"] for r in records) + step["cpu_seconds"]
    return record


def measured(
    args: argparse.Namespace, method: str, sparsity: float, seed: int, steps: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    """A point's record: what made it (``steps``) and the evaluation of the model in ``folder``."""
    return {
        "method": method,
        "target": sparsity,
        "seed": seed,
        "eval_settings": eval_settings(args),
        "steps": steps,
        **evaluate(args, folder),
        "device": results_page.device_name(),
        "date": results_page.run_record()["date"],
    }


def run_point(
    args: argparse.Namespace, method: str, sparsity: float, seed: int, keep_model: bool = False
) -> dict[str, Any]:
    if soup_of(method):
        return soup_point(args, method, sparsity, seed)
    cmds, folder = commands(args, method, sparsity, seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    steps = []
    for i, command in enumerate(cmds):
        # Every export writes its report last of all, in one atomic folder; a sliced (structured) one has no masks.
        if command[1] == "oneshot" and (Path(command[3]) / "pruning_report.json").exists():
            steps.append({"command": shlex.join(command), "cpu_seconds": 0.0, "reused": True})
            continue  # made for another point (deterministic: same command, same model)
        steps.append(run_command(command, args.work_dir / f"{point_name(method, sparsity, seed)}.{i}.log"))
    record = measured(args, method, sparsity, seed, steps, folder)
    trained = [s for s in steps if s.get("steps")]
    record["training_tokens"] = sum(s["rollout_tokens"] + text_tokens(s["command"], s["steps"]) for s in trained)
    # One-shot CPU-s count only where the model was made; a reused one-shot model costs what its maker's row says.
    record["cpu_seconds"] = sum(s["cpu_seconds"] for s in steps)
    record["training_cpu_seconds"] = sum(s["cpu_seconds"] for s in trained)
    if trained and not (args.keep_models or keep_model) and folder != Path(MODEL):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return record


# --------------------------------------------------------------------------------------------------------------------
# Tables, headline, plot
# --------------------------------------------------------------------------------------------------------------------


def kept(record: dict[str, Any], dense: dict[str, Any]) -> dict[str, float]:
    """Arithmetic as a fraction of dense, per wording."""
    return {w: a / dense["arithmetic"][w] for w, a in record["arithmetic"].items() if dense["arithmetic"].get(w)}


def keeps_task(record: dict[str, Any], dense: dict[str, Any], keep: float, max_ppl: float) -> bool:
    ratios = kept(record, dense)
    return bool(ratios) and min(ratios.values()) >= keep and record["ppl"] / dense["ppl"] <= max_ppl


def headline(records: list[dict[str, Any]], dense: dict[str, Any], keep: float, max_ppl: float) -> dict[str, Any]:
    """Per method: the highest target sparsity kept, per seed, and the worst over seeds (``None``: none kept)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        per_seed = {}
        for seed in sorted({r["seed"] for r in mine}):
            ok = [r["target"] for r in mine if r["seed"] == seed and keeps_task(r, dense, keep, max_ppl)]
            per_seed[seed] = max(ok, default=None)
        values = list(per_seed.values())
        out[method] = {"per_seed": per_seed, "worst": None if None in values else min(values)}
    return out


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.mean(values):.0f} ± {statistics.stdev(values):.0f}"


def _kept_over_seeds(group: list[dict[str, Any]], dense: dict[str, Any], wording: str) -> str:
    # "-" where dense answered nothing in this wording: there is no ratio to average (as in the per-point table).
    values = [100 * ratios[wording] for ratios in (kept(r, dense) for r in group) if wording in ratios]
    return f"{_mean_sd(values)}%" if values else "-"


def render(args: argparse.Namespace, records: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    dense = records.get("dense")
    rows = sorted((r for k, r in records.items() if k != "dense"), key=lambda r: (r["method"], r["target"], r["seed"]))
    wordings = list(dense["arithmetic"]) if dense else list(args.wordings)
    n = dense["arithmetic_n"] if dense else "?"
    dates = [r["date"] for r in records.values()]
    devices = sorted({r["device"] for r in records.values()})
    head = headline(rows, dense, args.keep, args.max_ppl) if dense else {}
    budget = (
        f"model {MODEL} (float32); training runs: `{CONFIG}` (GRPO steps of one prompt x 8 completions, distillation "
        f"from the dense model on the rollouts and 2 x 128 text tokens a step; {MEASURED_STEPS} steps, or a method's "
        f"@STEPS, except `quickstart` at the config's own; `recipe`, `recipe-mixed`, `join`, "
        f"`wanda-trained`, `mama-trained` and `mama-reward` pin the data the config had when they were measured, "
        f"`arithmetic-easy` prompts and `python_docs` text, which their printed commands predate); evaluation: "
        f"LAMBADA {args.lambada} x 512 tokens, PIQA {args.piqa}, `{args.arithmetic_task}` test split ({n} problems) "
        f"in {', '.join(wordings)}"
    )
    lines = [
        "# The sparsity-quality frontier",
        "",
        results_page.page_header(
            generated_by="python scripts/frontier.py --tables-only",
            command=args.recorded_command,
            device=", ".join(devices) or None,
            date=results_page.date_span(dates),
            budget=budget,
        ).rstrip(),
        "",
    ]
    if dense:
        se = {w: math.sqrt(a * (1 - a) / n) for w, a in dense["arithmetic"].items()}
        lines += [
            f"Dense: LAMBADA perplexity {dense['ppl']:.2f}, PIQA {100 * dense['piqa']:.1f}%, arithmetic "
            + ", ".join(f"{w} {100 * a:.1f}%" for w, a in dense["arithmetic"].items())
            + f" ({n} problems; one standard error "
            + ", ".join(
                f"{100 * se[w]:.1f} points = {100 * se[w] / a:.0f}% of dense"
                for w, a in dense["arithmetic"].items()
                if a
            )
            + ").",
            "",
            f"Headline: the highest sparsity at which a model keeps at least {args.keep:.0%} of dense arithmetic in "
            f"every wording at no more than {args.max_ppl:g}x the dense perplexity (worst over seeds):",
            "",
            "| method | keep-task sparsity | per seed |",
            "| --- | ---: | --- |",
        ]
        for method, h in head.items():
            worst = "none kept" if h["worst"] is None else f"{h['worst']:.0%}"
            per_seed = ", ".join(f"seed {s}: {'-' if v is None else f'{v:.0%}'}" for s, v in h["per_seed"].items())
            lines.append(f"| {method} | {worst} | {per_seed} |")
        lines += [
            "",
            "Per point: ratios to dense (perplexity / dense; PIQA and arithmetic as % of dense); arithmetic per "
            "wording; tokens and CPU-seconds of training (user + system of `grpo-prune train`), of the whole point "
            "(one-shot included where this point made it) and of its evaluation; GRPO's medians over steps.",
            "",
            "| method | target | seed | sparsity | ppl | ppl / dense | PIQA % of dense | arithmetic % of dense ("
            + " / ".join(wordings)
            + ") | training tokens | training CPU-s | point CPU-s | eval CPU-s | frac_reward_zero_std | clipped_ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in [dense, *rows]:
            ratios = kept(r, dense)
            trained = [s for s in r["steps"] if s.get("steps")]
            zero_std = [s["frac_reward_zero_std"] for s in trained if s.get("frac_reward_zero_std") is not None]
            clipped = [s["clipped_ratio"] for s in trained if s.get("clipped_ratio") is not None]
            lines.append(
                f"| {r['method']} | {r['target']:.0%} | {r['seed']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | "
                f"{r['ppl'] / dense['ppl']:.2f}x | {100 * r['piqa'] / dense['piqa']:.0f}% | "
                + " / ".join(f"{100 * ratios[w]:.0f}%" if w in ratios else "-" for w in wordings)
                + f" | {r.get('training_tokens', 0):,} | {r.get('training_cpu_seconds', 0):.0f} | "
                f"{r.get('cpu_seconds', 0):.0f} | {r['eval_cpu_seconds']:.0f} | "
                + (f"{max(zero_std):.3f}" if zero_std else "-")  # a soup's: its worst member's
                + " | "
                + (f"{max(clipped):.3f}" if clipped else "-")
                + " |"
            )
        seeded = [m for m in head if len({r["seed"] for r in rows if r["method"] == m}) > 1]
        if seeded:
            lines += [
                "",
                "Over seeds (mean ± standard deviation):",
                "",
                "| method | target | seeds | ppl / dense | PIQA % of dense | arithmetic % of dense ("
                + " / ".join(wordings)
                + ") |",
                "| --- | ---: | ---: | ---: | ---: | --- |",
            ]
            for method in seeded:
                for target in sorted({r["target"] for r in rows if r["method"] == method}):
                    group = [r for r in rows if r["method"] == method and r["target"] == target]
                    ppl = [r["ppl"] / dense["ppl"] for r in group]
                    ppl_text = f"{statistics.mean(ppl):.2f}x" + (
                        f" ± {statistics.stdev(ppl):.2f}" if len(ppl) > 1 else ""
                    )
                    lines.append(
                        f"| {method} | {target:.0%} | {len(group)} | {ppl_text} | "
                        f"{_mean_sd([100 * r['piqa'] / dense['piqa'] for r in group])}% | "
                        + " / ".join(_kept_over_seeds(group, dense, w) for w in wordings)
                        + " |"
                    )
        lines += ["", "Commands of each point (run in the repository root):", ""]
        for r in rows:
            for s in r["steps"]:
                reused = " (reused: made by another point)" if s.get("reused") else ""
                lines.append(f"- {point_name(r['method'], r['target'], r['seed'])}: `{s['command']}`{reused}")
    missing = [point_name(*p) for p in plan(args) if point_name(*p) not in records]
    if missing:
        lines += ["", f"Planned but not measured: {', '.join(missing)}."]
    return "\n".join(lines) + "\n", head


def plot(args: argparse.Namespace, records: dict[str, dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", flush=True)
        return
    from grpo_prune import fileio

    dense = records["dense"]
    rows = [r for k, r in records.items() if k != "dense"]
    wordings = list(dense["arithmetic"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        targets = sorted({r["target"] for r in rows if r["method"] == method})
        ppl = [
            statistics.mean(r["ppl"] / dense["ppl"] for r in rows if r["method"] == method and r["target"] == t)
            for t in targets
        ]
        worst = [
            statistics.mean(
                100 * min(kept(r, dense).values(), default=math.nan)
                for r in rows
                if r["method"] == method and r["target"] == t
            )
            for t in targets
        ]
        xs = [100 * t for t in targets]
        axes[0].plot(xs, ppl, marker="o", label=method)
        axes[1].plot(xs, worst, marker="o", label=method)
    axes[0].axhline(args.max_ppl, color="grey", linestyle="--", linewidth=1)
    axes[0].set_ylabel("LAMBADA perplexity / dense")
    axes[0].set_yscale("log")
    axes[1].axhline(100 * args.keep, color="grey", linestyle="--", linewidth=1)
    axes[1].set_ylabel(f"arithmetic, % of dense (worst of {', '.join(wordings)})")
    for ax in axes:
        ax.set_xlabel("sparsity of the decoder linears (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{MODEL}: the sparsity-quality frontier (dashed: the headline's bounds; mean over seeds)")
    fig.tight_layout()
    try:
        fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)


def invocations(records: dict[str, dict[str, Any]]) -> str | None:
    """The commands that measured the points, each once, in the order of first use (several processes, e.g. one
    per method group, may fill one frontier)."""
    seen = dict.fromkeys(r["invocation"] for r in records.values() if r.get("invocation"))
    return "; ".join(seen) or None


def write(args: argparse.Namespace, records: dict[str, dict[str, Any]]) -> str:
    from grpo_prune.fileio import write_json_atomic, write_text_atomic

    args.recorded_command = invocations(records) or args.recorded_command

    text, head = render(args, records)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output_dir / "frontier.md", text)
    write_json_atomic(
        args.output_dir / "frontier.json",
        {"command": args.recorded_command, "headline": head, "points": records},
        default=str,
    )
    if "dense" in records and len(records) > 1:
        plot(args, records, args.output_dir / "frontier.png")
    return text


def load_points(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    records: dict[str, Any] = {}
    for path in sorted((args.output_dir / "points").glob("*.json")):
        record = json.loads(path.read_text())
        if record["eval_settings"] == eval_settings(args):
            records[path.stem] = record
        else:
            print(f"[ignored] {path}: measured with other evaluation settings", flush=True)
    previous = args.output_dir / "frontier.json"
    args.recorded_command = json.loads(previous.read_text()).get("command") if previous.exists() else None
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grpo_prune.evaluation.tasks import check_wordings
    from grpo_prune.fileio import write_json_atomic

    check_wordings(args.wordings)
    for s in args.sparsities:
        if not 0 < s < 1:
            raise SystemExit(f"--sparsities must be in (0, 1), got {s}")
    measured = load_points(args)
    if not args.tables_only:
        command = results_page.command_line(sys.argv[1:] if argv is None else argv, __file__)
        for method, sparsity, seed in plan(args):
            name = point_name(method, sparsity, seed)
            if name in measured:
                continue
            print(f"[run] {name}", flush=True)
            record = run_point(args, method, sparsity, seed)
            record["invocation"] = command  # the page lists every invocation that measured a point
            write_json_atomic(args.output_dir / "points" / f"{name}.json", record, default=str)
            print(
                f"[done] {name}: ppl {record['ppl']:.2f}, arithmetic "
                + json.dumps({w: round(a, 3) for w, a in record["arithmetic"].items()})
                + f", cpu {record['cpu_seconds']:.0f} + eval {record['eval_cpu_seconds']:.0f}",
                flush=True,
            )
            write(args, load_points(args))  # read again: a run beside this one may have added points
    print(write(args, load_points(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

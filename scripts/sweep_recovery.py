"""Sweep of the recovery defaults (issue 11): learning rate, schedule and the three distillation coefficients.

Every variant is one run of ``scripts/bench_quality.py`` with the benchmark's budget (20 GRPO steps x 8 completions,
4 x 256 tokens of plain text distilled per step, the same held-out evaluation) and one thing changed; it measures a
fixed set of conditions (``CONDITIONS``: the recovered rows of the three settings and the 50% pruned-during-training
row), each in its own folder ``OUTPUT_DIR/<variant>/``. Variants run as ``--jobs`` parallel processes; the dense
model is evaluated once and its result copied into every folder (its cache key does not depend on the budget).
``OUTPUT_DIR/sweep.md`` and ``sweep.json`` collect every finished condition, with tokens, training seconds and the
GRPO signal (``frac_reward_zero_std``, ``completions/clipped_ratio``) of each; ``--collect`` rebuilds them from the
folders alone (e.g. after ``--deadline`` stopped a run).

    OMP_NUM_THREADS=2 python scripts/sweep_recovery.py [--output-dir results/sweep] [--variants lr1e-4 lr3e-5]
        [--jobs 1] [--device cpu] [--deadline SECONDS] [--collect]

On this 2-core machine one condition takes 15-25 minutes, so a variant about 2 hours and the whole sweep a day; the
recorded sweep ran on one GPU (``--device cuda --jobs 13 --deadline 430``), where 13 variants at once finished two
conditions each in 7 minutes. Figures are comparable within a sweep,
not bit-identical to the CPU benchmark (other kernels, other sampling).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _results_page as results_page
import bench_quality as bq

HERE = Path(__file__).resolve().parent
BASE = ["--steps", "20"]

#: Conditions every variant measures, most informative first (a deadline cuts from the end).
CONDITIONS = [
    ("recovered", "unstructured-50", "wanda"),
    ("recovered", "2:4", "sparsegpt"),
    ("recovered", "mlp-25", "wanda"),
    ("recovered", "unstructured-50", "sparsegpt"),
    ("trained", "unstructured-50", "wanda"),
    ("trained", "unstructured-50", "mama"),  # mama(a=0.2, abs): a wanda / mama pair in every variant
]

MAMA_ALPHA, MAMA_STATISTIC = 0.2, "abs"  # the mama row of benchmark v2

#: Variant name -> (what it changes, bench_quality arguments beside BASE). "lr1e-4" is benchmark v2's budget.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "lr1e-4": ("lr 1e-4 (benchmark v2), text KD coef 1, rollout KD coef 1", ["--learning-rate", "1e-4"]),
    "lr3e-5": ("lr 3e-5", ["--learning-rate", "3e-5"]),
    "lr1e-5": ("lr 1e-5", ["--learning-rate", "1e-5"]),
    "lr3e-4": ("lr 3e-4", ["--learning-rate", "3e-4"]),
    "lr1e-4-text0": ("lr 1e-4, no text KD (rollouts only)", ["--learning-rate", "1e-4", "--text-windows", "0"]),
    "lr1e-4-text0.25": ("lr 1e-4, text KD coef 0.25", ["--learning-rate", "1e-4", "--text-coef", "0.25"]),
    "lr1e-4-roll0": ("lr 1e-4, no rollout KD (text only)", ["--learning-rate", "1e-4", "--distill-coef", "0"]),
    "lr1e-4-hidden1": ("lr 1e-4, hidden-state term coef 1", ["--learning-rate", "1e-4", "--hidden-coef", "1"]),
    "lr3e-5-hidden1": ("lr 3e-5, hidden-state term coef 1", ["--learning-rate", "3e-5", "--hidden-coef", "1"]),
    "lr1e-4-early": (
        "lr 1e-4, prune early (events at 2, 4, 6, 8), recover late; changes only the trained rows (recovered rows "
        "hold their one-shot masks from step 0, so they repeat lr1e-4's exactly)",
        ["--learning-rate", "1e-4", "--prune-start", "2", "--prune-end", "8", "--prune-every", "2"],
    ),
    "lr1e-4-seed1": ("lr 1e-4, training seed 1", ["--learning-rate", "1e-4", "--seed", "1"]),
    "lr3e-5-seed1": ("lr 3e-5, training seed 1", ["--learning-rate", "3e-5", "--seed", "1"]),
    "lr3e-5-early": (
        "lr 3e-5, prune early (events at 2, 4, 6, 8), recover late; changes only the trained rows",
        ["--learning-rate", "3e-5", "--prune-start", "2", "--prune-end", "8", "--prune-every", "2"],
    ),
}


def _scorer(name: str) -> bq.Scorer:
    """The row bench_quality makes of a scorer name with its default --mama-alpha / --mama-statistic."""
    return bq.Scorer("mama", MAMA_ALPHA, statistic=MAMA_STATISTIC) if name == "mama" else bq.Scorer(name)


def condition_args() -> list[str]:
    """bench_quality arguments selecting exactly ``CONDITIONS`` (no one-shot rows; the rest left out by --skip)."""
    settings = list(dict.fromkeys(s for _, s, _ in CONDITIONS))
    recovered = list(dict.fromkeys(c for m, _, c in CONDITIONS if m == "recovered"))
    trained = list(dict.fromkeys(c for m, _, c in CONDITIONS if m == "trained"))
    wanted = {bq.Condition(m, bq.SETTINGS[s], _scorer(c)).key for m, s, c in CONDITIONS}
    every = [
        bq.Condition(m, bq.SETTINGS[s], _scorer(c))
        for m, scorers in (("recovered", recovered), ("trained", trained))
        for s in settings
        for c in scorers
    ]
    skip = [c.key for c in every if c.key not in wanted and bq.unsupported(c.mode, c.setting, c.scorer) is None]
    mama = ["--mama-alpha", str(MAMA_ALPHA), "--mama-statistic", MAMA_STATISTIC]
    args = [
        *mama,
        "--settings",
        *settings,
        "--scorers",
        "--recovered-scorers",
        *recovered,
        "--trained-scorers",
        *trained,
    ]
    return args + (["--skip", *skip] if skip else [])


def bench_command(folder: Path, extra: list[str], args: argparse.Namespace) -> list[str]:
    base = ["--quick"] if args.quick else BASE
    script = [sys.executable, str(HERE / "bench_quality.py")]
    return [*script, "--output-dir", str(folder), "--device", args.device, *base, *extra]


def run_sweep(args: argparse.Namespace, names: list[str]) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.deadline if args.deadline else None
    # The dense model once: its cached result is valid in every variant's folder.
    dense_dir = out / "_dense"
    dense = [*bench_command(dense_dir, [], args), "--settings", "unstructured-50", "--scorers"]
    dense += ["--recovered-scorers", "--trained-scorers"]
    subprocess.run(dense, check=True, stdout=subprocess.DEVNULL)
    pending = list(names)
    running: dict[str, tuple[subprocess.Popen, Any]] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            folder = out / name
            (folder / "conditions").mkdir(parents=True, exist_ok=True)
            shutil.copy(dense_dir / "conditions" / "dense.json", folder / "conditions" / "dense.json")
            log = open(folder / "log.txt", "w")
            cmd = bench_command(folder, VARIANTS[name][1] + condition_args(), args)
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
            print(f"started {name}", file=sys.stderr, flush=True)
        time.sleep(2)
        for name, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                print(f"finished {name} (exit {proc.returncode})", file=sys.stderr, flush=True)
        if deadline is not None and time.monotonic() > deadline:
            for name, (proc, log) in running.items():
                proc.kill()
                proc.wait()
                log.close()
                print(f"stopped {name} at the deadline", file=sys.stderr, flush=True)
            print(f"not started (deadline): {', '.join(pending) or 'none'}", file=sys.stderr)
            break


def _row(variant: str, changes: str, r: dict[str, Any], dense: dict[str, Any] | None, mode: str) -> dict[str, Any]:
    """A table row of one cached bench_quality record (a one-shot record has no training figures: None)."""
    t = r.get("train", {})
    return {
        "variant": variant,
        "changes": changes,
        "key": r["key"],
        "mode": mode,
        "setting": r["setting"],
        "scorer": r["scorer"],
        "device": r.get("device", "cpu"),
        "sparsity": r.get("sparsity"),
        **{f"{k}_ratio": v for k, v in bq.ratios(r, dense).items()},
        **bq.headline(r),
        "tokens": t.get("tokens", {}).get("total"),
        "train_seconds": r.get("seconds", {}).get("train"),
        "cpu_seconds": t.get("cpu_seconds"),
        "frac_reward_zero_std_median": t.get("frac_reward_zero_std_median"),
        "clipped_ratio_median": t.get("clipped_ratio_median"),
        "mean_reward_last_quarter": t.get("mean_reward_last_quarter"),
        "finished_at": r.get("finished_at"),
        "budget": r.get("fingerprint", {}).get("budget"),
    }


def collect(out: Path) -> list[dict[str, Any]]:
    """One row per finished condition of every variant folder under ``out``."""
    rows = []
    for name, (what, _) in VARIANTS.items():
        folder = out / name / "conditions"
        if not folder.is_dir():
            continue
        dense = json.loads((folder / "dense.json").read_text()) if (folder / "dense.json").exists() else None
        for path in sorted(folder.glob("*.json")):
            r = json.loads(path.read_text())
            if r.get("mode") != "dense":
                rows.append(_row(name, what, r, dense, r["mode"]))
    return rows


def reference_rows(path: Path) -> list[dict[str, Any]]:
    """The one-shot starting points of ``CONDITIONS`` from a bench_quality ``quality.json`` (e.g. the committed
    ``results/quality``), as rows of variant ``one-shot``, one per (setting, scorer) under its first mode in
    ``CONDITIONS``; none if the file is missing."""
    if not path.exists():
        return []
    results = json.loads(path.read_text())["results"]
    rows, seen = [], set()
    for mode, setting, scorer in CONDITIONS:
        if (setting, scorer) in seen:
            continue
        seen.add((setting, scorer))
        r = results.get(bq.Condition("oneshot", bq.SETTINGS[setting], _scorer(scorer)).key)
        if r is not None and not r.get("error"):
            rows.append(_row("one-shot", f"the one-shot start, from {path}", r, results.get("dense"), mode))
    return rows


def page_header(rows: list[dict[str, Any]], run: dict[str, Any] | None, out: Path) -> str:
    """The page's generated header from the measured rows (not the one-shot starts): their devices, dates and
    training budgets, and the sweep's command when it was recorded in sweep.json."""
    budgets = [r["budget"] for r in rows if r.get("budget")]
    runs = results_page.tally(
        f"{b['steps']} GRPO steps x {b['completions']} completions x {b['tokens']} tokens" for b in budgets
    )
    text = results_page.tally(
        f"{b['text_windows']} x {b['text_length']}" if b.get("text_windows") else "no" for b in budgets
    )
    hours = sum(r["train_seconds"] or 0.0 for r in rows) / 3600
    budget = (
        f"{len(rows)} conditions in {len({r['variant'] for r in rows})} variants, {hours:.1f} h of training loops "
        f"in all; a training run: {runs or results_page.NOT_RECORDED}, tokens of text distilled per step: "
        f"{text or results_page.NOT_RECORDED} (each variant changes one thing, listed below)"
    )
    return results_page.page_header(
        generated_by=f"python scripts/sweep_recovery.py --collect --output-dir {out}",
        command=(run or {}).get("command"),
        device=results_page.tally(r["device"] for r in rows),
        date=results_page.date_span(r.get("finished_at") for r in rows),
        budget=budget,
    )


def markdown(rows: list[dict[str, Any]], header: str = "") -> str:
    order = {(m, s, _scorer(c).label): i for i, (m, s, c) in enumerate(CONDITIONS)}
    variant_rank = {name: i for i, name in enumerate(["one-shot", *VARIANTS])}
    rows = sorted(
        rows, key=lambda r: (order.get((r["mode"], r["setting"], r["scorer"]), 99), variant_rank[r["variant"]])
    )
    lines = [
        "# Recovery defaults sweep",
        "",
        *([header] if header else []),
        "Cells: LAMBADA perplexity / dense, PIQA acc_norm as % of dense, arithmetic test accuracy as % of dense "
        "(held-out; see results/quality for the evaluation), then the training run's tokens, wall seconds of its "
        "training loop, median `frac_reward_zero_std` and median `completions/clipped_ratio`.",
        "",
        "| condition | variant | ppl / dense | PIQA % | arith % | tokens | train s | zero-std | clipped | device |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} {r['setting']} {r['scorer']} | {r['variant']} | {bq._fmt_ratio(r['ppl_ratio'])} | "
            f"{bq._fmt(r['piqa_ratio'], '.0f', 100)} | {bq._fmt(r['arith_ratio'], '.0f', 100)} | "
            f"{r['tokens'] or '-'} | {bq._fmt(r['train_seconds'], '.0f')} | "
            f"{bq._fmt(r['frac_reward_zero_std_median'], '.2f')} | {bq._fmt(r['clipped_ratio_median'], '.2f')} | "
            f"{r['device']} |"
        )
    lines += ["", "Variants:", ""] + [f"- `{name}`: {what}" for name, (what, _) in VARIANTS.items()]
    summary = _variant_summary(rows)
    if summary:
        lines += ["", "Per variant, medians over the conditions it finished (ppl ratio, arithmetic % of dense):", ""]
        lines += [f"- `{n}`: {s}" for n, s in summary.items()]
    return "\n".join(lines) + "\n"


def _variant_summary(rows: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for name in VARIANTS:
        mine = [
            r for r in rows if r["variant"] == name and r["ppl_ratio"] is not None and r["arith_ratio"] is not None
        ]
        if mine:
            ppl = statistics.median(r["ppl_ratio"] for r in mine)
            arith = statistics.median(r["arith_ratio"] or 0.0 for r in mine)
            out[name] = f"{len(mine)} conditions, ppl {ppl:.2f}x, arithmetic {arith * 100:.0f}%"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="results/sweep")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {', '.join(VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (default 1)")
    parser.add_argument("--device", default="cpu", help="bench_quality --device (default cpu)")
    parser.add_argument("--deadline", type=float, help="seconds after which running variants are stopped")
    parser.add_argument("--collect", action="store_true", help="only rebuild sweep.md / sweep.json from the folders")
    parser.add_argument("--quick", action="store_true", help="smoke run: bench_quality --quick budgets (tiny)")
    parser.add_argument(
        "--reference",
        default="results/quality/quality.json",
        help="bench_quality results whose one-shot rows are shown as the starting points (default: the committed "
        "benchmark; rows of a missing file are left out)",
    )
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    out = Path(args.output_dir)
    previous = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else {}
    run = previous.get("run")  # --collect keeps the command of the run that measured
    if not args.collect:
        try:
            bq._check_device(args.device)
        except ValueError as err:
            parser.error(str(err))
        run = results_page.run_record(args.device, argv, __file__)
        run_sweep(args, args.variants)
    rows = collect(out)
    measured = {(r["mode"], r["setting"], r["scorer"]) for r in rows}
    starts = [r for r in reference_rows(Path(args.reference)) if (r["mode"], r["setting"], r["scorer"]) in measured]
    text = markdown(starts + rows, page_header(rows, run, out))
    payload = {"conditions": [list(c) for c in CONDITIONS], "rows": rows, **({"run": run} if run else {})}
    bq.write_json_atomic(out / "sweep.json", payload)
    results_page.write_page(out / "sweep.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

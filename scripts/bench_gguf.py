"""Tokens/s at batch 1 and file sizes of GGUF exports: dense SmolLM2-135M-Instruct and its MLP-pruned (structured,
sliced) exports, as llama.cpp runs them.

Each model is written with ``grpo-prune``'s GGUF writer (dense: :func:`grpo_prune.gguf_export.write_gguf`;
pruned: one-shot structured MLP pruning, wanda scores on calibration text, then
``export_pruned(..., gguf_type=...)``, the ``grpo-prune export --format gguf`` path). Each file then generates
``--new-tokens`` tokens greedily after a ``--prompt-tokens`` prompt, batch 1; ``--repeats`` timed runs per model
after one warm-up, interleaved across models (dense, 25%, 50%, dense, ...) so that a load change on a shared
machine hits every model alike; the median is reported and speed-ups are ratios of medians from this one run.

Backends (``--backend auto`` takes the first available):
    llama_cpp      llama-cpp-python (the llama.cpp library itself), if installed; ``n_threads`` = ``--threads``.
                   Decode tok/s = new tokens / wall time of the decoding loop (prefill timed apart).
    transformers   ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which dequantises to float32:
                   the file type then changes nothing but the load, so this measures the sliced architecture only.

Columns: model, GGUF type, parameters, file MiB, size ratio to dense, prefill tok/s, decode tok/s, decode speed-up.

Run:
    OMP_NUM_THREADS=1 python scripts/bench_gguf.py                       # Q8_0 and F16, llama.cpp if installed
    OMP_NUM_THREADS=1 python scripts/bench_gguf.py --types Q4_0 --repeats 3 --out results/gguf
Writes ``<out>/gguf_speed.md`` and ``gguf_speed.json`` with a header (command, device, date, backend).
llama-cpp-python is not a dependency of grpo-prune: ``pip install llama-cpp-python`` (compiles llama.cpp).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_name(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "transformers"
    return "llama_cpp"


class LlamaCppRunner:
    def __init__(self, path: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0
        )

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds for exactly ``new_tokens`` greedy tokens)."""
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(llm.scores[llm.n_tokens - 1].argmax())  # greedy; EOS is just another token here
            llm.eval([token])
        return prefill, time.perf_counter() - start


class TransformersRunner:
    def __init__(self, path: Path, threads: int, context: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        import torch

        ids = torch.tensor([prompt])
        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - start
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = self.model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return prefill, time.perf_counter() - start


def build_files(folder: Path, sparsities: list[float], types: list[str], calibration_windows: int) -> list[dict]:
    """GGUF files of the dense model and each MLP sparsity, in each type; returns their descriptions."""
    import copy

    from grpo_prune import export_pruned, prune_oneshot
    from grpo_prune.gguf_export import write_gguf
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.oneshot_cli import calibration_windows as windows

    dense = load_model(MODEL)
    tokenizer = load_tokenizer(MODEL)
    calibration = windows(tokenizer, "python_docs", calibration_windows, 256)
    rows = []
    for sparsity in [0.0, *sparsities]:
        model = copy.deepcopy(dense)
        report = None
        if sparsity:
            report = prune_oneshot(
                model, sparsity, "structured", scorer="wanda", structured_units="mlp", calibration=[calibration]
            )
        for gguf_type in types:
            name = f"mlp{int(round(sparsity * 100))}-{gguf_type}" if sparsity else f"dense-{gguf_type}"
            if report is None:
                path = folder / f"{name}.gguf"
                write_gguf(model, path, tokenizer=tokenizer, gguf_type=gguf_type, name=MODEL)
                params = sum(p.numel() for p in model.parameters())
            else:
                out = export_pruned(model, folder / name, pruner=report, tokenizer=tokenizer, gguf_type=gguf_type)
                path = folder / name / out["gguf"]["file"]
                params = out["params_after"]
            rows.append(
                {
                    "model": f"MLP {sparsity:.0%} removed" if sparsity else "dense",
                    "sparsity": sparsity,
                    "gguf_type": gguf_type,
                    "params": params,
                    "file_bytes": path.stat().st_size,
                    "path": str(path),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--types", nargs="+", default=["Q8_0", "F16"], help="GGUF types (default Q8_0 F16)")
    parser.add_argument("--backend", choices=("auto", "llama_cpp", "transformers"), default="auto")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--keep", help="folder for the GGUF files (default: a temporary one)")
    parser.add_argument("--out", default="results/gguf", help="folder for gguf_speed.md / .json ('' to skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    backend = backend_name(args.backend)
    runner_cls = LlamaCppRunner if backend == "llama_cpp" else TransformersRunner

    tmp = tempfile.TemporaryDirectory(prefix="bench-gguf-") if not args.keep else None
    folder = Path(args.keep or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    rows = build_files(folder, args.sparsities, args.types, args.calibration_windows)

    from grpo_prune.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    import pydoc_data.topics

    text = pydoc_data.topics.topics[sorted(pydoc_data.topics.topics)[-1]]
    prompt = tokenizer(text)["input_ids"][: args.prompt_tokens]
    context = args.prompt_tokens + args.new_tokens + 8
    load_start = {}
    runners = {}
    for i, row in enumerate(rows):
        load_start[i] = time.perf_counter()
        runners[i] = runner_cls(Path(row["path"]), args.threads, context)
        row["load_s"] = time.perf_counter() - load_start[i]
    loadavg_start = os.getloadavg()
    names = list(runners)
    for i in names:  # warm-up
        runners[i].run(prompt, args.new_tokens)
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in names}
    for r in range(args.repeats):
        for i in names[r % len(names) :] + names[: r % len(names)]:
            times[i].append(runners[i].run(prompt, args.new_tokens))
    loadavg_end = os.getloadavg()

    for i, row in enumerate(rows):
        prefill = statistics.median(t[0] for t in times[i])
        decode = statistics.median(t[1] for t in times[i])
        row.update(
            prefill_tok_s=args.prompt_tokens / prefill,
            decode_tok_s=args.new_tokens / decode,
            decode_s_all=[t[1] for t in times[i]],
        )
    for row in rows:
        base = next(r for r in rows if r["sparsity"] == 0 and r["gguf_type"] == row["gguf_type"])
        row["size_ratio"] = row["file_bytes"] / base["file_bytes"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]

    version = ""
    if backend == "llama_cpp":
        import llama_cpp

        version = f"llama-cpp-python {llama_cpp.__version__}"
    else:
        import transformers

        version = f"transformers {transformers.__version__} (GGUF dequantised to float32)"
    header = [
        f"command: `{' '.join(['OMP_NUM_THREADS=' + os.environ['OMP_NUM_THREADS'], 'python', *map(shlex.quote, sys.argv)])}`",
        f"device: {cpu_name()}, {os.cpu_count()} CPU cores, {args.threads} thread(s); "
        f"load average {loadavg_start[0]:.2f} at the start, {loadavg_end[0]:.2f} at the end",
        f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"budget: {version}; batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} greedy tokens, "
        f"median of {args.repeats} interleaved runs after a warm-up",
        f"model: {MODEL}; MLP neurons removed one-shot (structured, wanda, {args.calibration_windows} x 256 tokens "
        "of the Python docs), sliced exports",
    ]
    table = [
        "| model | GGUF type | params | file MiB | size vs dense | prefill tok/s | decode tok/s | decode speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["gguf_type"], r["sparsity"])):
        table.append(
            f"| {row['model']} | {row['gguf_type']} | {row['params'] / 1e6:.1f}M | {row['file_bytes'] / 2**20:.1f} | "
            f"{row['size_ratio']:.2f}x | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
            f"{row['decode_speedup']:.2f}x |"
        )
    text_out = "\n".join(["# GGUF exports: size and batch-1 speed", "", *(f"- {h}" for h in header), "", *table])
    print(text_out)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gguf_speed.md").write_text(
            "<!-- generated by scripts/bench_gguf.py; do not edit by hand -->\n" + text_out + "\n"
        )
        for row in rows:
            row["path"] = Path(row["path"]).name
        (out / "gguf_speed.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

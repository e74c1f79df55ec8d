"""Peak memory of one OBS reconstruction at a training-time prune event, before and after bounding its temporaries.

At a ``prune_scorer: sparsegpt`` event each target layer is reconstructed from its Gram matrix: the pruner reduces
and normalises the matrix (``Indicators.reduced_hessian``), then ``sparsegpt_prune_`` factorises it in fp64 and
runs the OBS updates. Issue 19 item 8: the factorisation held five fp64 ``[in, in]`` matrices at once (the fp64
copy, an identity, the damped sum, the factor, the inverse): about 8 GB at ``in`` = 14336 (Llama-3-8B's
``down_proj``), in the middle of training. It now holds two.

"Before" is the code of commit ``BEFORE_COMMIT`` (read with ``git show``), "after" the working tree. The peak is of
torch's CPU allocator over the call (profiler memory events), inputs excluded; both run on the same inputs in one
process and must give the same masks and weights.

    OMP_NUM_THREADS=1 python scripts/measure_sparsegpt_memory.py [--sizes 2048 4096] [--rows 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEFORE_COMMIT = "0b6f7d2"  # the last commit before the temporaries were bounded
EXTRAPOLATE_TO = 14336  # Llama-3-8B's intermediate size: down_proj's input


def load_old_sparsegpt():
    """The module ``grpo_prune/pruning/sparsegpt.py`` as it was at ``BEFORE_COMMIT``."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:grpo_prune/pruning/sparsegpt.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "sparsegpt_before.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("sparsegpt_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_bytes(fn) -> tuple[int, float, object]:
    """(peak bytes allocated by torch on the CPU while ``fn()`` runs, seconds, its result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(os.path.join(folder, "trace.json"))
        with open(os.path.join(folder, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals + [0]), seconds, result


def layer_inputs(d_in: int, rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A weight ``[rows, d_in]`` and the Gram sum ``X^T X`` of correlated inputs (rank d_in / 2 plus noise, unequal
    scales, as LM hidden states), with its token count."""
    g = torch.Generator().manual_seed(seed)
    tokens = d_in + 512
    latent = torch.randn(tokens, d_in // 2, generator=g) @ torch.randn(d_in // 2, d_in, generator=g) / d_in**0.5
    x = (latent + 0.5 * torch.randn(tokens, d_in, generator=g)) * (0.2 + 3 * torch.rand(d_in, generator=g))
    return torch.randn(rows, d_in, generator=g), x.T @ x, tokens


def measure(d_in: int, rows: int, old) -> list[dict]:
    from grpo_prune.pruning import sparsegpt as new
    from grpo_prune.pruning.indicators import Indicators

    weight, gram, tokens = layer_inputs(d_in, rows)
    acc = SimpleNamespace(gram=lambda name: gram, tokens=lambda name: tokens)
    holder = SimpleNamespace(gram=acc, _reduce_fn=None)

    def event_before():
        hessian = (gram.clone() / torch.tensor([float(tokens)]).clamp_min(1)).to(torch.float32)  # as at 0b6f7d2
        w = weight.clone()
        return old.sparsegpt_prune_(w, hessian, 0.5), w

    def event_after():
        hessian = Indicators.reduced_hessian(holder, "layer")
        w = weight.clone()
        return new.sparsegpt_prune_(w, hessian, 0.5), w

    hessian = gram / tokens
    dead = torch.diagonal(hessian) == 0
    cases = [
        ("factorisation (H -> U)", lambda: old._inverse_cholesky_upper(hessian, 0.01)),
        ("factorisation (H -> U)", lambda: new._inverse_cholesky_upper(hessian, 0.01, dead)),
        (f"whole layer ({rows} rows)", event_before),
        (f"whole layer ({rows} rows)", event_after),
    ]
    out, results = [], []
    for i, (what, fn) in enumerate(cases):
        peak, seconds, result = peak_bytes(fn)
        results.append(result)
        weight_bytes = rows * d_in * 4  # the layer's own fp32 work copy, the same in both
        out.append(
            dict(
                what=what,
                code="before" if i % 2 == 0 else "after",
                d_in=d_in,
                peak_gb=peak / 1e9,
                fp64_matrices=(peak - (weight_bytes * 2 if "layer" in what else 0)) / (8 * d_in * d_in),
                at_14336_gb=(peak - (weight_bytes * 2 if "layer" in what else 0))
                / (d_in * d_in)
                * EXTRAPOLATE_TO**2
                / 1e9,
                seconds=seconds,
            )
        )
    same_u = torch.equal(results[0], results[1])
    same_layer = torch.equal(results[2][0], results[3][0]) and torch.equal(results[2][1], results[3][1])
    for row in out:
        row["identical"] = same_u if "factorisation" in row["what"] else same_layer
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| step | code | in | peak (GB) | in units of one fp64 [in, in] | at in = 14336 (GB) | seconds | same result |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['code']} | {r['d_in']} | {r['peak_gb']:.3f} | {r['fp64_matrices']:.2f} | "
            f"{r['at_14336_gb']:.1f} | {r['seconds']:.2f} | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="input widths `in` to measure")
    parser.add_argument("--rows", type=int, default=256, help="output rows of the measured layer")
    parser.add_argument("--out", default=None, help="write the table (markdown) here too")
    args = parser.parse_args(argv)
    old = load_old_sparsegpt()
    rows = [r for d_in in args.sizes for r in measure(d_in, args.rows, old)]
    command = "OMP_NUM_THREADS={} python scripts/measure_sparsegpt_memory.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    header = (
        "# OBS reconstruction at a prune event: peak memory before and after bounding the fp64 temporaries\n\n"
        f"- command: `{command}`\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)\n- before: commit {BEFORE_COMMIT}; after: the working tree\n"
        "- peak: torch's CPU allocator over the call (profiler memory events), inputs excluded. The fp64-matrix "
        "column and the 14336 extrapolation leave out the layer's two fp32 [rows, in] weight copies "
        "(the same before and after).\n\n"
    )
    text = header + table(rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

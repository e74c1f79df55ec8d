"""Generation speed of exported structured-pruned models against the dense SmolLM2-135M-Instruct.

For each MLP-neuron sparsity (default 25% and 50%), the dense model is pruned one-shot with activation-aware
structured scores (``prune_oneshot(..., granularity="structured", scorer="magnitude")``: weight norm of each neuron
times the RMS of its activation over calibration text), exported with :func:`grpo_prune.export_pruned` (a
physically smaller vanilla Llama checkpoint) and reloaded with plain ``AutoModelForCausalLM.from_pretrained``.
Each model then generates ``--new-tokens`` tokens greedily (exactly that many: EOS is suppressed) for batches of
same-length prompts; the median of ``--repeats`` timed runs (after one warm-up) is reported. The models' runs are
interleaved (dense, 25%, 50%, dense, ...), so that on a shared machine a change of load hits every model alike.

Columns:
    tok/s          generated tokens per second (batch * new tokens / median wall time of one ``generate`` call)
    latency_s      median wall time of one ``generate`` call (prefill + all decoding steps)
    ms/tok         latency_s / new tokens (per decoding step, prefill included)
    speedup        dense latency / this model's latency, same batch size
    ideal          dense FLOPs / this model's FLOPs per generated token: 2 * (weights of every nn.Linear, lm_head
                   included) + 4 * layers * heads * head_dim * context (attention scores and values) at the mean
                   context of the run; what a compute-bound run would gain
    achieved/ideal speedup / ideal (1.00: the whole FLOP reduction became speed)
    ppl            perplexity on held-out text (quality context for the speed, not a quality benchmark)

Text comes from the stdlib's Python documentation topics (``pydoc_data.topics``), as in
``scripts/measure_mama_normalisation.py``: the first half calibrates, the second half gives prompts and perplexity.
Pruning and the export check (max |logit difference| between the masked model and the exported one) run on the
CPU in float32; the timed models are loaded in ``--dtype`` on ``--device``.

Run:
    OMP_NUM_THREADS=2 python scripts/bench_speed.py [--json speed.json]          # CPU, float32 (minutes)
    python scripts/bench_speed.py --device cuda --dtype bfloat16 --json speed_gpu.json
The first use of the embedded model converts its GGUF once (~30 s). ``--keep DIR`` keeps the exports and
``--keep DIR --reuse`` times them again without re-pruning. On a shared CPU, batch-1 decoding with 2 OpenMP threads
is dominated by thread synchronisation whenever another process holds a core (each tiny matmul waits for the
descheduled thread): check ``loadavg_start`` in the JSON, and compare with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from measure_mama_normalisation import text_windows  # same folder: run as `python scripts/bench_speed.py`
from torch import nn

from grpo_prune import export_pruned, prune_oneshot
from grpo_prune.models import load_model, load_tokenizer, resolve_model_path

MODEL = "smollm2-135m-instruct"


def flops_per_token(model: nn.Module, context: float) -> float:
    """Forward FLOPs of one generated token at ``context`` cached positions: 2 per linear weight (lm_head
    included, counted even when tied to the embeddings, since the matmul is done) plus the attention
    ``q @ k^T`` and ``p @ v`` products, 2 * 2 * heads * head_dim * context per layer."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 2.0 * linear + attention


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch].to(device)
        loss = model(ids, labels=ids, use_cache=False).loss.float()
        n = ids.numel() - ids.shape[0]
        nll += loss.item() * n
        count += n
    return math.exp(nll / count)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate_kwargs(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    return dict(
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # suppresses EOS: every model does the same amount of work
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else model.config.pad_token_id,
    )


@torch.no_grad()
def time_generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of one greedy ``generate`` call of exactly ``new_tokens`` tokens for ``prompts`` ``[B, T]``."""
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    kwargs = _generate_kwargs(model, prompts, new_tokens)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(prompts, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return seconds


def time_interleaved(
    models: dict[str, nn.Module], prompts: torch.Tensor, new_tokens: int, repeats: int
) -> dict[str, list[float]]:
    """``repeats`` timed runs per model after one warm-up each, interleaved (dense, 25%, 50%, dense, ...) with the
    order rotated every round, so that a machine whose load drifts slows every model alike rather than one."""
    names = list(models)
    for name in names:  # warm-up: allocators, kernels, caches
        time_generate(models[name], prompts, new_tokens)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_generate(models[name], prompts, new_tokens))
    return times


def prune_and_export(
    sparsity: float, calibration: torch.Tensor, check: torch.Tensor, out_dir: Path, tokenizer: Any, scorer: str
) -> dict[str, Any]:
    """One-shot structured MLP pruning of a fresh dense copy (fp32, CPU), exported to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    model = load_model(MODEL).eval()
    # logits_to_keep=1: the scores need the decoder's activations only, not 49k-way logits at every position.
    batches = [{"input_ids": b, "logits_to_keep": 1} for b in calibration.split(4)]
    start = time.perf_counter()
    pruned = prune_oneshot(model, sparsity, "structured", scorer=scorer, calibration=batches, structured_units="mlp")
    prune_s = time.perf_counter() - start
    with torch.no_grad():
        masked = model(check).logits
    report = export_pruned(model, out_dir, pruner=pruned, tokenizer=tokenizer)  # the PruneReport carries the masks
    exported = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        diff = (exported(check).logits - masked).abs().max().item()
    return {"report": report, "prune_seconds": prune_s, "max_abs_logit_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.25, 0.5], help="MLP neuron fractions")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (all prompts the same length)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median reported)")
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows of --seq tokens")
    parser.add_argument("--eval-windows", type=int, default=8, help="perplexity windows (0: skip)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--scorer", default="magnitude", help="structured scorer (activation-aware magnitude)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", type=Path, help="write the rows and the setup here")
    parser.add_argument("--keep", type=Path, help="keep the exported models in this folder (default: temporary)")
    parser.add_argument("--reuse", action="store_true", help="with --keep: time the exports already there")
    args = parser.parse_args()

    device = torch.device(args.device)
    tokenizer = load_tokenizer(MODEL)
    calibration, held_out = text_windows(tokenizer, args.seq, args.calib_windows, max(args.eval_windows, 1))
    max_batch = max(args.batch_sizes)
    prompt_pool = held_out[:, : args.prompt_len]
    if prompt_pool.shape[0] < max_batch:  # more prompts from later offsets of the same windows
        extra = held_out[:, args.prompt_len : 2 * args.prompt_len]
        prompt_pool = torch.cat([prompt_pool, extra])[:max_batch]
    context = args.prompt_len + args.new_tokens / 2
    setup = {
        "model": MODEL,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "repeats": args.repeats,
        "scorer": args.scorer,
        "loadavg_start": os.getloadavg(),  # 1/5/15-minute load: a shared machine skews absolute figures
    }
    print(json.dumps(setup))

    from transformers import AutoModelForCausalLM

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_speed-"))
    models: list[tuple[str, Path, dict[str, Any]]] = [("dense", Path(resolve_model_path(MODEL)), {})]
    check = held_out[:2, :64]
    for s in args.sparsities:
        name = f"mlp-{round(s * 100)}%"
        if args.reuse and (work / name / "pruning_report.json").is_file():
            models.append((name, work / name, {"reused": True}))
            continue
        info = prune_and_export(s, calibration, check, work / name, tokenizer, args.scorer)
        print(
            f"{name}: pruned in {info['prune_seconds']:.1f} s, exported {info['report']['params_after'] / 1e6:.1f}M "
            f"params, max |logits(exported) - logits(masked)| = {info['max_abs_logit_diff']:.2e}"
        )
        models.append((name, work / name, info))

    loaded = {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(device).eval()
        for name, path, _ in models
    }
    infos = {name: info for name, _, info in models}
    flops = {name: flops_per_token(m, context) for name, m in loaded.items()}
    ppl = {name: perplexity(m, held_out) if args.eval_windows else None for name, m in loaded.items()}
    rows = []
    for batch in args.batch_sizes:
        times = time_interleaved(loaded, prompt_pool[:batch], args.new_tokens, args.repeats)
        dense_latency = statistics.median(times["dense"])
        for name, model in loaded.items():
            latency = statistics.median(times[name])
            speedup, ideal = dense_latency / latency, flops["dense"] / flops[name]
            rows.append(
                {
                    "model": name,
                    "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
                    "intermediate_size": model.config.intermediate_size,
                    "batch": batch,
                    "tokens_per_s": batch * args.new_tokens / latency,
                    "latency_s": latency,
                    "ms_per_token": 1000 * latency / args.new_tokens,
                    "speedup": speedup,
                    "ideal_speedup": ideal,
                    "achieved_over_ideal": speedup / ideal,
                    "ppl": ppl[name],
                    "times_s": times[name],
                    "max_abs_logit_diff": infos[name].get("max_abs_logit_diff"),
                }
            )
            print(f"  {name} batch {batch}: {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    setup["loadavg_end"] = os.getloadavg()

    header = "| model | params | I | batch | tok/s | latency_s | ms/tok | speedup | ideal | achieved/ideal | ppl |"
    print()
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        ppl = f"{r['ppl']:.1f}" if r["ppl"] is not None else "-"
        print(
            f"| {r['model']} | {r['params_M']:.1f}M | {r['intermediate_size']} | {r['batch']} | "
            f"{r['tokens_per_s']:.1f} | {r['latency_s']:.3f} | {r['ms_per_token']:.1f} | {r['speedup']:.2f}x | "
            f"{r['ideal_speedup']:.2f}x | {r['achieved_over_ideal']:.2f} | {ppl} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

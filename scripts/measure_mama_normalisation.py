"""Measure which per-layer normalisation MAMA should use by default: "rank" or "zscore".

One-shot 50% unstructured pruning of the embedded SmolLM2-135M-Instruct, no recovery, perplexity on held-out text.
Movement is the first-order Taylor term of the LM loss, ``-(grad * W)``, summed over the calibration windows (the
one-shot stand-in for the reward-weighted movement accumulated during GRPO). Baselines (magnitude, Wanda, movement)
are printed for scale. All indicators are gathered once on the dense model and reused for every configuration, so
the configurations differ only in how the scores are combined.

Text comes from an installed package, never the network: the Python documentation topics shipped in the stdlib
(``pydoc_data.topics``); the first half of the text calibrates, the second half evaluates.

Run (about 5-10 minutes on 2 CPU cores):
    OMP_NUM_THREADS=2 python scripts/measure_mama_normalisation.py [--windows 8] [--eval-windows 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from grpo_prune.models import load_model, load_tokenizer
from grpo_prune.pruning.pruner import Pruner, PruningSettings


def text_windows(tokenizer, seq: int, n_calib: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows ``[n, seq]`` from the first (calibration) and second (evaluation) half of the stdlib docs."""
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    half = len(text) // 2
    out = []
    for part, n in ((text[:half], n_calib), (text[half:], n_eval)):
        ids = tokenizer(part, return_tensors="pt").input_ids[0]
        if ids.numel() < n * seq:
            raise SystemExit(f"not enough text for {n} windows of {seq} tokens ({ids.numel()} tokens)")
        stride = ids.numel() // n  # spread windows over the whole half
        out.append(torch.stack([ids[i * stride : i * stride + seq] for i in range(n)]))
    return out[0], out[1]


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch]
        loss = model(ids, labels=ids, use_cache=False).loss
        n = ids.numel() - ids.shape[0]
        nll += loss.item() * n
        count += n
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="calibration windows")
    parser.add_argument("--eval-windows", type=int, default=8, help="evaluation windows")
    parser.add_argument("--seq", type=int, default=256, help="tokens per window")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument(
        "--baselines", nargs="*", default=["magnitude", "wanda", "movement"], help="baseline scorers to include"
    )
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    t0 = time.time()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct")
    model.eval()
    calib, held_out = text_windows(tokenizer, args.seq, args.windows, args.eval_windows)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense_ppl = perplexity(model, held_out)
    print(f"dense perplexity {dense_ppl:.3f}  ({time.time() - t0:.0f}s)", flush=True)

    # Gather every indicator once: |W0|, activation statistics and LM-loss movement.
    base = PruningSettings(target_sparsity=args.sparsity, scorer="mama", schedule="oneshot", track_activations=True)
    collector = Pruner(model, base)
    print("indicator memory (bytes):", json.dumps(collector.memory_bytes()), flush=True)
    collector.attach_hooks()
    for i in range(0, len(calib), 2):
        ids = calib[i : i + 2]
        model(ids, labels=ids, use_cache=False).loss.backward()
    collector.remove_hooks()
    collector.accumulate_movement_()
    model.zero_grad(set_to_none=True)
    indicators = {k: v.clone() for k, v in collector.state_dict().items()}
    print(f"indicators gathered ({time.time() - t0:.0f}s)", flush=True)

    configs: list[tuple[str, dict]] = [(name, {"scorer": name}) for name in args.baselines]
    for alpha in args.alphas:
        for norm in ("rank", "zscore"):
            configs.append((f"mama a={alpha} {norm}", {"alpha": alpha, "normalization": norm}))
            configs.append((f"mama a={alpha} {norm} +act", {"alpha": alpha, "normalization": norm, "act": True}))

    results = {"dense": dense_ppl}
    for label, cfg in configs:
        model.load_state_dict(dense_state)
        settings = PruningSettings(
            target_sparsity=args.sparsity,
            scorer=cfg.get("scorer", "mama"),
            alpha=cfg.get("alpha", 0.5),
            normalization=cfg.get("normalization", "rank"),
            schedule="oneshot",
            # Without activations MAMA's pretrained term is plain |W0|; with them it is Wanda's |W0| * ||x||.
            track_activations=bool(cfg.get("act")) or cfg.get("scorer") == "wanda",
        )
        pruner = Pruner(model, settings)
        pruner.load_state_dict({k: v for k, v in indicators.items() if k in pruner.state_dict()})
        pruner.prune_to(args.sparsity)
        ppl = perplexity(model, held_out)
        results[label] = ppl
        print(f"{label:28s} ppl {ppl:10.3f}  ratio {ppl / dense_ppl:8.2f}x  ({time.time() - t0:.0f}s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "perplexity": results}, f, indent=2)


if __name__ == "__main__":
    main()

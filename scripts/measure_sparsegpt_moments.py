"""Adam's first moment at a training-time sparsegpt event: reset it on the reconstructed rows, or keep it?

At a ``prune_scorer: sparsegpt`` event OBS rewrites the kept weights of every row that loses entries, so that the
layer's output on the inputs seen so far stays close to the dense one. Adam's moments were built for the weights
before that rewrite. Issue 19 item 8 asks which is better: keep them (what the pruner did), or zero ``exp_avg`` of
the reconstructed rows (momentum accumulated before the reconstruction no longer points anywhere useful, and may
push the compensation back). ``exp_avg_sq`` is kept in both: zeroing it makes Adam's next steps about
``1 / sqrt(1 - beta2)`` times larger.

The run, per seed, same budget for both variants (pure torch, the pruner's own API as the trainer drives it):

1. pretrain a tiny Llama (hidden 64, MLP 256, 2 layers, 64-token vocabulary) on a noisy pattern language
   (arithmetic progressions of token ids, 10% random tokens) for ``--pretrain-steps`` AdamW steps: the "model";
2. train it on for ``--steps`` steps with a fresh AdamW (as a trainer would) while a
   :class:`~grpo_prune.pruning.pruner.Pruner` with ``scorer='sparsegpt'`` prunes it on a cubic schedule to
   ``--sparsity`` (Gram matrices from the training forwards, masks enforced, pruned entries' optimizer state
   zeroed), next-token loss (a stand-in for the GRPO + distillation loss; what is measured is the optimizer's
   interplay with the reconstruction);
3. at each event, variant ``reset`` zeroes ``exp_avg`` of every row that the event reconstructed (rows that lost
   an entry); variant ``keep`` leaves it.

Reported: the mean training loss over the ``--window`` steps after each event, and held-out perplexity (fixed
batches from other seeds) just after the last event and at the end.

    OMP_NUM_THREADS=1 python scripts/measure_sparsegpt_moments.py [--seeds 0 1 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("keep", "reset")


def pattern_batch(seed: int, batch: int = 16, length: int = 48, noise: float = 0.1) -> torch.Tensor:
    """Arithmetic progressions of token ids (start and step per row) with a fraction of random tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 61, (batch, 1), generator=g)
    step = torch.randint(1, 8, (batch, 1), generator=g)
    ids = (start + step * torch.arange(length)) % 61 + 3
    random = torch.randint(3, 64, ids.shape, generator=g)
    return torch.where(torch.rand(ids.shape, generator=g) < noise, random, ids)


def build_model(seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def pretrain(seed: int, steps: int, lr: float):
    model = build_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for i in range(steps):
        ids = pattern_batch(10_000 * (seed + 1) + i)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@torch.no_grad()
def heldout_perplexity(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    losses = [float(model(input_ids=ids, labels=ids).loss) for ids in batches]
    model.train()
    return float(torch.tensor(losses).mean().exp())


@torch.no_grad()
def reset_first_moment_(optimizer: torch.optim.Optimizer, targets: dict, rows: dict[str, torch.Tensor]) -> int:
    """Zero ``exp_avg`` of the given rows of each target; returns the number of rows reset."""
    count = 0
    for name, mod in targets.items():
        state = optimizer.state.get(mod.weight)
        if state and "exp_avg" in state and name in rows:
            state["exp_avg"][rows[name]] = 0.0
            count += int(rows[name].sum())
    return count


def train_with_events(pretrained, variant: str, seed: int, args, heldout: list[torch.Tensor]) -> dict:
    import copy

    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    model = copy.deepcopy(pretrained).train()
    settings = PruningSettings(
        scorer="sparsegpt",
        schedule="cubic",
        target_sparsity=args.sparsity,
        start_step=args.start,
        end_step=args.end,
        every=args.every,
    )
    pruner = Pruner(model, settings)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    losses: list[float] = []
    events: list[int] = []
    reset_rows = 0
    ppl_after_last_event = None
    for step in range(1, args.steps + 1):
        ids = pattern_batch(20_000 * (seed + 1) + step)
        pruner.attach_hooks()
        loss = model(input_ids=ids, labels=ids).loss
        pruner.remove_hooks()
        opt.zero_grad()
        loss.backward()
        pruner.mask_gradients_()
        opt.step()
        pruner.apply_masks_()
        losses.append(float(loss.detach()))
        before = {n: m.clone() for n, m in pruner.masks.items()}
        with torch.random.fork_rng():  # the event draws nothing, but keep both variants' streams identical anyway
            event = pruner.maybe_prune(step)
        if event is not None:
            events.append(step)
            pruner.mask_optimizer_state_(opt)
            if variant == "reset":
                rows = {n: (before[n] & ~m).any(1) for n, m in pruner.masks.items()}
                reset_rows += reset_first_moment_(opt, pruner.targets, rows)
            if pruner.reached_target:
                ppl_after_last_event = heldout_perplexity(model, heldout)
    window = [sum(losses[e : e + args.window]) / len(losses[e : e + args.window]) for e in events if e < len(losses)]
    return {
        "variant": variant,
        "seed": seed,
        "events": events,
        "sparsity": pruner.sparsity(),
        "loss_after_events": window,
        "mean_loss_after_events": sum(window) / len(window),
        "ppl_after_last_event": ppl_after_last_event,
        "ppl_final": heldout_perplexity(model, heldout),
        "rows_reset": reset_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=80, help="training steps with pruning (same for both variants)")
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--start", type=int, default=10, help="first prune event (step)")
    parser.add_argument("--end", type=int, default=40, help="last prune event (step)")
    parser.add_argument("--every", type=int, default=10, help="steps between events")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--window", type=int, default=5, help="steps after each event whose loss is averaged")
    parser.add_argument("--out", default=None, help="folder for moments_lr<lr>_s<sparsity>.md / .json")
    args = parser.parse_args(argv)

    start = time.process_time()
    heldout = [pattern_batch(seed) for seed in range(900, 904)]
    runs = []
    dense = {}
    for seed in args.seeds:
        pretrained = pretrain(seed, args.pretrain_steps, args.lr)
        dense[seed] = heldout_perplexity(pretrained, heldout)
        for variant in VARIANTS:
            runs.append(train_with_events(pretrained, variant, seed, args, heldout))
    cpu_seconds = time.process_time() - start

    def mean(variant: str, key: str) -> float:
        values = [r[key] for r in runs if r["variant"] == variant]
        return sum(values) / len(values)

    lines = [
        "| seed | variant | events (steps) | sparsity | mean train loss, "
        f"{args.window} steps after each event | held-out ppl after last event | held-out ppl at the end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        per_event = ", ".join(f"{v:.3f}" for v in r["loss_after_events"])
        lines.append(
            f"| {r['seed']} | {r['variant']} | {r['events']} | {r['sparsity']:.3f} | {r['mean_loss_after_events']:.4f}"
            f" ({per_event}) | {r['ppl_after_last_event']:.4f} | {r['ppl_final']:.4f} |"
        )
    for variant in VARIANTS:
        lines.append(
            f"| mean | {variant} | | | {mean(variant, 'mean_loss_after_events'):.4f} | "
            f"{mean(variant, 'ppl_after_last_event'):.4f} | {mean(variant, 'ppl_final'):.4f} |"
        )
    wins = sum(
        r["ppl_final"] < k["ppl_final"]
        for r in runs
        if r["variant"] == "reset"
        for k in runs
        if k["variant"] == "keep" and k["seed"] == r["seed"]
    )
    command = "OMP_NUM_THREADS={} python scripts/measure_sparsegpt_moments.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    dense_text = ", ".join(f"seed {s}: {p:.4f}" for s, p in dense.items())
    text = (
        "# sparsegpt at training events: reset Adam's exp_avg of reconstructed rows, or keep it\n\n"
        f"- command: `{command}`\n- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); {cpu_seconds:.0f} CPU-seconds in all\n"
        f"- budget: {args.pretrain_steps} pretraining steps, then {args.steps} steps with events every "
        f"{args.every} steps from {args.start} to {args.end} (cubic) to {args.sparsity:.0%} unstructured, AdamW "
        f"lr {args.lr:g}, 16 x 48 tokens per step, identical batches for both variants\n"
        f"- dense held-out perplexity before pruning: {dense_text}\n"
        f"- reset has the lower final held-out perplexity in {wins} of {len(args.seeds)} seeds\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"moments_lr{args.lr:g}_s{args.sparsity:g}"
        (folder / f"{stem}.md").write_text(text)
        (folder / f"{stem}.json").write_text(json.dumps({"args": vars(args), "dense": dense, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

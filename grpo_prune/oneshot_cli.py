"""The ``grpo-prune oneshot`` command: prune a model in one step on calibration text and export it.

It lives here, beside the other commands, and not in :mod:`grpo_prune.pruning.oneshot`, so that the pruning engine
stays pure torch (it imports nothing from the rest of ``grpo_prune`` except :mod:`grpo_prune.fileio`). The prune
itself (calibration windows, then ``prune_oneshot``) is :func:`grpo_prune.oneshot_start.prune_on_calibration`, which
``grpo-prune train`` runs too for its one-shot start (``prune_init_scorer``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from grpo_prune import data
from grpo_prune.pruning.oneshot import ONESHOT_SCORERS
from grpo_prune.pruning.pruner import PruningSettings
from grpo_prune.pruning.settings import ALLOCATIONS
from grpo_prune.usage import OneLineArgumentParser

__all__ = ["calibration_windows", "main"]


def calibration_windows(
    tokenizer: Any,
    source: str,
    windows: int,
    length: int,
    *,
    model: Any = None,
    seed: int = 0,
    task: str = "arithmetic",
) -> Tensor:
    """``[windows, length]`` calibration token ids from a named source (``python_docs``, the model's own samples
    ``self``/``self:task``/``self:open``, ``mix``, or a ``.txt``/``.jsonl`` file); see
    :func:`grpo_prune.data.calibration_windows`. The self-generated sources sample ``model`` (the dense one)."""
    return data.calibration_windows(tokenizer, source, windows, length, model=model, seed=seed, task=task)


def main(argv: list[str] | None = None) -> int:
    """``grpo-prune oneshot MODEL OUTPUT_DIR [--scorer sparsegpt] [--sparsity 0.5] ...``: prune a model in one
    step on calibration text and export it (the start of the one-shot-then-recover recipe: train the export with
    ``prune_init_masks`` pointing at it)."""
    parser = OneLineArgumentParser(
        prog="grpo-prune oneshot",
        description="Prune a model in one step on calibration text (Wanda, SparseGPT, magnitude, ...) and export it: "
        "zeros + mask sidecar (train it further with `prune_init_masks: OUTPUT_DIR`), compressed, or a physically "
        "smaller model for structured pruning.",
    )
    parser.add_argument("model", help="a local model folder or an embedded model name (e.g. smollm2-135m-instruct)")
    parser.add_argument("output_dir", help="folder to write (an earlier export there is replaced)")
    parser.add_argument("--scorer", default="sparsegpt", choices=ONESHOT_SCORERS, help="default: sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction pruned, in [0, 1) (default 0.5)")
    parser.add_argument("--granularity", default="unstructured", choices=("unstructured", "n:m", "structured"))
    parser.add_argument("--n-m", default="2:4", help="N:M pattern for --granularity n:m (default 2:4)")
    parser.add_argument(
        "--structured-units",
        default="mlp",
        choices=("mlp", "heads", "mlp+heads"),
        help="units removed by --granularity structured (default mlp: MLP neurons; heads: whole query heads, the "
        "same number per KV head; sparsegpt reconstructs down_proj / o_proj on the kept ones)",
    )
    parser.add_argument(
        "--allocation",
        default="uniform",
        choices=ALLOCATIONS,
        help="how the sparsity spreads over decoder layers (default uniform: every layer at --sparsity; owl: "
        "outlier-weighted, for wanda and magnitude)",
    )
    # Defaults from results/calibration (scripts/measure_calibration.py; SmolLM2-135M-Instruct, sparsegpt 50%):
    # held-out LAMBADA perplexity 2.79x dense with 8 x 256 tokens of python_docs (the old default), 2.23x with
    # 128 x 256; 1.68x with 128 x 256 of the model's own samples, which also keep 52% of dense arithmetic (3% with
    # the old default).
    parser.add_argument(
        "--calibration",
        default="self",
        help="what to calibrate on (default: self): the model's own samples ('self': half its answers to the "
        "--calibration-task train prompts, half its continuations of neutral sentence openings; 'self:task', "
        "'self:open' one of them; sampled from the dense model before pruning, once, then cached: about 4 "
        "CPU-minutes for 128 x 256 tokens on SmolLM2-135M, one thread), 'python_docs' (built-in text, nothing to "
        "sample), 'mix' (half python_docs, half self), or a .txt / .jsonl ('text' field) file",
    )
    parser.add_argument(
        "--calibration-task", default="arithmetic", help="prompt dataset whose train prompts 'self' samples"
    )
    parser.add_argument("--calibration-seed", type=int, default=0, help="seed of the self-generated samples")
    parser.add_argument(
        "--calibration-task-share",
        type=float,
        default=data.SELF_TASK_SHARE,
        help="share of a 'self' calibration's tokens that answer the task (default 0.5; the rest continue neutral "
        "openings). More keeps more of the task at some held-out perplexity: at 50%%, 0.875 then 32 GRPO steps "
        "kept 58-91%% of dense arithmetic in the training format at 1.78x perplexity, three of them averaged 102%% "
        "(results/frontier, recipe-taskcal-cool)",
    )
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=128,
        help="windows of calibration tokens (default 128: 32k tokens; the field's protocol is 128 x 2048). The "
        "count matters more than the length. CPU cost, SmolLM2-135M, one thread: sparsegpt about 2 s per window "
        "(4 minutes for 128), wanda about 0.8 s",
    )
    parser.add_argument("--calibration-length", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--format", choices=("dense", "compressed"), default="dense", help="as in `grpo-prune export`")
    args = parser.parse_args(argv)

    # Everything is checked before the model loads.
    if data.validate_calibration_source(args.calibration) != "text":
        data.validate_dataset_name(args.calibration_task)
    if args.calibration_windows < 1 or args.calibration_length < 2:
        raise ValueError("`--calibration-windows` must be >= 1 and `--calibration-length` >= 2.")
    try:
        data.validate_task_share(args.calibration_task_share, args.calibration)
    except ValueError as err:
        raise ValueError(f"`--calibration-task-share`: {err}") from None
    overrides: dict[str, Any] = {"allocation": args.allocation}
    if args.granularity == "structured":
        overrides["structured_units"] = args.structured_units
    # The settings check the rest; their sparsegpt is the scorer of training-time events, which removes no whole
    # units, so a structured one-shot sparsegpt is checked with a stand-in scorer that allocates nothing.
    scorer = "random" if args.scorer == "sparsegpt" and args.granularity == "structured" else args.scorer
    try:
        PruningSettings(
            target_sparsity=args.sparsity, granularity=args.granularity, n_m=args.n_m, scorer=scorer, **overrides
        ).validate()
    except ValueError as err:  # the engine's field names, as this command's flags
        raise ValueError(
            str(err).replace("`allocation`", "`--allocation`").replace("`scorer`", "`--scorer`")
        ) from None

    from grpo_prune.export import export_pruned  # heavy (transformers); only once the arguments are checked
    from grpo_prune.models import load_model, load_tokenizer
    from grpo_prune.oneshot_start import prune_on_calibration

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    model.eval()
    result = prune_on_calibration(
        model,
        tokenizer,
        scorer=args.scorer,
        sparsity=args.sparsity,
        granularity=args.granularity,
        n_m=args.n_m,
        calibration=args.calibration,
        windows=args.calibration_windows,
        length=args.calibration_length,
        calibration_seed=args.calibration_seed,
        task=args.calibration_task,
        task_share=args.calibration_task_share,
        **overrides,
    )
    report = result.report
    share = (
        "" if args.calibration_task_share == data.SELF_TASK_SHARE else f", task share {args.calibration_task_share}"
    )
    exported = export_pruned(
        model, args.output_dir, pruner=report, tokenizer=tokenizer, compressed=args.format == "compressed"
    )
    print(
        f"Pruned {args.model} one-shot with {args.scorer}: {report.global_sparsity:.1%} of the targeted weights "
        f"({args.calibration_windows} x {args.calibration_length} tokens of {args.calibration}{share}; "
        f"{result.cpu_seconds:.0f} CPU-s); exported "
        f"{exported['mode']} to {args.output_dir}"
        + {
            "masked": f". Train it further with `model_name_or_path: {args.output_dir}`, `prune_init_masks: "
            f"{args.output_dir}` and `teacher_model_name_or_path: {args.model}`.",
            "structured": f". Recover it with `model_name_or_path: {args.output_dir}`, `prune_target_sparsity: 0` "
            f"and `teacher_model_name_or_path: {args.model}` (it is physically smaller: nothing left to mask).",
        }.get(exported["mode"], ".")
    )
    return 0

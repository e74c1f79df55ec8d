"""Sparse model soups: the average of models recovered from one pruned start (``grpo-prune soup``).

A few GRPO steps on one prompt each are a noisy estimate of the gradient: four recoveries of one 50% start that
differed only in their seed kept 46-75% of dense arithmetic (results/soup). Models that share a mask can be averaged
without losing it: each is exactly zero where the mask prunes, so their mean is too, and the soup is exactly as
sparse and as fast as each of them (Zimmer et al., "Sparse Model Soups", arXiv 2306.16788). Measured there, the
soups kept 65-68% at the same perplexity; recoveries of a model without a quarter of its MLP neurons, which kept
52-88% alone, averaged three at a time to 98% and 106%, and at 30% unstructured to 108% and 126% (results/frontier).
The runs are independent, so on several accelerators they run side by side, one per device.

Which models may be averaged is checked before any weight is read: the same architecture and shapes, and either the
same mask sidecar (``pruning_masks.safetensors``, bit for bit) in every folder or none in any (a physically smaller
structured export, where the shapes carry the pruning). Every model's weights must be zero where its mask prunes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from grpo_prune.compress import compressed_format
from grpo_prune.export import (
    MASKS_FILE,
    REPORT_FILE,
    UNIT_MASKS_FILE,
    check_masks_fit,
    check_replaceable,
    folder_tokenizer,
    load_masks_sidecar,
)
from grpo_prune.fileio import write_json_atomic
from grpo_prune.models import write_dir_atomically
from grpo_prune.usage import OneLineArgumentParser

__all__ = ["average_models", "main"]

#: Files of the first model's folder that describe the soup too: its mask sidecars, copied as they are.
_SIDECARS = (MASKS_FILE, UNIT_MASKS_FILE)


def _model_folders(model_dirs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    folders = [Path(os.fspath(d)).expanduser() for d in model_dirs]
    if len(folders) < 2:
        raise ValueError(f"a soup needs at least two models, got {len(folders)}.")
    for folder in folders:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json).")
        if (folder / "adapter_config.json").is_file():
            raise ValueError(f"{folder} holds LoRA adapters: average merged models (pruning runs never use LoRA).")
        if compressed_format(folder) is not None:
            raise ValueError(f"{folder} is a compressed export: average the runs' output folders, then export.")
    resolved = [f.resolve() for f in folders]
    for i, folder in enumerate(resolved):
        if folder in resolved[:i]:
            raise ValueError(f"{model_dirs[i]} is given twice: each model must be averaged once.")
    return folders


def _shared_masks(folders: list[Path]) -> dict[str, torch.Tensor] | None:
    """The mask every folder holds (bit for bit the same), or None when none holds one."""
    has = [(f / MASKS_FILE).is_file() for f in folders]
    if not any(has):
        return None
    if not all(has):
        missing = [str(f) for f, h in zip(folders, has, strict=True) if not h]
        raise ValueError(f"{', '.join(missing)} hold no {MASKS_FILE} but {folders[has.index(True)]} does.")
    first = load_masks_sidecar(folders[0])
    for folder in folders[1:]:
        masks = load_masks_sidecar(folder)
        if masks.keys() != first.keys():
            raise ValueError(f"{folder} masks other modules than {folders[0]}: not recovered from one start.")
        for name, mask in masks.items():
            if not torch.equal(mask, first[name]):
                differ = int((mask != first[name]).sum())
                raise ValueError(
                    f"{folder} and {folders[0]} prune different weights of {name} ({differ} differ): a soup averages "
                    "models recovered from one start with its masks held (prune_init_masks), which keep one mask."
                )
    return first


def _check_zero_where_pruned(model: torch.nn.Module, masks: dict[str, torch.Tensor], folder: Path) -> None:
    check_masks_fit(model, masks, str(folder / MASKS_FILE))
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if modules[name].weight[~mask].any():
            raise ValueError(f"{folder}: {name}.weight is not zero where its mask prunes; not a pruned model.")


def average_models(model_dirs: Sequence[str | os.PathLike[str]], output_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the uniform average of ``model_dirs`` (HF model folders) to ``output_dir``.

    The models must share architecture, shapes and mask (see the module docstring); the sums are taken in float32
    and the result is saved in the first model's dtype, with its config, tokenizer and mask sidecars, and its
    ``pruning_report.json`` with a ``soup`` entry naming the models. ``output_dir`` is written atomically (an
    earlier soup there is replaced only once the new one is complete; any other non-empty folder is refused) and
    must not be one of the models.

    Returns:
        ``{"models": [...], "output_dir": ..., "masked_modules": int, "parameters": int}``.
    """
    from transformers import AutoModelForCausalLM

    folders = _model_folders(model_dirs)
    out = Path(os.fspath(output_dir)).expanduser()
    if out.resolve() in [f.resolve() for f in folders]:
        raise ValueError(f"output_dir {output_dir} is one of the models; write the soup to a new folder.")
    check_replaceable(out, lambda report: "soup" in report, "an earlier soup")
    masks = _shared_masks(folders)

    soup = AutoModelForCausalLM.from_pretrained(folders[0], dtype="auto")
    dtype = next(soup.parameters()).dtype
    sums = {name: p.detach().float().clone() for name, p in soup.state_dict().items()}
    for folder in folders:
        model = soup if folder == folders[0] else AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        if masks is not None:
            _check_zero_where_pruned(model, masks, folder)
        if model is soup:
            continue
        state = model.state_dict()
        if state.keys() != sums.keys():
            raise ValueError(f"{folder} has other tensors than {folders[0]}: not the same architecture.")
        for name, tensor in state.items():
            if tensor.shape != sums[name].shape:
                raise ValueError(
                    f"{folder}: {name} is {tuple(tensor.shape)}, {tuple(sums[name].shape)} in {folders[0]}."
                )
            sums[name] += tensor.float()
        del model, state
    with torch.no_grad():
        for name, tensor in soup.state_dict().items():  # tied tensors are written twice, with the same value
            tensor.copy_((sums[name] / len(folders)).to(dtype))

    tokenizer = folder_tokenizer(folders[0], None)
    names = [str(f) for f in folders]

    def write(tmp: Path) -> None:
        soup.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for sidecar in _SIDECARS:
            if (folders[0] / sidecar).is_file():
                shutil.copy2(folders[0] / sidecar, tmp / sidecar)
        report_path = folders[0] / REPORT_FILE
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        report["soup"] = {"models": names, "weights": "uniform"}
        write_json_atomic(tmp / REPORT_FILE, report)

    write_dir_atomically(out, write)
    return {
        "models": names,
        "output_dir": str(out),
        "masked_modules": len(masks or {}),
        "parameters": sum(p.numel() for p in soup.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    """``grpo-prune soup MODEL_DIR MODEL_DIR [...] --output-dir OUTPUT_DIR``; returns the exit status."""
    parser = OneLineArgumentParser(
        prog="grpo-prune soup",
        description="Average models recovered from one pruned start (runs that differ in their seed): the soup keeps "
        "their shared mask exactly (what it bought on the embedded model: docs/training.md, 'Averaging seeds').",
    )
    parser.add_argument("models", nargs="+", help="two or more model folders (a run's output_dir, or an export)")
    parser.add_argument("--output-dir", required=True, help="folder to write (an earlier soup there is replaced)")
    args = parser.parse_args(argv)
    summary = average_models(args.models, args.output_dir)
    print(
        f"Averaged {len(summary['models'])} models into {summary['output_dir']}: "
        f"{summary['parameters'] / 1e6:.2f}M parameters, {summary['masked_modules']} masked modules kept."
    )
    return 0

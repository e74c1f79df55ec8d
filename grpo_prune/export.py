"""Export a pruned model as a plain Hugging Face checkpoint (``grpo-prune export``).

Two forms, chosen by the pruning granularity (``structured="auto"``):

* **Masked** (unstructured, N:M; or any granularity with ``structured=False``): the model at full size with exact
  zeros at every pruned weight, plus ``pruning_masks.safetensors``: one bool keep-mask (True = kept) per pruned
  ``nn.Linear``, keyed by module name (``model.layers.0.mlp.down_proj``), shaped like its weight ``[out, in]``.
  Sparse kernels and N:M hardware paths can be driven from the sidecar; the checkpoint itself loads anywhere.
* **Structured**: a physically smaller checkpoint. Pruned MLP neurons are removed (rows of ``gate_proj`` and
  ``up_proj``, columns of ``down_proj``; ``intermediate_size`` edited), pruned query heads are removed (rows of
  ``q_proj``, columns of ``o_proj``; ``num_attention_heads`` edited) and, when every query head of a KV group goes,
  the group's ``k_proj``/``v_proj`` rows too (``num_key_value_heads`` edited). ``head_dim`` is written explicitly,
  since ``hidden_size // num_attention_heads`` no longer gives it. ``pruning_unit_masks.safetensors`` keeps the
  unit keep-masks in the original numbering (``model.layers.0.mlp`` -> bool ``[intermediate_size]``,
  ``model.layers.0.self_attn`` -> bool ``[num_attention_heads]``), so a sliced model can be mapped back.

* **Compressed** (``compressed=True``, ``--format compressed``; unstructured and N:M): the masked form with the
  pruned weights stored in compressed-tensors' ``sparse-bitmask`` / ``sparse-24-bitmask`` layout
  (:mod:`grpo_prune.compress`), about half the bytes of the pruned layers at 50%; loaded with
  :func:`grpo_prune.compress.load_compressed`; plain ``from_pretrained`` refuses the folder rather than load it
  wrong.
* **GGUF** (``gguf_type=``, ``--format gguf``): the masked or sliced model as one GGUF file for llama.cpp, with the
  tokenizer and chat template inside (:mod:`grpo_prune.gguf_export`). docs/export.md compares the formats.

The source is a folder with pruner state (``checkpoint-*``, or ``save_pretrained`` + ``Pruner.save``), a folder with
``pruning_masks.safetensors`` (a run's final ``output_dir``, written by :func:`write_final_model`, or an earlier masked
export), or an in-memory model with its pruner.

The masked and structured forms load with plain ``AutoModelForCausalLM.from_pretrained(output_dir)``: no custom code. Vanilla Llama/Qwen2
configs have one size for every layer, so a structured export needs the same number of units kept in every
decoder layer (the engine's ``uniform=True`` default); otherwise it raises and ``structured=False`` exports the
zeros form instead. transformers 5.24 has no per-layer ``intermediate_size`` for these architectures.

Biases added by compensation (``Pruner.added_biases``: ``down_proj``/``o_proj`` of a bias-free model, or every
target for unstructured compensation) are kept by switching on the config's ``mlp_bias`` / ``attention_bias``, with
zero biases for the layers that had none. Qwen2 has no such switches (``o_proj`` and the MLP are hard-wired
bias-free), so a Qwen2 model that needs them is exported as the equivalent ``LlamaForCausalLM`` (Qwen2 without
sliding-window attention *is* Llama with ``attention_bias=True``); the report says so.

A ``peft`` model (LoRA adapter over a pruned base) is merged on a copy (the caller's model is left as it was) and the
masks are re-applied after the merge, since ``W + B @ A`` is dense: the exported weights keep the base's sparsity.

Every export writes ``pruning_report.json`` (also returned): parameters and bytes before and after, per-layer
sparsity, what was removed, the config changes, and the report of the run that pruned the model. Writing is atomic:
everything goes into a temporary sibling folder that is renamed to ``output_dir`` once complete.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from grpo_prune.fileio import relax_private_modes
from grpo_prune.models import write_dir_atomically
from grpo_prune.pruning.masks import expand_group_mask
from grpo_prune.pruning.oneshot import PruneReport
from grpo_prune.pruning.pruner import SETTINGS_FILE, STATE_FILE, Pruner, PruningSettings
from grpo_prune.pruning.structure import HeadGroup, MLPGroup, decoder_layers, head_groups, mlp_groups
from grpo_prune.usage import OneLineArgumentParser

__all__ = [
    "EXPORT_FORMAT",
    "MASKS_FILE",
    "check_masks_fit",
    "check_replaceable",
    "folder_tokenizer",
    "load_masks_sidecar",
    "masks_sidecar_granularity",
    "REPORT_FILE",
    "UNIT_MASKS_FILE",
    "export_pruned",
    "main",
    "write_final_model",
]

MASKS_FILE = "pruning_masks.safetensors"
UNIT_MASKS_FILE = "pruning_unit_masks.safetensors"
REPORT_FILE = "pruning_report.json"  # the name MamaGRPOTrainer.save_model uses for its own report
EXPORT_FORMAT = "grpo-prune-export/1"

_MLP_SUFFIXES = ("gate_proj", "up_proj", "down_proj")
_ATTN_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj")
_PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------------------------------------------------
# What is being exported
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """A bare causal LM plus what is needed to export it.

    Attributes:
        model: the unwrapped model (the merged copy for a PEFT input); never modified by the export.
        masks: target module name -> bool keep-mask ``[out, in]`` (True = kept).
        granularity: ``"unstructured"``, ``"n:m"`` or ``"structured"``.
        origin: where it came from (a checkpoint path or ``"in-memory ..."``), for the report.
        pruning: JSON-able summary of the pruning (settings, sparsity...).
        source_report: the ``pruning_report.json`` of the checkpoint folder, when there is one.
        lora_merged: LoRA-wrapped module names that were merged (PEFT input), else None.
        tokenizer: written beside the model when given (or found in the checkpoint folder).
    """

    model: nn.Module
    masks: dict[str, Tensor]
    granularity: str
    origin: str
    pruning: dict[str, Any] = field(default_factory=dict)
    source_report: dict[str, Any] | None = None
    lora_merged: list[str] | None = None
    tokenizer: Any = None


def _is_peft_model(model: Any) -> bool:
    # A model can only be a PeftModel if peft was imported; checking sys.modules avoids importing it for nothing.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _merge_lora_copy(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Merge the adapters of a PEFT model into a deep copy of its base; returns (bare model, LoRA module names)."""
    wrapped = sorted(
        n.removeprefix(_PEFT_PREFIX) for n, m in model.named_modules() if hasattr(m, "base_layer") and "." in n
    )
    # On a copy: merge_and_unload rewrites the base weights in place, and the caller may keep training the adapter.
    merged = copy.deepcopy(model).merge_and_unload()
    return merged, wrapped


def _source_from_checkpoint(folder: Path, tokenizer: Any) -> _Source:
    from transformers import AutoModelForCausalLM

    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass a checkpoint folder or an in-memory model.")
    if not (folder / "config.json").is_file():
        hint = (
            " It holds a PEFT adapter: load the base with the adapter as a PeftModel and pass it with pruner=."
            if (folder / "adapter_config.json").is_file()
            else ""
        )
        raise ValueError(f"{folder} has no config.json: not a transformers checkpoint.{hint}")
    config = json.loads((folder / "config.json").read_text())
    if "sparsity_config" in (config.get("quantization_config") or {}):
        raise ValueError(
            f"{folder} is already a compressed export; load it with grpo_prune.compress.load_compressed(folder)."
        )
    if (folder / MASKS_FILE).is_file():
        # A masked export, e.g. the final output_dir of a training run: the sidecar holds the masks.
        return _source_from_masked_export(folder, tokenizer)
    if (folder / UNIT_MASKS_FILE).is_file():
        raise ValueError(
            f"{folder} is a structured export whose units are already sliced out; there is nothing left to export."
        )
    missing = [f for f in (SETTINGS_FILE, STATE_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"{folder} has no pruner state ({', '.join(missing)} missing) and no {MASKS_FILE}: it was not written by "
            "MamaGRPOTrainer or Pruner.save, so the masks are unknown. Export an in-memory model with "
            "pruner=<Pruner or prune_oneshot report> instead."
        )
    meta = json.loads((folder / SETTINGS_FILE).read_text())
    known = set(PruningSettings.__dataclass_fields__)
    settings = PruningSettings(**{k: v for k, v in meta.get("settings", {}).items() if k in known})
    # dtype="auto": export in the dtype the checkpoint was saved in. Biases added by compensation are unknown to
    # the vanilla config and dropped by from_pretrained; Pruner.load re-creates them from the pruner state.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    pruner = Pruner(model, settings)
    pruner.load(folder)
    pruner.apply_masks_()
    report_path = folder / REPORT_FILE
    source_report = json.loads(report_path.read_text()) if report_path.is_file() else None
    tokenizer = folder_tokenizer(folder, tokenizer)
    return _Source(
        model=model,
        masks=dict(pruner.masks),
        granularity=settings.granularity,
        origin=str(folder),
        pruning=pruner.report(),
        source_report=source_report,
        tokenizer=tokenizer,
    )


def _masks_sidecar_path(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        p = p / MASKS_FILE
    if not p.is_file():
        raise ValueError(
            f"No masks at {os.fspath(path)!r}: expected a masked export folder holding {MASKS_FILE} (written by "
            "`grpo-prune oneshot` or export_pruned(structured=False)), or that file."
        )
    return p


def masks_sidecar_granularity(path: str | os.PathLike[str]) -> str:
    """The granularity a mask sidecar (or the masked export folder holding it) says it has, read from its
    metadata without loading a tensor. ValueError if there is no sidecar or it does not say."""
    from safetensors import safe_open

    p = _masks_sidecar_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            granularity = (f.metadata() or {}).get("granularity")
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{p} is not a readable safetensors mask sidecar: {err}") from err
    if granularity not in ("unstructured", "n:m", "structured"):
        raise ValueError(f"{p} does not say its granularity (metadata 'granularity'): not a grpo-prune mask sidecar.")
    return granularity


def load_masks_sidecar(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The bool keep-masks of a mask sidecar (or of the masked export folder holding it), module name -> mask."""
    from safetensors.torch import load_file

    masks_sidecar_granularity(path)
    p = _masks_sidecar_path(path)
    try:
        tensors = load_file(p)
    except Exception as err:  # the header reads but the data is cut short
        raise ValueError(f"{p} is not a complete safetensors file ({err}): truncated or damaged.") from err
    return {n: m.bool() for n, m in tensors.items()}


def folder_tokenizer(folder: Path, tokenizer: Any) -> Any:
    if tokenizer is None and any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer


def _source_from_masked_export(folder: Path, tokenizer: Any) -> _Source:
    """A folder with the full-size model and ``pruning_masks.safetensors`` (an earlier masked export, or the final
    ``output_dir`` of ``MamaGRPOTrainer``); its config already holds any biases added by compensation."""
    from transformers import AutoModelForCausalLM

    granularity = masks_sidecar_granularity(folder)
    masks = load_masks_sidecar(folder)
    report_path = folder / REPORT_FILE
    source_report = json.loads(report_path.read_text()) if report_path.is_file() else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    check_masks_fit(model, masks, f"{folder / MASKS_FILE}")
    return _Source(
        model=model,
        masks=masks,
        granularity=granularity,
        origin=str(folder),
        pruning=(source_report or {}).get("pruning") or {},
        source_report=source_report,
        tokenizer=folder_tokenizer(folder, tokenizer),
    )


def check_masks_fit(model: nn.Module, masks: dict[str, Tensor], origin: str) -> None:
    """ValueError unless every mask names an ``nn.Linear`` of ``model`` and has its weight's shape (a sidecar from
    another model, or a model whose weights were swapped, must not be applied by broadcasting or silently skipped)."""
    modules = dict(model.named_modules())
    unknown = [n for n in masks if not isinstance(modules.get(n), nn.Linear)]
    if unknown:
        raise ValueError(
            f"The masks of {origin} name modules that are not nn.Linear layers of this {type(model).__name__}: "
            f"{unknown[:3]}; they belong to another model."
        )
    wrong = [
        f"{n}: mask {tuple(m.shape)}, weight {tuple(modules[n].weight.shape)}"
        for n, m in masks.items()
        if tuple(m.shape) != tuple(modules[n].weight.shape)
    ]
    if wrong:
        raise ValueError(
            f"The masks of {origin} do not match this {type(model).__name__}'s weights ({'; '.join(wrong[:2])}): "
            "they belong to another model or another size of it."
        )


def _source_from_memory(model: nn.Module, pruner: Any, tokenizer: Any) -> _Source:
    if pruner is None:
        raise ValueError(
            "An in-memory model needs its masks: pass pruner= (the Pruner that pruned it, e.g. trainer.pruner, or "
            "the PruneReport returned by prune_oneshot)."
        )
    if isinstance(pruner, Pruner):
        masks, granularity, pruning = dict(pruner.masks), pruner.settings.granularity, pruner.report()
    elif isinstance(pruner, PruneReport):
        if not pruner.masks:
            raise ValueError("The PruneReport holds no masks (built by hand?); pass the Pruner instead.")
        masks, granularity, pruning = dict(pruner.masks), pruner.granularity, pruner.to_dict()
    else:
        raise TypeError(
            f"`pruner` must be a Pruner or a PruneReport (from prune_oneshot), got {type(pruner).__name__}."
        )
    lora_merged = None
    if _is_peft_model(model):
        model, lora_merged = _merge_lora_copy(model)
        # Masks built on the wrapped model carry PEFT's prefix; the merged model has the bare names.
        masks = {n.removeprefix(_PEFT_PREFIX).replace(".base_layer", ""): m for n, m in masks.items()}
    return _Source(
        model=model,
        masks=masks,
        granularity=granularity,
        origin=f"in-memory {type(model).__name__}",
        pruning=pruning,
        lora_merged=lora_merged,
        tokenizer=tokenizer,
    )


# --------------------------------------------------------------------------------------------------------------------
# Structured slicing plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Slice:
    """Keep ``index`` along ``dim`` of the state-dict tensor ``key``."""

    key: str
    dim: int
    index: Tensor  # int64 [kept]


@dataclass
class _StructuredPlan:
    slices: list[_Slice]
    config: dict[str, int]  # edited config fields
    unit_masks: dict[str, Tensor]  # group prefix -> bool [num_units] (original numbering)
    removed: dict[str, dict[str, Any]]  # decoder layer -> what went


def _units_from_masks(masks: dict[str, Tensor], group: MLPGroup | HeadGroup, size: int) -> Tensor:
    """A group's unit keep-mask, bool ``[num_units]``, recovered from its weight masks (checked to be whole units;
    ``size`` rows/columns per unit: 1 for a neuron, ``head_dim`` for a head)."""
    producer = masks[group.producers[0]]
    keep = producer.reshape(group.num_units, -1).any(dim=1)
    layout = [*((n, 0) for n in group.producers), (group.consumer, 1)]
    for name, dim in layout:
        expected = expand_group_mask(keep.cpu(), masks[name].shape, dim, group_size=size)
        if not torch.equal(expected, masks[name].cpu()):
            raise ValueError(
                f"The masks of {group.prefix} are not whole structural units ({name} prunes parts of a unit), so "
                "they cannot be sliced out; export with structured=False (zeros at full size)."
            )
    return keep.cpu()


def _index(keep: Tensor, size: int = 1) -> Tensor:
    """Row/column indices kept by a unit keep-mask ``[num_units]`` whose units span ``size`` rows each."""
    units = keep.nonzero().squeeze(1)
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


def _structured_plan(model: nn.Module, masks: dict[str, Tensor]) -> _StructuredPlan:
    """Which rows/columns to keep, and the config that describes the result; raises when not expressible."""
    modules = dict(model.named_modules())
    targets = {n: modules[n] for n in masks}
    config = model.config
    groups: list[MLPGroup | HeadGroup] = []
    if any(n.endswith(_MLP_SUFFIXES) for n in masks):
        groups += mlp_groups(model, targets)
    if any(n.endswith(("q_proj", "o_proj")) for n in masks):
        groups += head_groups(model, targets)

    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    layers = [prefix for prefix, _ in decoder_layers(model)]
    # Per decoder layer: (kept neurons, kept query heads, kept KV heads); layers without a group keep everything.
    kept = {p: [config.intermediate_size, n_heads, n_kv] for p in layers}
    slices: list[_Slice] = []
    unit_masks: dict[str, Tensor] = {}
    removed: dict[str, dict[str, Any]] = {p: {} for p in layers}
    for g in groups:
        layer = next(p for p in layers if g.prefix.startswith(p + "."))
        if isinstance(g, MLPGroup):
            keep = _units_from_masks(masks, g, 1)
            idx = _index(keep)
            slices += [_Slice(f"{n}.{t}", 0, idx) for n in g.producers for t in ("weight", "bias")]
            slices.append(_Slice(f"{g.down}.weight", 1, idx))
            kept[layer][0] = int(keep.sum())
            removed[layer]["mlp_neurons"] = g.num_units - int(keep.sum())
        else:
            keep = _units_from_masks(masks, g, g.head_dim)
            per_kv = keep.reshape(g.num_kv_heads, g.heads_per_kv).sum(dim=1)
            surviving = per_kv[per_kv > 0].unique()
            if surviving.numel() > 1:
                raise ValueError(
                    f"{g.prefix} keeps {per_kv.tolist()} query heads in its KV groups: a vanilla GQA config needs "
                    "the same number in every group (the engine prunes heads that way)."
                )
            kv_keep = per_kv > 0
            slices += [_Slice(f"{g.q}.{t}", 0, _index(keep, g.head_dim)) for t in ("weight", "bias")]
            slices.append(_Slice(f"{g.o}.weight", 1, _index(keep, g.head_dim)))
            if not kv_keep.all():  # a whole KV group lost its query heads: its keys and values are dead too
                kv_idx = _index(kv_keep, g.head_dim)
                slices += [_Slice(f"{n}.{t}", 0, kv_idx) for n in (g.k, g.v) for t in ("weight", "bias")]
            kept[layer][1:] = [int(keep.sum()), int(kv_keep.sum())]
            removed[layer]["heads"] = (~keep).nonzero().squeeze(1).tolist()
            removed[layer]["kv_heads"] = (~kv_keep).nonzero().squeeze(1).tolist()
        unit_masks[g.prefix] = keep

    sizes = {tuple(v) for v in kept.values()}
    if len(sizes) > 1:
        by_layer = {p.rsplit(".", 1)[-1]: v for p, v in kept.items()}
        raise ValueError(
            "Structured export needs the same number of units kept in every decoder layer (vanilla configs have one "
            "intermediate_size and one head count for all layers), but the layers keep [neurons, heads, kv_heads] = "
            f"{by_layer}. Prune with uniform=True (the default), or export with structured=False for a full-size "
            "checkpoint with zeros."
        )
    (inter, heads, kv_heads) = sizes.pop()
    if min(inter, heads, kv_heads) == 0:
        raise ValueError("Structured export would leave a layer with no MLP neuron or no attention head.")
    new_config = {"intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    new_config["head_dim"] = head_dim  # explicit: hidden_size // num_attention_heads no longer gives it
    return _StructuredPlan(slices, new_config, unit_masks, {p: r for p, r in removed.items() if r})


# --------------------------------------------------------------------------------------------------------------------
# Config, biases and the vanilla model
# --------------------------------------------------------------------------------------------------------------------


def _copy_config(config: Any) -> Any:
    return config.__class__.from_dict(config.to_dict())


def _check_config_valid(config: Any, changes: dict[str, list[Any]]) -> None:
    """Raise ``ValueError`` when transformers' own validation refuses the sliced config, which ``from_pretrained``
    would then refuse too. Gemma 3 requires ``hidden_size % num_attention_heads == 0`` even though its
    ``head_dim`` is explicit: the 270M model (hidden 640, 4 heads on 1 KV head) exports with 1, 2 or 4 heads kept,
    not 3 (head sparsity 0.25)."""
    validate = getattr(config, "validate", None)
    if validate is None:  # configs without transformers' strict validation
        return
    try:
        validate()
    except Exception as err:  # huggingface_hub's StrictDataclass*ValidationError wraps the ValueError
        reason = str(err).strip().splitlines()[-1].strip()
        edited = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items())
        raise ValueError(
            f"The sliced model's config ({edited}) is not a valid {type(config).__name__}: {reason} Choose a "
            "structured sparsity whose kept head count satisfies it, or export with structured=False (zeros at "
            "full size)."
        ) from err


def _meta_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The vanilla model class for ``config``, without allocating or initialising weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _biased_linears(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def _qwen2_as_llama(config: Any) -> Any:
    """The LlamaConfig of a Qwen2 model without sliding windows (same computation; o_proj/MLP biases switchable)."""
    from transformers import LlamaConfig

    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        raise ValueError(
            "Compensation added biases that vanilla Qwen2 cannot hold (o_proj/MLP are bias-free there), and this "
            "model uses sliding-window attention, so it cannot be exported as the equivalent Llama either."
        )
    fields = config.to_dict()
    drop = {"model_type", "architectures", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
    fields = {k: v for k, v in fields.items() if k not in drop}
    fields.update(attention_bias=True, architectures=["LlamaForCausalLM"])
    return LlamaConfig(**fields)


def _fit_biases(
    config: Any, state: dict[str, Tensor], dtype: torch.dtype
) -> tuple[Any, nn.Module, list[str], list[str]]:
    """Make ``config`` hold every bias in ``state``, switching on ``mlp_bias`` / ``attention_bias`` if needed.

    Returns:
        (config, meta model of that config, config changes as text, zero biases added to ``state``).
    """
    changes: list[str] = []
    model = _meta_model(config, dtype)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    need = {k.removesuffix(".bias") for k in state if k.endswith(".bias") and k.removesuffix(".bias") in linears}
    missing = need - _biased_linears(model)
    if missing:
        for flag, suffixes in (("mlp_bias", _MLP_SUFFIXES), ("attention_bias", _ATTN_SUFFIXES)):
            if any(n.endswith(suffixes) for n in missing) and hasattr(config, flag) and not getattr(config, flag):
                setattr(config, flag, True)
                changes.append(f"{flag}: False -> True (biases added by compensation)")
        model = _meta_model(config, dtype)
        missing = need - _biased_linears(model)
    if missing and getattr(config, "model_type", None) == "qwen2":
        config = _qwen2_as_llama(config)
        changes.append(
            "architecture: Qwen2ForCausalLM -> LlamaForCausalLM with attention_bias=True (vanilla Qwen2 has no "
            "o_proj/MLP bias for the biases added by compensation; the computation is the same)"
        )
        if any(n.endswith(_MLP_SUFFIXES) for n in missing):
            config.mlp_bias = True
            changes.append("mlp_bias: False -> True (biases added by compensation)")
        model = _meta_model(config, dtype)
        missing = need - _biased_linears(model)
    if missing:
        raise ValueError(
            f"{type(model).__name__} has no config switch for the biases of {sorted(missing)[:3]} (added by "
            "compensation); it cannot be exported as a vanilla checkpoint. Prune without compensate=True."
        )
    zero_filled = []
    for name in sorted(_biased_linears(model) - need):
        weight = state.get(f"{name}.weight")
        if weight is not None:  # a bias the config now implies but the layer never had: zeros change nothing
            state[f"{name}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            zero_filled.append(name)
    return config, model, changes, zero_filled


def _count(tensors: dict[str, Tensor]) -> dict[str, int]:
    """Parameters, bytes and non-zero entries of a state dict, counting tensors that share storage once (tied)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    params = nbytes = nonzero = 0
    for t in tensors.values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        params += t.numel()
        nbytes += t.numel() * t.element_size()
        nonzero += int(torch.count_nonzero(t))
    return {"params": params, "bytes": nbytes, "nonzero": nonzero}


# --------------------------------------------------------------------------------------------------------------------
# Atomic folder write
# --------------------------------------------------------------------------------------------------------------------


def _check_output(output_dir: Path, source_dir: Path | None) -> None:
    if source_dir is not None:
        out, src = output_dir.resolve(), source_dir.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise ValueError(
                f"output_dir {output_dir} must not be, contain or lie inside the checkpoint {source_dir}."
            )
    check_replaceable(output_dir, lambda report: report.get("format") == EXPORT_FORMAT, "an earlier export")


def check_replaceable(output_dir: Path, earlier: Callable[[dict[str, Any]], bool], what: str) -> None:
    """FileExistsError unless ``output_dir`` is absent, empty, or ``what`` this command wrote before: a folder whose
    ``pruning_report.json`` satisfies ``earlier`` (a user's own folder is never replaced)."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} exists and is not a folder.")
    report = output_dir / REPORT_FILE
    try:
        content = json.loads(report.read_text()) if report.is_file() else None
    except ValueError:
        content = None
    previous = isinstance(content, dict) and earlier(content)
    if any(output_dir.iterdir()) and not previous:
        raise FileExistsError(
            f"output_dir {output_dir} exists and is not {what}; refusing to replace it. Remove it or choose another "
            "folder."
        )


# --------------------------------------------------------------------------------------------------------------------
# Building and writing an export
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class _Export:
    """What an export writes, before it is written.

    Attributes:
        model: a vanilla model of the output config holding the output tensors (masked, and sliced when ``sliced``).
        src: where it came from.
        sidecar: the mask sidecar's tensors; ``sidecar_name`` its file name.
        sliced: structured units were physically removed.
        report: the report (``files`` and ``file_bytes`` are filled in by :func:`_write_export`).
    """

    model: nn.Module
    src: _Source
    sidecar: dict[str, Tensor]
    sidecar_name: str
    sliced: bool
    report: dict[str, Any]


def _prepare(src: _Source, structured: bool | str) -> _Export:
    """Mask (and, for structured pruning, slice) the source into a vanilla model and its report; writes nothing."""
    if structured is True and src.granularity != "structured":
        raise ValueError(
            f"structured=True needs structured pruning (whole neurons/heads), but the masks are {src.granularity!r}; "
            "use structured='auto' to export them as zeros with the mask sidecar."
        )
    slice_units = src.granularity == "structured" and structured in ("auto", True)

    model = src.model
    check_masks_fit(model, src.masks, src.origin)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    # The output state, as new tensors: the caller's model is never modified.
    state = {k: v.detach() for k, v in model.state_dict().items()}
    before = _count(state)
    for name, mask in src.masks.items():
        key = f"{name}.weight"
        # Re-applied even when the weights already hold zeros: a merged LoRA delta (or a caller) may have refilled them.
        state[key] = state[key].masked_fill(~mask.to(state[key].device), 0)

    config = _copy_config(model.config)
    config_changes: dict[str, list[Any]] = {}
    removed: dict[str, dict[str, Any]] = {}
    sidecar: dict[str, Tensor]
    if slice_units:
        plan = _structured_plan(model, src.masks)
        for s in plan.slices:
            if s.key in state:  # biases exist on some models only
                state[s.key] = state[s.key].index_select(s.dim, s.index.to(state[s.key].device)).contiguous()
        for key, value in plan.config.items():
            old = getattr(config, key, None)
            if old != value:
                config_changes[key] = [old, value]
            setattr(config, key, value)
        _check_config_valid(config, config_changes)
        removed, sidecar, sidecar_name = plan.removed, plan.unit_masks, UNIT_MASKS_FILE
    else:
        sidecar, sidecar_name = {n: m.cpu().contiguous() for n, m in src.masks.items()}, MASKS_FILE

    config, new_model, bias_changes, zero_filled = _fit_biases(config, state, dtype)
    # A strict load into the vanilla class is the check that the edited config describes the tensors exactly.
    expected = set(new_model.state_dict())
    extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if extra or missing:
        raise ValueError(
            f"The exported {type(new_model).__name__} does not match the tensors: no place for {extra[:3]}, "
            f"nothing for {missing[:3]}."
        )
    new_model.load_state_dict(state, strict=True, assign=True)
    new_model.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new_model.generation_config = copy.deepcopy(model.generation_config)
    after = _count(dict(new_model.state_dict()))

    layer_sparsity = {n: 1.0 - m.float().mean().item() for n, m in src.masks.items()}
    total = sum(m.numel() for m in src.masks.values())
    pruned = sum(int((~m).sum()) for m in src.masks.values())
    report: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "mode": "structured" if slice_units else "masked",
        "granularity": src.granularity,
        "source": src.origin,
        "architecture": type(new_model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "params_before": before["params"],
        "params_after": after["params"],
        "params_removed": before["params"] - after["params"],
        "nonzero_params_before": before["nonzero"],
        "nonzero_params_after": after["nonzero"],
        "bytes_before": before["bytes"],
        "bytes_after": after["bytes"],
        "size_ratio": after["bytes"] / before["bytes"],
        "target_params": total,
        "pruned_params": pruned,
        "global_sparsity": pruned / total if total else 0.0,
        "layer_sparsity": layer_sparsity,
        "removed": removed,
        "config_changes": config_changes,
        "bias_changes": bias_changes,
        "zero_biases_added": zero_filled,
        "lora_merged": src.lora_merged,
        "notes": [],
        "files": [],
        "pruning": src.pruning,
        "source_report": src.source_report,
    }
    if src.lora_merged is not None:
        report["notes"].append(
            f"PEFT adapter merged into the base ({len(src.lora_merged)} LoRA layers) and the masks re-applied "
            "after the merge, so the exported weights keep the base model's sparsity."
        )
    if slice_units:
        report["notes"].append(
            f"Structured: {report['params_removed']} parameters physically removed; unit keep-masks in the "
            f"original numbering are in {UNIT_MASKS_FILE}."
        )
    if src.tokenizer is None:
        report["notes"].append("No tokenizer was given or found: only the model was written.")
    return _Export(new_model, src, sidecar, sidecar_name, slice_units, report)


def _is_2_4(masks: dict[str, Tensor]) -> bool:
    """Every mask keeps exactly 2 of each 4 consecutive inputs (what the sparse-24-bitmask format stores)."""
    for mask in masks.values():
        rows, cols = mask.shape
        if cols % 4 or not torch.all(mask.reshape(rows, cols // 4, 4).sum(-1) == 2):
            return False
    return True


def _write_export(exp: _Export, folder: Path, compressed: bool, gguf_type: str | None = None) -> None:
    """Write the model, tokenizer, sidecar and report of ``exp`` into the existing empty ``folder``.

    With ``compressed`` the pruned weights are stored in compressed-tensors' sparse bitmask format (2:4 format for 2:4
    masks) and no bool sidecar is written: the bitmask in the checkpoint already says which weights are kept.
    """
    src, report = exp.src, exp.report
    if gguf_type is not None:
        from grpo_prune.gguf_export import write_gguf

        written = write_gguf(
            exp.model, folder / f"model-{gguf_type}.gguf", tokenizer=src.tokenizer, gguf_type=gguf_type
        )
        report["weights_format"] = f"gguf-{gguf_type}"
        report["gguf"] = written
        report["file_bytes"] = written["file_bytes"]
        report["notes"].append(
            f"GGUF {gguf_type} for llama.cpp ({written['architecture']}), tokenizer and chat template inside: "
            f"`llama-cli -m {written['file']}`; transformers reads it with from_pretrained(folder, "
            f"gguf_file={written['file']!r})."
            + (" The pruned weights are stored as zeros (GGUF has no sparse type)." if not exp.sliced else "")
            + (
                f" {len(written['f16_fallback'])} matrices kept in F16 (rows not whole blocks)."
                if written["f16_fallback"]
                else ""
            )
        )
        report["notes"] += written["notes"]
        report["files"] = sorted(p.name for p in folder.iterdir()) + [REPORT_FILE]
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        return
    exp.model.save_pretrained(folder)
    if src.tokenizer is not None:
        src.tokenizer.save_pretrained(folder)
    report["weights_format"] = "dense"
    if compressed:
        from grpo_prune.compress import SPARSE_24_BITMASK, SPARSE_BITMASK, compress_checkpoint_

        two_four = src.granularity == "n:m" and _is_2_4(src.masks)
        fmt = SPARSE_24_BITMASK if two_four else SPARSE_BITMASK
        structure = "2:4" if two_four else "unstructured"
        if src.granularity == "n:m" and not two_four:
            structure = report["pruning"].get("settings", {}).get("n_m", "unstructured")
        dense_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        linears = [n for n, m in exp.model.named_modules() if isinstance(m, nn.Linear)]
        ignore = sorted(n for n in linears if n not in src.masks)
        compress_checkpoint_(
            folder, src.masks, fmt, structure=structure, global_sparsity=report["global_sparsity"], ignore=ignore
        )
        report["weights_format"] = fmt
        report["dense_file_bytes"] = dense_bytes
        report["notes"].append(
            f"Weights in compressed-tensors' {fmt} format (layout in grpo_prune/compress.py): load them with "
            "grpo_prune.compress.load_compressed(folder), which restores the dense masked weights exactly. The "
            f"bitmask in the checkpoint is the mask, so no {MASKS_FILE} is written."
        )
    else:
        meta = {"format": EXPORT_FORMAT, "granularity": src.granularity, "kind": "units" if exp.sliced else "weights"}
        save_file(exp.sidecar, str(folder / exp.sidecar_name), metadata=meta)
    report["files"] = sorted(p.name for p in folder.iterdir()) + [REPORT_FILE]
    report["file_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.name != exp.sidecar_name)
    if compressed:
        report["compressed_ratio"] = report["file_bytes"] / report["dense_file_bytes"]
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------------------------


def export_pruned(
    model_or_checkpoint_dir: nn.Module | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    pruner: Any = None,
    tokenizer: Any = None,
    structured: bool | str = "auto",
    compressed: bool = False,
    gguf_type: str | None = None,
) -> dict[str, Any]:
    """Write a pruned model as a vanilla transformers checkpoint (see the module docstring for the formats).

    Args:
        model_or_checkpoint_dir: either a checkpoint folder written by ``MamaGRPOTrainer.save_model`` or
            ``save_pretrained`` + ``Pruner.save`` (``config.json``, weights, ``pruner_state.*``, optionally
            ``pruning_report.json`` and tokenizer files); or an in-memory causal LM (a ``peft`` model is merged
            on a copy and re-masked), then with ``pruner``.
        output_dir: folder to create; an earlier export there is replaced, anything else is refused.
        pruner: in-memory input only: the :class:`~grpo_prune.pruning.pruner.Pruner` that pruned the model
            (``trainer.pruner``) or the :class:`~grpo_prune.pruning.oneshot.PruneReport` of ``prune_oneshot``
            (its ``masks``).
        tokenizer: saved beside the model; by default the checkpoint folder's own tokenizer, if any.
        structured: ``"auto"`` slices when the granularity is ``"structured"`` and writes zeros otherwise;
            ``True`` requires slicing; ``False`` always writes the full-size model with zeros and the mask sidecar.
        compressed: store the pruned weights of an unstructured or N:M export in compressed-tensors' sparse bitmask
            format (``sparse-24-bitmask`` for 2:4) instead of dense zeros: about ``(1 - s) + 1 / (8 * bytes per
            value)`` of their dense size; load with :func:`grpo_prune.compress.load_compressed`.
        gguf_type: instead of safetensors, write one GGUF file ``model-<type>.gguf`` for llama.cpp (``"F32"``,
            ``"F16"``, ``"BF16"``, ``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``; :mod:`grpo_prune.gguf_export`), sliced for
            structured pruning, with the tokenizer (required) and chat template inside.

    Returns:
        the report written to ``output_dir/pruning_report.json``: ``format``, ``mode`` (``"structured"`` or
        ``"masked"``), ``params_before/after`` and ``bytes_before/after`` (unique tensors, tied ones once, in the
        model's dtype), ``nonzero_params_before/after``, ``global_sparsity`` and ``layer_sparsity`` (fraction of
        each target weight pruned), ``removed`` (per decoder layer: MLP neurons removed, query/KV head indices
        removed), ``config_changes`` (field -> [before, after]), ``bias_changes``, ``zero_biases_added``,
        ``lora_merged``, ``files``, ``file_bytes`` (bytes of the weight files as written), ``weights_format``
        (``"dense"``, ``"sparse-bitmask"`` or ``"sparse-24-bitmask"``; compressed also gives ``dense_file_bytes`` and
        ``compressed_ratio``), ``pruning`` (the pruner's summary) and ``source_report``.

    Raises:
        ValueError: a folder without pruner state, an in-memory model without ``pruner``, ``structured=True`` on
            non-structured masks, masks that are not whole units, units kept in different numbers per layer, or
            ``compressed`` with a structured export that slices.
    """
    if structured not in ("auto", True, False):
        raise ValueError(f"`structured` must be 'auto', True or False, got {structured!r}.")
    output_dir = Path(output_dir)
    if isinstance(model_or_checkpoint_dir, (str, os.PathLike)):
        if pruner is not None:
            raise ValueError(
                "`pruner` is for in-memory models; a checkpoint folder carries its own pruner state "
                "(pruner_state.json / pruner_state.safetensors)."
            )
        source_dir: Path | None = Path(model_or_checkpoint_dir)
        _check_output(output_dir, source_dir)
        src = _source_from_checkpoint(source_dir, tokenizer)
    elif isinstance(model_or_checkpoint_dir, nn.Module):
        _check_output(output_dir, None)
        src = _source_from_memory(model_or_checkpoint_dir, pruner, tokenizer)
    else:
        raise TypeError(
            "`model_or_checkpoint_dir` must be a checkpoint folder or a torch model, got "
            f"{type(model_or_checkpoint_dir).__name__}."
        )

    if compressed and src.granularity == "structured" and structured in ("auto", True):
        raise ValueError(
            "A structured export is already physically smaller (units sliced out); --format compressed is for "
            "unstructured and N:M masks. Pass structured=False (--structured false) to compress the zeros form."
        )
    if gguf_type is not None:
        from grpo_prune.gguf_export import GGUF_TYPES

        if compressed:
            raise ValueError("`compressed` and `gguf_type` are two different formats: choose one.")
        if gguf_type not in GGUF_TYPES:
            raise ValueError(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
        if src.tokenizer is None:
            raise ValueError("A GGUF export needs the tokenizer: pass tokenizer= (the checkpoint folder has none).")
    exp = _prepare(src, structured)
    write_dir_atomically(output_dir, lambda tmp: _write_export(exp, tmp, compressed, gguf_type))
    return exp.report


def write_final_model(
    model: nn.Module,
    output_dir: str | os.PathLike[str],
    *,
    pruner: Any,
    tokenizer: Any = None,
    run_report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write what a training run ships into ``output_dir`` (``MamaGRPOTrainer.save_model``), beside whatever else
    the folder holds (``checkpoint-*``, logs): the masked export of :func:`export_pruned` at full size (model with
    exact zeros, ``pruning_masks.safetensors``, tokenizer) and ``pruning_report.json``, without the pruner's
    training state (that lives in the ``checkpoint-*`` folders).

    The report is ``run_report`` (the trainer's: events, rewards, distillation) updated with the export's fields, so
    ``grpo-prune export output_dir ...`` can later slice, compress or re-export it. Structured pruning is written at
    full size too (same architecture as in training); ``grpo-prune export`` slices it.

    Files are written into a temporary subfolder and moved in one by one (each ``os.replace`` is atomic); weight
    files of an earlier final save that the new one does not write (other shard counts) are removed.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    src = _source_from_memory(model, pruner, tokenizer)
    exp = _prepare(src, structured=False)
    exp.report.pop("source_report", None)
    exp.report = {**(run_report or {}), **exp.report}
    previous: list[str] = []
    report_path = output_dir / REPORT_FILE
    if report_path.is_file():
        try:
            old = json.loads(report_path.read_text())
            previous = old.get("files", []) if old.get("format") == EXPORT_FORMAT else []
        except ValueError:
            previous = []
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=output_dir))
    try:
        _write_export(exp, tmp, compressed=False)
        relax_private_modes(tmp)  # safetensors' save_file writes 0600 files; users ship this folder
        written = sorted(p.name for p in tmp.iterdir())
        # The report last: a reader that finds the new report finds the files it lists.
        for name in [n for n in written if n != REPORT_FILE] + [REPORT_FILE]:
            os.replace(tmp / name, output_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in set(previous) - set(written):
        if name.endswith((".safetensors", ".safetensors.index.json")) and (output_dir / name).is_file():
            (output_dir / name).unlink()
    return exp.report


def main(argv: list[str] | None = None) -> int:
    """``grpo-prune export CHECKPOINT_DIR OUTPUT_DIR [--structured auto|true|false] [--format dense|compressed]``;
    returns the exit status."""
    parser = OneLineArgumentParser(
        prog="grpo-prune export",
        description="Export a pruned checkpoint (MamaGRPOTrainer.save_model or save_pretrained + Pruner.save) as a "
        "vanilla transformers checkpoint: zeros + mask sidecar, or a physically smaller model for structured pruning.",
    )
    parser.add_argument(
        "checkpoint_dir",
        help="folder with config.json, the weights and pruner_state.* (a checkpoint-* folder) or "
        "pruning_masks.safetensors (a run's final output_dir, or an earlier export)",
    )
    parser.add_argument("output_dir", help="folder to write (an earlier export there is replaced)")
    parser.add_argument(
        "--structured",
        choices=("auto", "true", "false"),
        default="auto",
        help="auto: slice structured pruning, zeros otherwise; true: require slicing; false: always zeros",
    )
    parser.add_argument(
        "--format",
        choices=("dense", "compressed", "gguf"),
        default="dense",
        help="dense: pruned weights as zeros (loads anywhere); compressed: compressed-tensors sparse bitmask "
        "(2:4 format for 2:4 masks), about half the bytes of the pruned layers at 50%% sparsity, loaded with "
        "grpo_prune.compress.load_compressed; gguf: one GGUF file for llama.cpp (see --gguf-type)",
    )
    parser.add_argument(
        "--gguf-type",
        choices=("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"),
        default="F16",
        help="tensor type of --format gguf (default F16; Q4_0/Q4_1 are 4-bit)",
    )
    args = parser.parse_args(argv)
    structured = {"auto": "auto", "true": True, "false": False}[args.structured]
    # A bad checkpoint raises ValueError / FileNotFoundError / FileExistsError: `grpo_prune.cli.main` shows it as
    # one line with exit status 2 (or the traceback with --debug).
    report = export_pruned(
        args.checkpoint_dir,
        args.output_dir,
        structured=structured,
        compressed=args.format == "compressed",
        gguf_type=args.gguf_type if args.format == "gguf" else None,
    )
    print(
        f"Exported {report['mode']} {report['architecture']} to {args.output_dir}: "
        f"{report['params_before'] / 1e6:.2f}M -> {report['params_after'] / 1e6:.2f}M parameters, "
        f"{report['bytes_before'] / 2**20:.1f} -> {report['bytes_after'] / 2**20:.1f} MiB, "
        f"{report['global_sparsity']:.1%} of the targeted weights pruned."
    )
    if report["weights_format"].startswith("gguf"):
        print(f"  {report['gguf']['file']}: {report['file_bytes'] / 2**20:.1f} MiB, {report['weights_format']}")
    elif report["weights_format"] != "dense":
        print(
            f"  weights in {report['weights_format']} format: {report['dense_file_bytes'] / 2**20:.1f} MiB dense -> "
            f"{report['file_bytes'] / 2**20:.1f} MiB on disk ({report['compressed_ratio']:.2f}x)"
        )
    for change, (old, new) in report["config_changes"].items():
        print(f"  {change}: {old} -> {new}")
    for note in report["bias_changes"] + report["notes"]:
        print(f"  {note}")
    return 0

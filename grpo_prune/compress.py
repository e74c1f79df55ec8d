"""Sparse checkpoints in compressed-tensors' bitmask formats (``grpo-prune export --format compressed``).

An unstructured or N:M export is a dense checkpoint full of zeros, no smaller than the original. This module rewrites
its pruned weights in the layout of compressed-tensors' sparse formats, the layout llm-compressor writes for sparse
models (``config.json`` ``quantization_config`` with ``quant_method: compressed-tensors`` and a ``sparsity_config``):

* ``sparse-bitmask`` (unstructured, and N:M other than 2:4): for a weight ``W [out, in]`` named ``{m}.weight`` the
  checkpoint holds ``{m}.compressed`` (the non-zero values, 1-D, row-major, in the weight's dtype), ``{m}.bitmask``
  (uint8 ``[out, ceil(in / 8)]``, bit ``j % 8`` of byte ``j // 8`` set where ``W[:, j] != 0``, little-endian bit
  order), ``{m}.row_offsets`` (int64 ``[out]``, where each row starts in ``compressed``) and ``{m}.shape`` (int64
  ``[2]``). (Exports of earlier versions put ``.weight`` before these suffixes; they still load here.)
* ``sparse-24-bitmask`` (2:4): ``{m}.compressed`` (the two kept values of every 4 inputs, ``[out, in / 2]``),
  ``{m}.bitmask`` (as above, exactly the 2:4 keep-mask) and ``{m}.shape`` (int64 ``[2, 1]``).

Per pruned weight this is ``(1 - s) * bytes_per_value + 1/8`` bytes instead of ``bytes_per_value``: at 50% sparsity
0.53x of fp32, 0.56x of bf16. Embeddings, norms and unpruned layers stay dense (they are listed in ``ignore``).

compressed-tensors (a dependency, imported on first use) supplies the bit packing (``pack_bitmasks`` / ``unpack_bitmasks``) and
the config schema (``BitmaskConfig`` / ``Sparse24BitMaskConfig``). Its releases from 0.15 on no longer ship the
sparse compressors themselves, and transformers 5.x's compressed-tensors loader reads quantized checkpoints only,
so :func:`load_compressed` (plain transformers plus the decompression here) is the way to load these checkpoints.

**Plain ``from_pretrained`` refuses the folder** instead of loading it wrong. transformers (5.25) ignores a
``sparsity_config`` and an unknown ``quant_method`` alike (a warning at most) and would freshly initialise every
pruned matrix, whose ``{m}.weight`` is absent. So the weights are written as ``model-sparse.safetensors`` (sharded:
``model-sparse.safetensors.index.json``), names transformers never looks for, and ``config.json`` carries
``transformers_weights`` set to a sentence that is not a file name: transformers 5.x raises a ``ValueError`` quoting
it (how to load the folder), older releases an ``OSError`` (no ``model.safetensors``). compressed-tensors 0.14's
``BitmaskCompressor.decompress`` reads the weight file when given its path. Exports of earlier versions (weights in
``model.safetensors``) still load here. docs/export.md weighs this against registering a transformers quantizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "NOT_FOR_FROM_PRETRAINED",
    "SPARSE_24_BITMASK",
    "SPARSE_BITMASK",
    "SPARSE_INDEX_NAME",
    "SPARSE_WEIGHTS_NAME",
    "compress_checkpoint_",
    "compress_state_dict",
    "decompress_state_dict",
    "load_compressed",
]

# compressed-tensors' CompressionFormat values, spelled out so that reading a report needs no import.
SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
_QUANT_METHOD = "compressed-tensors"
_INDEX_FILE = "model.safetensors.index.json"  # where earlier exports (and save_pretrained) put the shard index
_WEIGHTS_FILE = "model.safetensors"
SPARSE_WEIGHTS_NAME = "model-sparse.safetensors"
SPARSE_INDEX_NAME = "model-sparse.safetensors.index.json"
#: ``config.json`` ``transformers_weights`` of a compressed export: transformers 5.x refuses a value that is not a
#: safetensors file name and quotes it, so plain ``from_pretrained`` fails with this sentence instead of loading
#: freshly initialised matrices in place of the pruned ones.
NOT_FOR_FROM_PRETRAINED = (
    "(no such file) this is a grpo-prune compressed sparse export, which plain transformers would load with the "
    "pruned matrices freshly initialised; load it with grpo_prune.compress.load_compressed(folder)"
)


def _ct():
    """Import compressed-tensors on first use (it is an optional extra and slow to import)."""
    try:
        import compressed_tensors
        from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
        from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "The compressed export needs compressed-tensors (a dependency of grpo-prune): "
            "`pip install 'compressed-tensors>=0.15.0'`."
        ) from err
    return compressed_tensors, BitmaskConfig, Sparse24BitMaskConfig, pack_bitmasks, unpack_bitmasks


def compression_format(granularity: str, n_m: str | None) -> str:
    """The compressed-tensors format for a granularity: ``sparse-24-bitmask`` for 2:4, ``sparse-bitmask`` else."""
    return SPARSE_24_BITMASK if granularity == "n:m" and n_m == "2:4" else SPARSE_BITMASK


def compress_state_dict(state: dict[str, Tensor], masks: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Replace each masked ``{m}.weight`` of ``state`` by its compressed tensors (layout in the module docstring).

    Args:
        state: tensor name -> tensor (CPU), e.g. one safetensors file of a checkpoint; not modified.
        masks: module name -> bool keep-mask ``[out, in]`` (True = kept); modules absent from ``state`` are skipped.
        fmt: ``"sparse-bitmask"`` or ``"sparse-24-bitmask"``.

    Returns:
        a new dict: the compressed entries in place of the masked weights, every other tensor unchanged.
    """
    _, _, _, pack_bitmasks, _ = _ct()
    if fmt not in (SPARSE_BITMASK, SPARSE_24_BITMASK):
        raise ValueError(f"`fmt` must be {SPARSE_BITMASK!r} or {SPARSE_24_BITMASK!r}, got {fmt!r}.")
    out = dict(state)
    for name, mask in masks.items():
        key = f"{name}.weight"
        if key not in state:
            continue
        weight = out.pop(key).cpu()
        rows, cols = weight.shape
        if fmt == SPARSE_24_BITMASK:
            keep = mask.cpu().bool()
            if cols % 4 or not torch.all(keep.reshape(rows, cols // 4, 4).sum(-1) == 2):
                raise ValueError(f"{name}: the keep-mask is not 2:4 along the inputs; export with sparse-bitmask.")
            # The 2:4 mask itself, not the non-zeros: every group must store exactly two values, zero or not.
            out[f"{name}.compressed"] = weight[keep].reshape(rows, cols // 2).contiguous()
            out[f"{name}.bitmask"] = pack_bitmasks(keep)
            out[f"{name}.shape"] = torch.tensor([rows, cols]).reshape(-1, 1)
        else:
            # The non-zeros, as compressed-tensors defines the bitmask: a kept weight that is exactly zero costs
            # nothing and still decompresses to zero, so the round trip is exact either way.
            keep = weight != 0
            counts = keep.sum(dim=1)
            out[f"{name}.compressed"] = weight[keep].contiguous()
            out[f"{name}.bitmask"] = pack_bitmasks(keep)
            out[f"{name}.row_offsets"] = torch.cumsum(counts, 0) - counts
            out[f"{name}.shape"] = torch.tensor([rows, cols])
    return out


def decompress_state_dict(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Inverse of :func:`compress_state_dict`: every ``*.bitmask`` group becomes the dense ``{m}.weight`` again
    (zeros where the bitmask is clear); other tensors pass through."""
    _, _, _, _, unpack_bitmasks = _ct()
    out = dict(state)
    for key in [k for k in state if k.endswith(".bitmask")]:
        prefix = key.removesuffix(".bitmask")
        shape = [int(v) for v in out.pop(f"{prefix}.shape").flatten().tolist()]
        values = out.pop(f"{prefix}.compressed")
        keep = unpack_bitmasks(out.pop(key), shape)
        out.pop(f"{prefix}.row_offsets", None)  # sparse-bitmask only; the bitmask alone places the values
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[keep] = values.flatten()
        # Earlier exports named the sparse-bitmask tensors after the weight ({m}.weight.bitmask): still read.
        out[prefix if prefix.endswith(".weight") else f"{prefix}.weight"] = dense
    return out


def _sparsity_config(fmt: str, global_sparsity: float, structure: str, ignore: list[str]) -> dict[str, Any]:
    compressed_tensors, bitmask_config, sparse24_config, _, _ = _ct()
    cls = sparse24_config if fmt == SPARSE_24_BITMASK else bitmask_config
    sparsity = cls(targets=["Linear"], ignore=ignore, global_sparsity=global_sparsity, sparsity_structure=structure)
    return {
        "quant_method": _QUANT_METHOD,
        "version": compressed_tensors.__version__,
        "sparsity_config": sparsity.model_dump(),
    }


def compress_checkpoint_(
    folder: str | os.PathLike[str],
    masks: dict[str, Tensor],
    fmt: str,
    *,
    structure: str,
    global_sparsity: float,
    ignore: list[str],
    skip: tuple[str, ...] = (),
) -> int:
    """Rewrite the weights of a ``save_pretrained`` folder in place in format ``fmt``; returns their bytes after.

    Every ``*.safetensors`` file except those named in ``skip`` (e.g. the mask sidecar) is rewritten, the single
    weight file renamed :data:`SPARSE_WEIGHTS_NAME` (or the shard index :data:`SPARSE_INDEX_NAME`, updated), and
    ``config.json`` given the ``quantization_config`` that names the format and the ``transformers_weights`` that
    makes plain ``from_pretrained`` refuse the folder (module docstring).

    Args:
        masks: module name -> bool keep-mask ``[out, in]`` of the pruned ``nn.Linear`` layers.
        structure: ``"unstructured"`` or the N:M pattern (``"2:4"``), for ``sparsity_structure``.
        global_sparsity: fraction of the compressed layers' weights pruned.
        ignore: ``nn.Linear`` layers left dense (compressed-tensors' ``ignore``: ``lm_head``, unpruned layers).
    """
    folder = Path(folder)
    index_path = folder / _INDEX_FILE
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    total = 0
    written: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        if path.name in skip:
            continue
        compressed = compress_state_dict(load_file(path), masks, fmt)
        save_file(compressed, str(path), metadata={"format": "pt"})
        total += path.stat().st_size
        written.update(compressed)
        if index is not None:
            index["weight_map"].update({key: path.name for key in compressed})
    if index is not None:
        # The dense weights that were compressed are gone from the shards: drop them from the map too.
        index["weight_map"] = {k: v for k, v in sorted(index["weight_map"].items()) if k in written}
        index.setdefault("metadata", {})["total_size"] = total
        (folder / SPARSE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        index_path.unlink()
    else:
        os.replace(folder / _WEIGHTS_FILE, folder / SPARSE_WEIGHTS_NAME)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = _sparsity_config(fmt, global_sparsity, structure, ignore)
    config["transformers_weights"] = NOT_FOR_FROM_PRETRAINED
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return total


def compressed_format(folder: str | os.PathLike[str]) -> str | None:
    """The sparse format (``"sparse-bitmask"`` / ``"sparse-24-bitmask"``) of a compressed export folder, or None
    when the folder's ``config.json`` does not name one (or there is no readable ``config.json``)."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qconfig = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != _QUANT_METHOD:
        return None
    fmt = (qconfig.get("sparsity_config") or {}).get("format")
    return fmt if fmt in (SPARSE_BITMASK, SPARSE_24_BITMASK) else None


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a compressed export: this version's names, else an earlier version's (sidecars such as
    ``pruning_masks.safetensors`` sit beside them and are not weights)."""
    for index_name, single in ((SPARSE_INDEX_NAME, SPARSE_WEIGHTS_NAME), (_INDEX_FILE, _WEIGHTS_FILE)):
        index_path = folder / index_name
        if index_path.is_file():
            try:
                names = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"{index_path} is not a readable shard index ({err!r}): the export is damaged."
                ) from err
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ValueError(
                    f"{folder}: the shard index lists {missing[:3]}, which are missing: an incomplete copy?"
                )
            return [folder / n for n in names]
        if (folder / single).is_file():
            return [folder / single]
    raise ValueError(
        f"{folder} has a compressed-export config.json but no weights ({SPARSE_WEIGHTS_NAME} or "
        f"{SPARSE_INDEX_NAME}): an incomplete copy?"
    )


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors_rust.SafetensorError: truncated, or not a safetensors file at all
        raise ValueError(
            f"{path} is not a complete safetensors file ({err}): truncated or damaged; export the model again."
        ) from err


def load_compressed(folder: str | os.PathLike[str], dtype: torch.dtype | str = "auto") -> nn.Module:
    """Load a checkpoint written by ``grpo-prune export --format compressed`` as a plain dense causal LM.

    The pruned weights come back exactly (zeros where pruned); the model has no quantization config and behaves like
    any ``from_pretrained`` model. ``dtype="auto"`` keeps the stored dtype.

    Raises:
        ValueError: the folder is not a compressed export (a dense or sliced export: load that with
            ``from_pretrained``), a weight file is missing, truncated or damaged, or the decompressed tensors do not
            fit the model that ``config.json`` describes. Never a partly initialised model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: not a model folder, let alone a compressed export.")
    fmt = compressed_format(folder)
    if fmt is None:
        raise ValueError(
            f"{folder} is not a compressed export (config.json quantization_config.sparsity_config.format must be "
            f"{SPARSE_BITMASK!r} or {SPARSE_24_BITMASK!r}); a dense or sliced export loads with "
            "AutoModelForCausalLM.from_pretrained(folder)."
        )
    state: dict[str, Tensor] = {}
    for path in _weight_files(folder):
        state.update(_read_weights(path))
    try:
        state = decompress_state_dict(state, fmt)
    except (KeyError, RuntimeError, ValueError, IndexError) as err:
        raise ValueError(
            f"{folder}: the compressed tensors are inconsistent ({err!r}): the export is damaged."
        ) from err
    config = AutoConfig.from_pretrained(folder)
    # Without this transformers would route the model through its compressed-tensors quantizer.
    for attr in ("quantization_config", "transformers_weights"):
        if hasattr(config, attr):
            delattr(config, attr)
    if dtype == "auto":
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    expected = model.state_dict()
    wrong_shape = [
        f"{k}: {tuple(v.shape)} in the file, {tuple(expected[k].shape)} in the model"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state) - tied)
    if wrong_shape or unexpected or missing:
        raise ValueError(
            f"{folder}: the decompressed tensors do not match the {type(model).__name__} of its config.json: "
            f"shapes {wrong_shape[:2]}, unexpected {unexpected[:3]}, missing {missing[:3]}."
        )
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()

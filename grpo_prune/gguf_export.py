"""Write a causal LM as a GGUF file for llama.cpp and the tools built on it (``grpo-prune export --format gguf``).

Written with the ``gguf`` library's :class:`gguf.GGUFWriter` (the writer llama.cpp's own converter uses), following
the layout of llama.cpp's ``convert_hf_to_gguf.py`` for the three families exported here:

* ``llama`` (SmolLM2, Llama; optional biases): the query and key rows are permuted from transformers' rotate-half
  order to llama.cpp's interleaved rotary order, as llama.cpp's converter does (readers undo it).
* ``qwen2`` (q/k/v biases): no permutation (llama.cpp runs Qwen2 with NeoX rotary, like transformers). llama.cpp's
  qwen2 wants attention as wide as ``hidden_size``, so a Qwen2 with heads sliced out is written as ``llama`` (the
  same computation once permuted, with the q/k/v biases llama.cpp's llama reads).
* ``gemma3`` (Gemma 3 text): RMSNorm weights are stored as ``1 + w`` (llama.cpp multiplies by the stored weight;
  transformers' Gemma norm multiplies by ``1 + w``). llama.cpp fixes the layer pattern (every sixth layer global,
  the others sliding-window), so a config whose ``layer_types`` differ is refused.

Tensor names come from ``gguf``'s own name map (``gguf.get_tensor_name_map``). The tokenizer (tokens, token types,
merges or scores, special ids) and the chat template go in the metadata, so the file is complete on its own.

Sliced (structured) exports carry their smaller ``feed_forward_length`` and head counts, and ``key_length`` /
``value_length`` (= ``head_dim``, which no longer equals ``hidden_size / heads``). transformers' configs have one
size for all layers, so :func:`grpo_prune.export.export_pruned` refuses uneven slicing before this module is
reached, and :func:`write_gguf` checks the weights again. (GGUF metadata can hold per-layer arrays; whether
llama.cpp's loaders for these three architectures size tensors from them was not tested, so they are not written.)

Types: ``F32``, ``F16``, ``BF16``, ``Q8_0`` and the 4-bit ``Q4_0`` / ``Q4_1`` (the block types gguf 0.19's
``quants.quantize`` implements in numpy; the K-quants have no quantiser there). As in llama.cpp's converter, 1-D
tensors (norms, biases) stay F32, and a matrix whose rows are not a whole number of 32-value blocks (a sliced
``intermediate_size`` such as 1152 is fine, 1000 is not) falls back to F16 (F32 for ``F32``); the report lists them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["GGUF_TYPES", "gguf_architecture", "write_gguf"]

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# transformers model_type -> GGUF architecture name (gguf.MODEL_ARCH_NAMES values).
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
_FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
}


def gguf_architecture(config: Any) -> str:
    """The GGUF architecture for a transformers config; ValueError for a family this writer does not cover."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":  # the multimodal wrapper's config; its text part is what we write
        model_type = "gemma3_text"
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF export covers {sorted(_ARCHITECTURES)} models; this is {model_type!r}. Export the safetensors "
            "form (--format dense) and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    return _ARCHITECTURES[model_type]


def _rope_theta(config: Any) -> float:
    """The RoPE base of the (global) attention layers; ValueError for RoPE scaling, which needs tensors llama.cpp's
    converter computes per scaling type, and for a Gemma 3 local base other than the 10000 llama.cpp hard-codes."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "full_attention" in params:  # Gemma 3: per layer type
        local = (params.get("sliding_attention") or {}).get("rope_theta", 10000.0)
        if float(local) != 10000.0:
            raise ValueError(f"llama.cpp runs Gemma 3's sliding layers with RoPE base 10000, this model {local}.")
        for kind in ("full_attention", "sliding_attention"):
            if (params.get(kind) or {}).get("rope_type", "default") != "default":
                raise ValueError(
                    f"RoPE scaling on {kind} is not written by this GGUF export; export --format dense and convert "
                    "with llama.cpp's convert_hf_to_gguf.py."
                )
        params = params["full_attention"]
    rope_type = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if rope_type not in ("default", None):
        raise ValueError(
            f"RoPE scaling {rope_type!r} is not written by this GGUF export (llama.cpp needs extra tensors for it); "
            "export --format dense and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _check_gemma3(config: Any) -> None:
    layer_types = list(getattr(config, "layer_types", None) or [])
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types and layer_types != expected:
        raise ValueError(
            f"llama.cpp runs Gemma 3 with every sixth layer global and the others sliding-window; this model's "
            f"layer_types are {layer_types}, which a GGUF file cannot describe."
        )
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, field, None):
            raise ValueError(f"Gemma 3 with {field} is not written by this GGUF export.")
    if getattr(config, "query_pre_attn_scalar", None) not in (None, config.head_dim):
        raise ValueError(
            f"llama.cpp scales Gemma 3 attention by 1/sqrt(head_dim), but query_pre_attn_scalar is "
            f"{config.query_pre_attn_scalar} (head_dim {config.head_dim})."
        )


def _permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half row order -> llama.cpp's interleaved order, per head (as convert_hf_to_gguf)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------------------- tokenizer
def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, arch: str, model_type: str) -> list[str]:
    """Write the tokenizer into the metadata; returns notes for the report."""
    import gguf

    if tokenizer is None:
        raise ValueError(
            "A GGUF file needs the tokenizer (llama.cpp and transformers' GGUF reader take it from the file): pass "
            "tokenizer= or export from a folder that holds one."
        )
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"GGUF export needs a fast tokenizer (tokenizer.json), got {type(tokenizer).__name__}.")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(
            f"The tokenizer is a {model.get('type')} model; GGUF holds byte-level BPE (tokenizer.ggml.model gpt2) "
            "and SentencePiece-style BPE (llama) vocabularies only."
        )
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"The tokenizer has {len(vocab)} tokens but the model's vocab_size is {vocab_size}.")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:  # embedding rows past the tokenizer (padding to a multiple): never produced
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].get("special") else gguf.TokenType.USER_DEFINED)
        elif model.get("byte_fallback") and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    notes: list[str] = []
    if model.get("byte_fallback"):
        # SentencePiece-style: llama.cpp's "llama" tokenizer ranks merges by score; the vocabulary order is
        # the merge order for these files (transformers rebuilds the merges the same way).
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([-float(i) for i in range(vocab_size)])
    else:
        writer.add_tokenizer_model("gpt2")
        pre, recognised = _bpe_pre(spec, model_type)
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
        if not recognised:
            notes.append(
                f"The tokenizer's pre-tokenizer ({json.dumps(spec.get('pre_tokenizer'))[:120]}) has no llama.cpp "
                f"name here; written as tokenizer.ggml.pre={pre!r}: llama.cpp may split some text differently."
            )
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name, setter in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            setter(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    return notes


def _bpe_pre(spec: dict[str, Any], model_type: str) -> tuple[str, bool]:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before its merges (``tokenizer.ggml.pre``),
    and whether it was recognised. ``gpt-2`` for GPT-2's regex (``ByteLevel(use_regex=True)`` alone), ``smollm``
    for single digits then GPT-2 (the SmolLM2 hub tokenizer), ``llama-bpe`` / ``qwen2`` for those regexes; anything
    else is written as ``default`` and reported, since llama.cpp may then split some text differently."""
    try:  # the regexes transformers' GGUF reader uses for these names (an internal module: optional)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # pragma: no cover - other transformers layouts
        GGUF_PRE_TOKENIZER_SPLITS = {}

    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2", True
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm", True
    if kinds and kinds[0] == "Split":
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2"):
            if regex is not None and regex == GGUF_PRE_TOKENIZER_SPLITS.get(name):
                return name, True
    return ("qwen2", False) if model_type == "qwen2" else ("default", False)


# ---------------------------------------------------------------------------------------------------------- weights
def _quantize(name: str, data: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any, bool]:
    """(data to write, raw type or None, fell back) for one tensor."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[gguf_type]
    if data.ndim < 2 or gguf_type == "F32":
        return data.astype(np.float32), None, False
    if gguf_type == "F16":
        return data.astype(np.float16), None, False
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        return data.astype(np.float16), None, True
    return quants.quantize(data.astype(np.float32), qtype), qtype, False


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    tokenizer: Any,
    gguf_type: str = "F16",
    name: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a Llama, Qwen2 or Gemma 3 causal LM, possibly sliced by the structured export) as a GGUF
    file at ``path``; returns what was written (``gguf_type``, ``architecture``, ``file_bytes``, ``tensors``,
    ``f16_fallback``: matrices kept in F16 because their rows are not whole quantisation blocks, ``notes``).

    Raises:
        ValueError: an architecture, RoPE scaling, Gemma 3 layer pattern or tokenizer that GGUF/llama.cpp cannot
            represent, per-layer sizes that differ, or an unknown ``gguf_type``. Nothing is written then.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"`gguf_type` must be one of {', '.join(GGUF_TYPES)}, got {gguf_type!r}.")
    config = model.config
    arch = gguf_architecture(config)
    if arch == "gemma3":
        _check_gemma3(config)
    theta = _rope_theta(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    n_layers = config.num_hidden_layers
    arch_notes = []
    if arch == "qwen2" and heads * head_dim != config.hidden_size:
        # llama.cpp's qwen2 wants hidden_size-wide attention; its llama reads key_length and optional biases, and
        # Qwen2 is Llama with q/k/v biases (the rotary permutation below turns NeoX order into llama's).
        arch = "llama"
        arch_notes.append(
            "Qwen2 with attention heads sliced out is written as llama.cpp's llama architecture (the same "
            "computation), since llama.cpp's qwen2 expects attention as wide as hidden_size."
        )

    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    # One size per layer: what every reader of these architectures assumes (and the sliced export guarantees).
    for i in range(n_layers):
        p = f"model.layers.{i}"
        got = (
            state[f"{p}.mlp.up_proj.weight"].shape[0],
            state[f"{p}.self_attn.q_proj.weight"].shape[0] // head_dim,
            state[f"{p}.self_attn.k_proj.weight"].shape[0] // head_dim,
        )
        if got != (config.intermediate_size, heads, kv_heads):
            raise ValueError(
                f"Layer {i} has [intermediate, heads, kv_heads] = {list(got)}, the config "
                f"{[config.intermediate_size, heads, kv_heads]}: llama.cpp's {arch} needs one size for every layer."
            )

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or getattr(config, "_name_or_path", "") or arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3" and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    notes = arch_notes + _add_tokenizer(writer, tokenizer, config.vocab_size, arch, config.model_type)
    if arch == "llama" and any(k.endswith(".bias") for k in state):
        notes.append(
            "Llama with biases (compensation): llama.cpp reads the optional llama biases, but transformers' GGUF "
            "reader (5.25) drops them and would compute something else; check this file in llama.cpp."
        )

    fallback = []
    count = 0
    for key, tensor in state.items():
        module, _, suffix = key.rpartition(".")
        gguf_name = mapping.get_name(module)
        if gguf_name is None:
            raise ValueError(f"No GGUF name for {key} in llama.cpp's {arch} layout.")
        data = tensor.numpy()
        if arch == "llama" and module.endswith("self_attn.q_proj"):
            data = _permute_rotary(data, heads)
        elif arch == "llama" and module.endswith("self_attn.k_proj"):
            data = _permute_rotary(data, kv_heads)
        if arch == "gemma3" and module.endswith("norm"):
            data = data + 1.0
        out, raw_dtype, fell_back = _quantize(key, data, gguf_type)
        if fell_back:
            fallback.append(key)
        writer.add_tensor(f"{gguf_name}.{suffix}", out, raw_dtype=raw_dtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "gguf_type": gguf_type,
        "architecture": arch,
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "tensors": count,
        "f16_fallback": fallback,
        "notes": notes,
    }

"""Which modules of a decoder-only model are prunable, and how they group into structural units.

Targets (unstructured and N:M pruning): every ``nn.Linear`` inside the decoder layers (``q/k/v/o_proj``,
``gate/up/down_proj`` on Llama/Qwen2/Mistral-like models). Embeddings, ``lm_head`` and norms are never targets:
``lm_head`` is often tied to the embeddings, and norms are vectors with no redundancy to remove. User patterns are
matched with ``re.search`` against the module names of those decoder-layer linears only.

Structural units (structured pruning), per decoder layer:

- **MLP neuron** ``i`` of the intermediate dimension: row ``i`` of ``gate_proj`` and ``up_proj``, column ``i`` of
  ``down_proj``. Removing it leaves a vanilla MLP with a smaller ``intermediate_size``.
- **Query head** ``h``: rows ``h*head_dim:(h+1)*head_dim`` of ``q_proj`` and the same columns of ``o_proj``.
  With grouped-query attention (``num_key_value_heads = K < num_attention_heads = H``) query head ``h`` reads KV
  head ``h // (H // K)``. To keep a config that loads as vanilla Llama/Qwen2 (one ``num_attention_heads``, one
  ``num_key_value_heads``, contiguous groups), heads are pruned **in equal numbers in every KV group**: each of the
  ``K`` groups keeps the same ``r' < r = H // K`` query heads, so the sliced model has ``H' = K * r'`` heads and the
  same ``K`` KV heads (``k_proj``/``v_proj`` are never pruned). Reachable head sparsities are therefore the
  multiples of ``1 / r``; a request between them is refused (``ValueError``) rather than rounded up or down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

__all__ = [
    "HeadGroup",
    "MLPGroup",
    "decoder_layers",
    "default_target_names",
    "head_groups",
    "mlp_groups",
    "resolve_targets",
]

_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
_ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class MLPGroup:
    """The MLP neurons of one decoder layer.

    Attributes:
        prefix: module name of the MLP block (``"model.layers.3.mlp"``): the group's key in unit masks and scores.
        gate, up, down: full module names of the three projections.
        num_units: intermediate size ``I``; unit ``i`` = row ``i`` of gate and up, column ``i`` of down.
    """

    prefix: str
    gate: str
    up: str
    down: str
    num_units: int

    @property
    def producers(self) -> tuple[str, str]:
        """Layers whose output rows are the units (dim 0)."""
        return (self.gate, self.up)

    @property
    def consumer(self) -> str:
        """Layer whose input columns are the units (dim 1): the one that receives compensation."""
        return self.down


@dataclass(frozen=True)
class HeadGroup:
    """The query heads of one attention block (GQA-aware).

    Attributes:
        prefix: module name of the attention block (``"model.layers.3.self_attn"``).
        q, k, v, o: full module names of the projections.
        num_heads: ``H`` query heads (``num_units``); head ``h`` = rows ``h*d:(h+1)*d`` of q, same columns of o.
        num_kv_heads: ``K`` KV heads; query heads ``g*r .. (g+1)*r - 1`` share KV head ``g``.
        head_dim: ``d``.
    """

    prefix: str
    q: str
    k: str
    v: str
    o: str
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def num_units(self) -> int:
        return self.num_heads

    @property
    def heads_per_kv(self) -> int:
        """``r = H // K``: query heads per KV group."""
        return self.num_heads // self.num_kv_heads

    @property
    def producers(self) -> tuple[str]:
        return (self.q,)

    @property
    def consumer(self) -> str:
        return self.o

    def heads_to_prune_per_kv(self, sparsity: float) -> int:
        """Query heads pruned in each KV group at head sparsity ``sparsity`` (floor: a schedule never overshoots)."""
        return int(sparsity * self.heads_per_kv + 1e-9)


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers as ``(module name, module)``, in order.

    Found as the ``nn.ModuleList`` with ``config.num_hidden_layers`` entries (``model.layers`` on Llama/Qwen2);
    without a config, the longest ``ModuleList`` whose name ends in ``layers`` or ``h``.
    """
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    candidates = [(n, m) for n, m in lists if n_layers is not None and len(m) == n_layers]
    if not candidates:
        candidates = sorted(
            ((n, m) for n, m in lists if n.split(".")[-1] in ("layers", "h")), key=lambda nm: -len(nm[1])
        )
    if not candidates:
        raise ValueError(
            f"Cannot find the decoder layers of {type(model).__name__}: expected an nn.ModuleList of "
            f"config.num_hidden_layers ({n_layers}) blocks (e.g. `model.layers`)."
        )
    name, layers = candidates[0]
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers)]


def default_target_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` inside the decoder layers, in module order."""
    names = []
    for prefix, layer in decoder_layers(model):
        names.extend(f"{prefix}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear))
    return names


def resolve_targets(model: nn.Module, patterns: list[str] | None = None) -> dict[str, nn.Linear]:
    """Prunable linear layers, by full module name.

    Args:
        model: the (unwrapped) causal LM.
        patterns: ``None`` for every decoder-layer linear; otherwise regexes, each matched with ``re.search``
            against the decoder-layer linear names. Every pattern must match at least one of them.

    Raises:
        ValueError: naming ``targets`` when a pattern is not a valid regex or matches nothing.
    """
    modules = dict(model.named_modules())
    names = default_target_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear inside its decoder layers: nothing to prune.")
    if patterns is None:
        return {n: modules[n] for n in names}
    if isinstance(patterns, str) or not patterns:
        raise ValueError(f"`targets` must be None or a non-empty list of regex strings, got {patterns!r}.")
    selected: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`targets` pattern {pattern!r} is not a valid regex: {err}") from err
        hits = [n for n in names if regex.search(n)]
        if not hits:
            raise ValueError(
                f"`targets` pattern {pattern!r} matches no linear layer inside the decoder layers "
                f"(e.g. {names[0]!r}, {names[-1]!r}); embeddings, lm_head and norms are never prunable."
            )
        selected.update(hits)
    return {n: modules[n] for n in names if n in selected}


def _find_blocks(model: nn.Module, child_names: tuple[str, ...]) -> list[tuple[str, dict[str, str]]]:
    """Per decoder layer, the submodule that owns all of ``child_names`` (e.g. ``mlp``), with their full names."""
    found = []
    for prefix, layer in decoder_layers(model):
        for sub_name, sub in layer.named_modules():
            children = dict(sub.named_children())
            if all(isinstance(children.get(c), nn.Linear) for c in child_names):
                block = f"{prefix}.{sub_name}" if sub_name else prefix
                found.append((block, {c: f"{block}.{c}" for c in child_names}))
                break
    return found


def _check_targeted(kind: str, blocks: list, needed: tuple[str, ...], targets: dict[str, nn.Linear]) -> list:
    """Keep the blocks whose needed projections are all targets; a partially targeted block is an error."""
    kept = []
    for block, names in blocks:
        hit = [c for c in needed if names[c] in targets]
        if len(hit) == len(needed):
            kept.append((block, names))
        elif hit:
            raise ValueError(
                f"`targets` select {hit} of {block} but structured {kind} units need {list(needed)} together "
                "(a unit spans all of them)."
            )
    if not kept:
        raise ValueError(
            f"Structured {kind} units need {list(needed)} of some decoder layer among `targets`; none found."
        )
    return kept


def mlp_groups(model: nn.Module, targets: dict[str, nn.Linear]) -> list[MLPGroup]:
    """MLP neuron groups of every decoder layer whose gate/up/down projections are all targets.

    Raises:
        ValueError: the model has no gated MLP, a layer is only partly targeted, or the shapes disagree.
    """
    blocks = _check_targeted("mlp", _find_blocks(model, _MLP_NAMES), _MLP_NAMES, targets)
    groups = []
    for block, names in blocks:
        gate, up, down = (targets[names[c]] for c in _MLP_NAMES)
        size = gate.out_features
        if up.out_features != size or down.in_features != size:
            raise ValueError(
                f"{block}: gate ({gate.out_features}), up ({up.out_features}) and down input ({down.in_features}) "
                "sizes differ; cannot group MLP neurons."
            )
        groups.append(MLPGroup(block, names["gate_proj"], names["up_proj"], names["down_proj"], size))
    return groups


def head_groups(model: nn.Module, targets: dict[str, nn.Linear]) -> list[HeadGroup]:
    """Query-head groups of every attention block whose q and o projections are targets.

    Reads ``num_attention_heads``, ``num_key_value_heads`` (default: no GQA) and ``head_dim`` (default
    ``hidden_size // num_attention_heads``) from ``model.config`` and checks them against the weight shapes.

    Raises:
        ValueError: missing config fields, ``H`` not a multiple of ``K``, fewer than 2 query heads per KV group
            (no head can go without emptying a group), or shapes that disagree with the config.
    """
    config = getattr(model, "config", None)
    n_heads = getattr(config, "num_attention_heads", None)
    if not n_heads:
        raise ValueError("Structured head pruning needs `model.config.num_attention_heads`.")
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv}).")
    if n_heads // n_kv < 2:
        raise ValueError(
            f"Each KV group has {n_heads // n_kv} query head: pruning one would remove the whole group and change "
            "num_key_value_heads; head pruning is not possible on this model (use structured_units='mlp')."
        )
    all_blocks = _find_blocks(model, _ATTN_NAMES)
    blocks = _check_targeted("heads", all_blocks, ("q_proj", "o_proj"), targets)
    groups = []
    for block, names in blocks:
        modules = dict(model.named_modules())
        q, k, v, o = (modules[names[c]] for c in _ATTN_NAMES)
        if q.out_features != n_heads * head_dim or o.in_features != n_heads * head_dim:
            raise ValueError(
                f"{block}: q_proj out ({q.out_features}) / o_proj in ({o.in_features}) != num_attention_heads "
                f"({n_heads}) * head_dim ({head_dim})."
            )
        if k.out_features != n_kv * head_dim or v.out_features != n_kv * head_dim:
            raise ValueError(
                f"{block}: k/v_proj out ({k.out_features}/{v.out_features}) != num_key_value_heads ({n_kv}) * "
                f"head_dim ({head_dim})."
            )
        groups.append(HeadGroup(block, *(names[c] for c in _ATTN_NAMES), n_heads, n_kv, head_dim))
    return groups

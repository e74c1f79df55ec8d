"""Mask builders: precomputed scores + a target sparsity -> a keep-mask (pure functions).

Conventions shared by the whole engine:

- A mask is a bool tensor of the scored tensor's shape, ``True`` = keep, ``False`` = pruned.
- Scores are float, higher = more important; the *lowest* scores are pruned.
- Ties are broken by flat index: among equal scores the lowest flat index is pruned first. The embedded model's
  weights are dequantised 4-bit values, so exact ties are common and selection must not depend on sort internals.
- Masks are monotone: an entry pruned in ``prev_mask`` stays pruned; it counts towards the requested number, so
  the result has exactly ``k`` pruned entries unless ``prev_mask`` already prunes more (then exactly those).
- Counts use Python's :func:`round` (half to even) via :func:`num_to_prune`: ``k = round(sparsity * n)``.

Selection never sorts the full tensor when a global threshold is enough: the k-th lowest *value* (unique, hence
deterministic) is found with ``kthvalue``, every entry below it is pruned, and the entries equal to it are taken in
flat-index order. That is the same set a stable sort would select, at a fraction of its time and memory when
ranking every prunable weight of a model at once (global comparison).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "decoder_layer_of",
    "density_sparsities",
    "expand_group_mask",
    "global_unstructured_masks",
    "group_mask",
    "n_m_mask",
    "num_to_prune",
    "outlier_ratio",
    "owl_sparsities",
    "parse_n_m",
    "reward_sparsities",
    "statistic_density",
    "unstructured_mask",
]


def num_to_prune(sparsity: float, n: int) -> int:
    """Number of units to prune for ``sparsity`` (fraction in ``[0, 1]``) of ``n`` units: ``round(sparsity * n)``."""
    _check_sparsity(sparsity)
    return int(round(float(sparsity) * n))


def _check_sparsity(sparsity: float) -> None:
    s = float(sparsity)
    if not (0.0 <= s <= 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be a fraction in [0, 1]; got {sparsity}")


def _as_int(value: object, message: str) -> int:
    # operator.index accepts Python, numpy and torch integers but not floats (a float count is a caller bug).
    if isinstance(value, bool):
        raise ValueError(f"{message}; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{message}; got {value!r}") from None


def _check_scores(scores: Tensor) -> None:
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor; got {scores.dtype}")
    if torch.isnan(scores).any():
        # NaN has no place in an order; it usually means training diverged.
        raise ValueError("scores contain NaN")


def _check_prev(prev_mask: Tensor | None, shape: torch.Size, name: str = "prev_mask") -> None:
    if prev_mask is None:
        return
    if prev_mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = keep); got {prev_mask.dtype}")
    if prev_mask.shape != shape:
        raise ValueError(f"{name} must have the scores' shape {tuple(shape)}; got {tuple(prev_mask.shape)}")


def _prune_lowest(scores: Tensor, k: int, forced: Tensor | None = None, eligible: Tensor | None = None) -> Tensor:
    """Pruned-set of a flat score vector.

    Args:
        scores: ``[n]`` float.
        k: how many to prune in total, ``forced`` ones included.
        forced: ``[n]`` bool, entries that must be pruned (previously pruned).
        eligible: ``[n]`` bool, entries that may be pruned besides ``forced`` (default: all).

    Returns:
        ``[n]`` bool, True = pruned: ``forced`` plus the ``k - |forced|`` lowest eligible scores (ties by index).
    """
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.to(torch.float32)  # exact; kthvalue and comparisons then share one dtype
    pruned = torch.zeros_like(scores, dtype=torch.bool) if forced is None else forced.clone()
    pool = ~pruned if eligible is None else eligible & ~pruned
    pool_size = int(pool.sum())
    k_new = min(max(k - int(pruned.sum()), 0), pool_size)
    if k_new == 0:
        return pruned
    if k_new == pool_size:
        return pruned | pool
    pool_scores = scores if pool_size == scores.numel() else scores[pool]
    # Only the k-th *value* is used (it is unique); which of the equal entries go is decided below by index.
    threshold = torch.kthvalue(pool_scores, k_new).values
    below = pool & (scores < threshold)
    pruned |= below
    need = k_new - int(below.sum())
    tied = torch.nonzero(pool & (scores == threshold)).squeeze(1)  # ascending flat index
    pruned[tied[:need]] = True
    return pruned


def _prune_lowest_rows(scores: Tensor, k: int, prev_keep: Tensor | None = None) -> Tensor:
    """Row-wise selection: prune the ``k`` lowest of every row of ``scores`` ``[rows, cols]``.

    Previously pruned entries (``~prev_keep``) are pruned first and count towards ``k``; a row that already has
    more than ``k`` pruned keeps exactly those. Returns the keep-mask ``[rows, cols]``.
    """
    rows, cols = scores.shape
    order = torch.sort(scores, dim=1, stable=True).indices
    if prev_keep is None:
        k_row: Tensor | int = k
    else:
        # A second stable sort on "was kept" puts previously pruned entries first while keeping the score order
        # (and its index tie-break) inside both parts: a lexicographic sort without -inf sentinels.
        was_kept = prev_keep.gather(1, order).to(torch.uint8)
        order = order.gather(1, torch.sort(was_kept, dim=1, stable=True).indices)
        k_row = (~prev_keep).sum(dim=1, keepdim=True).clamp(min=k)
    prune_sorted = torch.arange(cols, device=scores.device).unsqueeze(0) < k_row
    keep = torch.empty((rows, cols), dtype=torch.bool, device=scores.device)
    keep.scatter_(1, order, ~prune_sorted.expand(rows, cols))
    return keep


def unstructured_mask(
    scores: Tensor,
    sparsity: float,
    prev_mask: Tensor | None = None,
    per_row: bool = False,
) -> Tensor:
    """Unstructured keep-mask for one weight matrix.

    Args:
        scores: ``[out_features, in_features]`` (any shape with ``per_row=False``).
        sparsity: fraction to prune, in ``[0, 1]``.
        prev_mask: previous keep-mask of the same shape; its pruned entries stay pruned and count towards k.
        per_row: compare within each output row (Wanda's "per output" comparison): ``round(sparsity * cols)``
            pruned in every row (rows are all dims but the last). Otherwise ``round(sparsity * numel)`` over the
            whole matrix.

    Returns:
        bool keep-mask of ``scores``' shape.
    """
    _check_sparsity(sparsity)
    _check_scores(scores)
    _check_prev(prev_mask, scores.shape)
    scores = scores.detach()
    if per_row:
        if scores.dim() < 1:
            raise ValueError("per_row needs scores with at least one dimension")
        cols = scores.shape[-1]
        prev = None if prev_mask is None else prev_mask.reshape(-1, cols)
        keep = _prune_lowest_rows(scores.reshape(-1, cols), num_to_prune(sparsity, cols), prev)
        return keep.reshape(scores.shape)
    forced = None if prev_mask is None else ~prev_mask.reshape(-1)
    pruned = _prune_lowest(scores.reshape(-1), num_to_prune(sparsity, scores.numel()), forced)
    return (~pruned).reshape(scores.shape)


def global_unstructured_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    prev_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """One ranking across all layers: exactly ``round(sparsity * total)`` entries pruned overall.

    Scores of different layers must be comparable (normalise them first if they are not). Ties across layers are
    broken by the order of ``scores``' keys, then by flat index within a layer.

    Args:
        scores: layer name -> scores (any shapes).
        sparsity: overall fraction to prune, in ``[0, 1]``.
        prev_masks: layer name -> previous keep-mask (optional; layers missing here start all-kept).

    Returns:
        layer name -> bool keep-mask, in ``scores``' key order.
    """
    _check_sparsity(sparsity)
    names = list(scores)
    if prev_masks is not None:
        unknown = sorted(set(prev_masks) - set(names))
        if unknown:
            raise ValueError(f"prev_masks has layers without scores: {unknown}")
    if not names:
        return {}
    for name in names:
        _check_scores(scores[name])
        if prev_masks is not None:
            _check_prev(prev_masks.get(name), scores[name].shape, f"prev_masks[{name!r}]")
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().reshape(-1).to(device=device, dtype=torch.float32) for n in names])
    forced = None
    if prev_masks is not None:
        forced = torch.cat(
            [
                ~prev_masks[n].reshape(-1).to(device)
                if n in prev_masks
                else torch.zeros(scores[n].numel(), dtype=torch.bool, device=device)
                for n in names
            ]
        )
    pruned = _prune_lowest(flat, num_to_prune(sparsity, flat.numel()), forced)
    del flat
    keep = ~pruned
    out: dict[str, Tensor] = {}
    offset = 0
    for name in names:
        t = scores[name]
        out[name] = keep[offset : offset + t.numel()].reshape(t.shape).to(t.device).clone()
        offset += t.numel()
    return out


_N_M_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _n_m_error(got: object) -> ValueError:
    return ValueError(
        f"n_m must be 'N:M' with integers 1 <= N < M (keep N of every M consecutive inputs), e.g. '2:4' or '4:8'; "
        f"got {got!r}"
    )


def parse_n_m(spec: str) -> tuple[int, int]:
    """Parse an N:M sparsity pattern: ``"2:4"`` -> ``(2, 4)``, keep 2 of every 4 consecutive inputs.

    Raises:
        ValueError: naming ``n_m``, for anything but ``"N:M"`` with integers ``1 <= N < M``
            (e.g. ``"3:2"``, ``"2:0"``, ``"0:4"``, ``"4:4"``, ``"a:b"``, ``"24"``).
    """
    match = _N_M_RE.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise _n_m_error(spec)
    n, m = int(match.group(1)), int(match.group(2))
    if not (1 <= n < m):
        raise _n_m_error(spec)
    return n, m


def n_m_mask(
    scores: Tensor,
    n: int,
    m: int,
    sparsity: float | None = None,
    prev_mask: Tensor | None = None,
) -> Tensor:
    """N:M semi-structured keep-mask along the input (last) dimension.

    Every group of ``m`` consecutive entries of a row (``[..., j*m:(j+1)*m]``) keeps ``n`` of them in the final
    pattern: the ``m - n`` lowest scores of each group are pruned (previously pruned ones first).

    For gradual schedules, ``sparsity < 1 - n/m`` prunes ``round(sparsity * numel)`` entries chosen, lowest score
    first, among the final pattern's pruned entries ("candidates", computed from the same scores and
    ``prev_mask``). Every intermediate mask therefore prunes a subset of what the final N:M mask prunes, and with
    ``prev_mask`` chained through increasing sparsities the pruned sets grow monotonically.

    Args:
        scores: ``[out_features, in_features]`` (any shape whose last dim is divisible by ``m``).
        n: entries kept per group, ``1 <= n < m``.
        m: group size.
        sparsity: fraction to prune in ``[0, 1 - n/m]``; None means the full ``1 - n/m``.
        prev_mask: previous keep-mask; must prune at most ``m - n`` entries per group (it must be compatible with
            the pattern).

    Returns:
        bool keep-mask of ``scores``' shape.
    """
    message = "n and m must be integers with 1 <= n < m (keep n of every m)"
    n, m = _as_int(n, message), _as_int(m, message)
    if not 1 <= n < m:
        raise ValueError(f"{message}; got n={n!r}, m={m!r}")
    _check_scores(scores)
    _check_prev(prev_mask, scores.shape)
    if scores.dim() < 1 or scores.shape[-1] % m != 0:
        raise ValueError(
            f"N:M pruning needs the input dim (last) divisible by m={m}; got scores of shape {tuple(scores.shape)}"
        )
    scores = scores.detach()
    numel = scores.numel()
    k_final = numel // m * (m - n)
    k = k_final if sparsity is None else num_to_prune(sparsity, numel)
    if k > k_final:
        raise ValueError(f"sparsity must be at most 1 - n/m = {1 - n / m:g} for {n}:{m} pruning; got {sparsity}")
    groups = scores.reshape(-1, m)
    prev_groups = None if prev_mask is None else prev_mask.reshape(-1, m)
    if prev_groups is not None:
        worst = int((~prev_groups).sum(dim=1).max()) if prev_groups.numel() else 0
        if worst > m - n:
            raise ValueError(
                f"prev_mask prunes {worst} entries in some group of {m}, more than the {m - n} a {n}:{m} pattern "
                "allows; it is not compatible with this N:M pattern"
            )
    final_keep = _prune_lowest_rows(groups, m - n, prev_groups).reshape(-1)
    if k == k_final:
        return final_keep.reshape(scores.shape)
    forced = None if prev_mask is None else ~prev_mask.reshape(-1)
    pruned = _prune_lowest(scores.reshape(-1), k, forced, eligible=~final_keep)
    return (~pruned).reshape(scores.shape)


def group_mask(group_scores: Tensor, n_prune: int, prev_keep: Tensor | None = None) -> Tensor:
    """Keep-mask over structural groups: the ``n_prune`` lowest-scoring groups are pruned.

    Args:
        group_scores: ``[num_groups]`` float.
        n_prune: number of groups to prune in total (previously pruned ones included), ``0 <= n_prune <= G``.
        prev_keep: ``[num_groups]`` bool, previous keep-mask; its pruned groups stay pruned.

    Returns:
        bool ``[num_groups]``.
    """
    if group_scores.dim() != 1:
        raise ValueError(f"group_scores must be 1-D [num_groups]; got shape {tuple(group_scores.shape)}")
    _check_scores(group_scores)
    _check_prev(prev_keep, group_scores.shape, "prev_keep")
    n_prune = _as_int(n_prune, f"n_prune must be an integer in [0, {group_scores.numel()}]")
    if not 0 <= n_prune <= group_scores.numel():
        raise ValueError(f"n_prune must be an integer in [0, {group_scores.numel()}]; got {n_prune!r}")
    forced = None if prev_keep is None else ~prev_keep
    return ~_prune_lowest(group_scores.detach(), n_prune, forced)


def expand_group_mask(keep: Tensor, shape: Sequence[int] | torch.Size, dim: int, group_size: int = 1) -> Tensor:
    """Broadcast a group keep-mask onto a weight: group ``i`` covers ``[i*group_size, (i+1)*group_size)`` along ``dim``.

    Examples: an MLP neuron mask ``[intermediate]`` onto ``gate.weight`` (dim 0) or ``down.weight`` (dim 1); a head
    mask ``[num_heads]`` onto ``q.weight`` with ``dim=0, group_size=head_dim``.

    Args:
        keep: bool ``[num_groups]``.
        shape: the weight's shape; ``shape[dim]`` must equal ``num_groups * group_size``.
        dim: the weight dimension the groups index (negative allowed).
        group_size: consecutive slices per group.

    Returns:
        bool tensor of ``shape`` (a new, contiguous tensor, safe to modify in place).
    """
    shape = torch.Size(shape)
    if keep.dim() != 1 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 1-D bool tensor [num_groups]; got {keep.dtype} {tuple(keep.shape)}")
    if not -len(shape) <= dim < len(shape):
        raise ValueError(f"dim must index a dimension of shape {tuple(shape)}; got {dim}")
    dim = dim % len(shape)
    if group_size < 1 or shape[dim] != keep.numel() * group_size:
        raise ValueError(
            f"shape[{dim}] = {shape[dim]} must equal num_groups * group_size = {keep.numel()} * {group_size}"
        )
    line = keep.repeat_interleave(group_size)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return line.reshape(view).expand(shape).contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Per-layer allocation: one sparsity per decoder layer from a per-layer density (OWL's outliers, Yin et al. 2023,
# arXiv 2310.05175; or the reward statistic's mass), by :func:`density_sparsities`
# --------------------------------------------------------------------------------------------------------------------

_LAYER_PREFIX = re.compile(r"^(.*?\.\d+)\.")


def decoder_layer_of(name: str) -> str:
    """The decoder layer a target belongs to: the name up to its first numeric part (``model.layers.3.mlp.up_proj``
    -> ``model.layers.3``), or the name itself."""
    match = _LAYER_PREFIX.match(name)
    return match.group(1) if match else name


def _decoder_layers(names: Sequence[str]) -> dict[str, list[str]]:
    """Decoder layer -> its targets, both in the order of ``names``."""
    layers: dict[str, list[str]] = {}
    for n in names:
        layers.setdefault(decoder_layer_of(n), []).append(n)
    return layers


def outlier_ratio(scores: Sequence[Tensor], m: float = 5.0) -> float:
    """OWL's layerwise outlier density: the fraction of entries whose score exceeds ``m`` times the mean score of
    all of ``scores`` (one decoder layer's targets together). Scores must be non-negative, e.g. Wanda's
    ``|W| * ||x||``."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in scores])
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).float().mean())


def statistic_density(statistic: Sequence[Tensor]) -> float:
    """The reward statistic's mass density of one decoder layer: ``sum |R| / numel`` over its targets' weights
    (``|R|`` so that the signed form, movement, counts how much it moved whichever the direction; the abs and
    squared forms are non-negative already). Summed in float64: a layer holds millions of small values."""
    numel = sum(t.numel() for t in statistic)
    if numel == 0:
        return 0.0
    return float(sum(t.detach().abs().sum(dtype=torch.float64) for t in statistic)) / numel


def _exact_counts(real: dict[str, float], total: int, lower: dict[str, int], upper: dict[str, int]) -> dict[str, int]:
    """Integers within ``[lower, upper]`` summing to ``total``, each the floor or the ceiling of ``real`` (largest
    remainders round up; ties by name order). ``real`` must lie within the bounds and sum to ``total``."""
    counts = {n: min(max(int(math.floor(r + 1e-9)), lower[n]), upper[n]) for n, r in real.items()}
    missing = total - sum(counts.values())
    order = sorted(real, key=lambda n: (-(real[n] - counts[n]), n))
    step = 1 if missing > 0 else -1
    while missing:
        moved = False
        for n in order if step > 0 else reversed(order):
            if missing and lower[n] <= counts[n] + step <= upper[n]:
                counts[n] += step
                missing -= step
                moved = True
        if not moved:
            raise ValueError("density_sparsities: the bounds cannot reach the requested count")
    return counts


def density_sparsities(
    density: Mapping[str, float],
    sizes: Mapping[str, int],
    sparsity: float,
    *,
    lam: float = 0.08,
    prev_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Per-target sparsities that spread ``sparsity`` over decoder layers by a per-layer density, with the exact
    global count: ``sum(round(s_t * numel_t)) == round(sparsity * total)``. Shared by every non-uniform allocation
    (:func:`owl_sparsities`, :func:`reward_sparsities`).

    A decoder layer ``l`` with density ``D_l`` gets sparsity ``sparsity - lam * (D_l - mean(D)) / max|D - mean(D)|``,
    the mean weighted by the layers' sizes, so that denser layers are pruned less, every layer stays within ``lam``
    of ``sparsity`` and the weighted mean is ``sparsity`` itself. All targets of a layer share its sparsity; rounding
    is distributed by largest remainders. ``lam`` is capped at ``min(sparsity, 1 - sparsity)``; equal densities give
    uniform sparsity.

    Args:
        density: decoder layer (:func:`decoder_layer_of` of its targets) -> density; one entry per layer of
            ``sizes``.
        sizes: target name -> number of weights, in the order ties are broken.
        sparsity: global fraction to prune, in ``[0, 1]``.
        lam: largest deviation of a layer's sparsity from ``sparsity``.
        prev_masks: current keep-masks (monotone pruning): a target never gets fewer pruned entries than it has;
            the layers' sparsities are shifted together to keep the global count.

    Returns:
        target name -> sparsity ``k_t / numel_t``, to hand to :func:`unstructured_mask` (which rounds it back to
        ``k_t`` exactly).
    """
    _check_sparsity(sparsity)
    if lam < 0:
        raise ValueError(f"density_sparsities needs lam >= 0; got lam={lam}")
    names = list(sizes)
    if not names:
        return {}
    layers = _decoder_layers(names)
    if set(density) != set(layers):
        raise ValueError(
            f"density must have one entry per decoder layer of the targets: layers {sorted(layers)}, "
            f"densities for {sorted(density)}"
        )
    bad = {layer: d for layer, d in density.items() if not math.isfinite(d)}
    if bad:
        raise ValueError(f"density_sparsities needs finite densities; got {bad}")
    total = sum(sizes.values())
    layer_size = {layer: sum(sizes[n] for n in members) for layer, members in layers.items()}
    mean = sum(density[layer] * layer_size[layer] for layer in layers) / total
    spread = max(abs(density[layer] - mean) for layer in layers)
    lam = min(float(lam), float(sparsity), 1.0 - float(sparsity))
    share = {
        layer: float(sparsity) - (lam * (density[layer] - mean) / spread if spread > 0 else 0.0) for layer in layers
    }
    lower = {n: 0 for n in names}
    if prev_masks is not None:
        lower = {n: int((~prev_masks[n]).sum()) if n in prev_masks else 0 for n in names}
    k_total = num_to_prune(sparsity, total)
    k_total = max(k_total, sum(lower.values()))  # masks are monotone: never fewer than already pruned

    def counts_at(shift: float) -> dict[str, float]:
        return {
            n: min(max((share[decoder_layer_of(n)] + shift) * sizes[n], float(lower[n])), float(sizes[n]))
            for n in names
        }

    # The shift that makes the bounded real counts sum to k_total (0 unless the previous masks bind): bisection
    # on a monotone function.
    lo, hi = -1.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(counts_at(mid).values()) < k_total:
            lo = mid
        else:
            hi = mid
    counts = _exact_counts(counts_at(hi), k_total, lower, dict(sizes))
    return {n: counts[n] / sizes[n] for n in names}


def owl_sparsities(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    lam: float = 0.08,
    m: float = 5.0,
    prev_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Per-target sparsities that spread ``sparsity`` over decoder layers by their outliers, with the exact global
    count: ``sum(round(s_t * numel_t)) == round(sparsity * total)``.

    OWL: a decoder layer ``l`` with outlier density ``D_l`` (:func:`outlier_ratio` of its targets' scores) gets
    sparsity ``sparsity - lam * (D_l - mean(D)) / max|D - mean(D)|``, the mean weighted by the layers' sizes, so that
    layers with more outliers are pruned less, every layer stays within ``lam`` of ``sparsity`` and the weighted
    mean is ``sparsity`` itself (:func:`density_sparsities`). (The paper min-max scales ``D`` into a ``2 lam`` range
    around an unweighted mean; this form is the same line through the same centre when the layers have equal sizes,
    and it keeps the global count exact when they do not.) All targets of a layer share its sparsity; rounding is
    distributed by largest remainders. ``lam`` is capped at ``min(sparsity, 1 - sparsity)``; equal densities give
    uniform sparsity.

    Args:
        scores: target name -> non-negative scores (Wanda's ``|W| * ||x||``, or ``|W|``), any shapes.
        sparsity: global fraction to prune, in ``[0, 1]``.
        lam: largest deviation of a layer's sparsity from ``sparsity`` (the paper's lambda; 0.08 is its LLaMA
            setting).
        m: outlier threshold, in multiples of the layer's mean score (the paper's M; 5 for LLaMA).
        prev_masks: current keep-masks (monotone pruning): a target never gets fewer pruned entries than it has;
            the layers' sparsities are shifted together to keep the global count.

    Returns:
        target name -> sparsity ``k_t / numel_t``, to hand to :func:`unstructured_mask` (which rounds it back to
        ``k_t`` exactly).
    """
    _check_sparsity(sparsity)
    if lam < 0 or m <= 0:
        raise ValueError(f"owl_sparsities needs lam >= 0 and m > 0; got lam={lam}, m={m}")
    layers = _decoder_layers(list(scores))
    density = {layer: outlier_ratio([scores[n] for n in members], m) for layer, members in layers.items()}
    sizes = {n: t.numel() for n, t in scores.items()}
    return density_sparsities(density, sizes, sparsity, lam=lam, prev_masks=prev_masks)


def reward_sparsities(
    statistic: Mapping[str, Tensor],
    sparsity: float,
    *,
    lam: float = 0.08,
    prev_masks: Mapping[str, Tensor] | None = None,
) -> dict[str, float]:
    """Per-target sparsities that spread ``sparsity`` over decoder layers by the reward statistic's mass: where RL
    moves the model, prune less. The exact global count, as :func:`owl_sparsities`.

    A decoder layer ``l`` has density ``D_l = sum |R| / numel`` over its targets' weights
    (:func:`statistic_density`, ``R`` the accumulated reward statistic in any of its forms) and gets sparsity
    ``sparsity - lam * (D_l - mean(D)) / max|D - mean(D)|`` (:func:`density_sparsities`: size-weighted mean, every
    layer within ``lam`` of ``sparsity``, rounding by largest remainders). An all-zero statistic, or one with equal
    densities, gives uniform sparsity.

    Args:
        statistic: target name -> accumulated reward statistic, the weight's shape.
        sparsity: global fraction to prune, in ``[0, 1]``.
        lam: largest deviation of a layer's sparsity from ``sparsity`` (``owl_lambda``).
        prev_masks: current keep-masks (monotone pruning), as in :func:`density_sparsities`.

    Returns:
        target name -> sparsity, to hand to :func:`unstructured_mask`.
    """
    density: dict[str, float] = {}
    sizes: dict[str, int] = {}
    # One decoder layer's tensors at a time, each read once: ``statistic`` may decompress them on access.
    for layer, members in _decoder_layers(list(statistic)).items():
        tensors = [statistic[n] for n in members]
        density[layer] = statistic_density(tensors)
        sizes.update((n, t.numel()) for n, t in zip(members, tensors, strict=True))
    sizes = {n: sizes[n] for n in statistic}  # the targets' order, which breaks rounding ties
    return density_sparsities(density, sizes, sparsity, lam=lam, prev_masks=prev_masks)

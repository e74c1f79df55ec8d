"""Importance scores for pruning units (pure functions, no trainer state).

Every scorer returns a float32 tensor in which a *higher* score means *more important* (kept longer); the mask
builders in :mod:`grpo_prune.pruning.masks` prune the lowest scores. Scores for one weight matrix have the weight's
shape ``[out_features, in_features]``; scores for structural groups (MLP neurons, attention heads) have shape
``[num_groups]`` and come from :func:`group_l2` / :func:`group_sum`.

Indicators (DESIGN.md section 1):

- magnitude ``|W0|`` of the pretrained weight (:func:`magnitude_scores`), optionally plus ``|b0|`` for group units;
- Wanda ``|W_ij| * ||X_j||_2`` (:func:`wanda_scores`);
- the reward-driven statistic accumulated every optimizer step from the policy-gradient term's gradient
  (:func:`statistic_update_`): signed movement ``R += -(grad * W)``, ``|grad * W|`` or ``(grad * W)^2``;
- a seeded random baseline (:func:`random_scores`);
- MAMA ``S = (1 - alpha) * norm(magnitude [+ bias]) + alpha * norm(movement)`` (:func:`mama_scores`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "NORMALIZATIONS",
    "SCORERS",
    "group_l2",
    "group_sum",
    "magnitude_scores",
    "mama_scores",
    "movement_update_",
    "normalize_scores",
    "random_scores",
    "statistic_increment",
    "statistic_update_",
    "wanda_scores",
]

SCORERS = ("magnitude", "wanda", "movement", "random", "mama")
"""Scorer names accepted by the pruner (``PruningSettings.scorer``); the functions are in
:mod:`grpo_prune.pruning.scorers`."""

STATISTICS = ("signed", "abs", "squared")
"""Forms of the reward-driven statistic (:func:`statistic_update_`)."""

NORMALIZATIONS = ("rank", "zscore")
"""Normalisations accepted by :func:`normalize_scores` and :func:`mama_scores`."""


def magnitude_scores(weight: Tensor) -> Tensor:
    """Magnitude indicator ``|W|``.

    Args:
        weight: any shape, any float dtype (e.g. ``[out_features, in_features]``).

    Returns:
        float32 tensor of ``weight``'s shape, a new tensor (never a view of the weight, so later in-place
        pruning of the weight does not change the snapshot).
    """
    return weight.detach().abs().to(torch.float32, copy=True)


def wanda_scores(weight: Tensor, act_norm: Tensor) -> Tensor:
    """Wanda indicator ``|W_ij| * act_norm[j]`` (Sun et al. 2023).

    Args:
        weight: ``[out_features, in_features]``.
        act_norm: ``[in_features]``, the L2 norm of each input feature over the calibration / rollout tokens.

    Returns:
        float32 ``[out_features, in_features]``.
    """
    if act_norm.dim() != 1 or act_norm.shape[0] != weight.shape[-1]:
        raise ValueError(
            f"act_norm must have shape [in_features] = [{weight.shape[-1]}] to match weight {tuple(weight.shape)}; "
            f"got {tuple(act_norm.shape)}"
        )
    return weight.detach().abs().to(torch.float32) * act_norm.detach().to(torch.float32)


def _check_accumulator(name: str, acc: Tensor, weight: Tensor, grad: Tensor) -> None:
    if acc.dtype != torch.float32:
        raise ValueError(f"{name} must be a float32 accumulator; got {acc.dtype}")
    if acc.shape != weight.shape or grad.shape != weight.shape:
        raise ValueError(
            f"{name}, weight and grad must have the same shape; got {tuple(acc.shape)}, {tuple(weight.shape)}, "
            f"{tuple(grad.shape)}"
        )


def movement_update_(movement: Tensor, weight: Tensor, grad: Tensor) -> None:
    """Accumulate reward-weighted movement in place: ``movement += -(grad * weight)``.

    ``-(grad * W)`` is the first-order estimate of how much the (GRPO, advantage-weighted) objective would lose if
    the weight were set to zero, so a large positive accumulated value marks a weight worth keeping
    (Sanh et al. 2020).

    Args:
        movement: float32 accumulator, same shape as ``weight``; updated in place.
        weight: current weight, any float dtype.
        grad: gradient of the loss w.r.t. ``weight``, same shape, any float dtype.
    """
    _check_accumulator("movement", movement, weight, grad)
    # no_grad: weight is usually a Parameter; without it the in-place op would record a graph on the buffer.
    with torch.no_grad():
        movement.addcmul_(grad.to(torch.float32), weight.to(torch.float32), value=-1.0)


def statistic_update_(statistic: Tensor, weight: Tensor, grad: Tensor, form: str = "signed") -> None:
    """Accumulate one step of the reward-driven statistic in place, from the first-order saliency ``-(g * W)``.

    Forms (higher = more important, like every score here):

    - ``"signed"``: ``R += -(g * W)``, movement (Sanh et al. 2020). Signs cancel over noisy steps, so it needs many.
    - ``"abs"``: ``R += |g * W|``, the magnitude-aggregated form (PLATON's sensitivity average, up to scale).
    - ``"squared"``: ``R += (g * W)^2``, the empirical Fisher / OBD saliency (diagonal), up to scale.

    Args:
        statistic: float32 accumulator, same shape as ``weight``; updated in place.
        weight: current weight, any float dtype.
        grad: gradient of the reward (policy-gradient) term w.r.t. ``weight``, same shape, any float dtype.
        form: one of :data:`STATISTICS`.
    """
    if form == "signed":
        movement_update_(statistic, weight, grad)
        return
    _check_accumulator("statistic", statistic, weight, grad)
    with torch.no_grad():
        statistic.add_(statistic_increment(weight, grad, form))


def statistic_increment(weight: Tensor, grad: Tensor, form: str = "signed") -> Tensor:
    """One step's term of the reward-driven statistic in float32 (see :func:`statistic_update_` for the forms)."""
    if form not in STATISTICS:
        raise ValueError(f"form must be one of {STATISTICS}; got {form!r}")
    if grad.shape != weight.shape:
        raise ValueError(f"weight and grad must have the same shape; got {tuple(weight.shape)}, {tuple(grad.shape)}")
    with torch.no_grad():
        saliency = grad.to(torch.float32) * weight.to(torch.float32)
        if form == "signed":
            return saliency.neg_()
        return saliency.abs_() if form == "abs" else saliency.square_()


def _seed_from(seed: int, salt: str) -> int:
    # hashlib, not hash(): Python's str hash is salted per process, and every rank / resume must agree.
    digest = hashlib.sha256(f"{int(seed)}\x00{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_scores(shape: int | Sequence[int] | torch.Size, seed: int, salt: str) -> Tensor:
    """Random baseline scores, uniform in ``[0, 1)``, reproducible per ``(seed, salt)``.

    Args:
        shape: output shape (e.g. the weight's shape, or ``[num_groups]``).
        seed: run seed (``PruningSettings.seed``).
        salt: distinguishes layers, usually the module name, so layers get independent draws.

    Returns:
        float32 CPU tensor of ``shape``; the same arguments give the same tensor in every process.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_seed_from(seed, salt))
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.rand(size, generator=generator, dtype=torch.float32)


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}; got {normalization!r}")


def normalize_scores(scores: Tensor, method: str) -> Tensor:
    """Make one layer's indicator comparable with another indicator of the same layer.

    Args:
        scores: any shape (one layer's scores).
        method: ``"rank"``: the percentile ``rank / (numel - 1)`` in ``[0, 1]``, lowest score -> 0, highest -> 1.
            Equal scores share their average rank, so ties never turn into an order over positions (an all-zero
            indicator becomes a constant and cannot favour any entry). A single element -> 0.
            ``"zscore"``: ``(x - mean) / std`` with the population std; a constant input gives zeros (never NaN).

    Returns:
        float32 tensor of ``scores``' shape.
    """
    _check_normalization(method)
    flat = scores.detach().reshape(-1)
    if torch.isnan(flat).any():
        raise ValueError("scores contain NaN; cannot normalise (did the training loss diverge?)")
    n = flat.numel()
    if method == "rank":
        ranks = torch.empty(n, dtype=torch.float32, device=flat.device)
        if n == 0:
            return ranks.reshape(scores.shape)
        values, order = torch.sort(flat)
        # Average rank of each run of equal values: runs are consecutive in sorted order.
        _, counts = torch.unique_consecutive(values, return_counts=True)
        # fp64 arithmetic: global rankings span more entries than fp32 counts exactly.
        ends = counts.cumsum(0).to(torch.float64)
        run_rank = ends - (counts.to(torch.float64) + 1.0) / 2.0
        ranks[order] = torch.repeat_interleave(run_rank.to(torch.float32), counts)
        if n > 1:
            ranks /= n - 1
        return ranks.reshape(scores.shape)
    if n == 0:
        return torch.empty(scores.shape, dtype=torch.float32, device=flat.device)
    # float64 so that the centring of large, nearly equal values does not lose the differences between them.
    x = flat.to(torch.float64)
    if bool(x.max() == x.min()):
        # A constant layer carries no ordering; std would be 0 (or rounding noise making everything +-1).
        return torch.zeros(scores.shape, dtype=torch.float32, device=flat.device)
    centred = x - x.mean()
    std = centred.pow(2).mean().sqrt()
    return (centred / std).to(torch.float32).reshape(scores.shape)


def rank_correlation(a: Tensor, b: Tensor, max_entries: int | None = None) -> float:
    """Spearman correlation of two score tensors of one layer (ranks as :func:`normalize_scores` gives them, ties
    averaged); NaN when either is constant. ``max_entries``: compare a strided subset of about that many entries."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1)
    if max_entries is not None:
        stride = max(1, a.numel() // max_entries)
        a, b = a[::stride], b[::stride]
    ra = normalize_scores(a, "rank").double()
    rb = normalize_scores(b, "rank").double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float((ra @ rb) / denom) if denom > 0 else float("nan")


def mama_scores(
    magnitude: Tensor,
    movement: Tensor,
    alpha: float,
    normalization: str,
    bias: Tensor | None = None,
    pretrained_normalized: bool = False,
) -> Tensor:
    """MAMA score ``S = (1 - alpha) * norm(magnitude [+ |bias|]) + alpha * norm(movement)``.

    Args:
        magnitude: pretrained magnitude indicator, ``[out, in]`` for weights or ``[num_groups]`` for groups.
        movement: accumulated reward-weighted movement, same shape as ``magnitude``.
        alpha: weight on movement in ``[0, 1]``; 0 keeps pure magnitude order, 1 pure movement order.
        normalization: ``"rank"`` or ``"zscore"`` (see :func:`normalize_scores`), applied per indicator.
        bias: optional pretrained bias of each unit's output (its absolute value is used): same shape as
            ``magnitude`` (group units), or ``[out]`` for a ``[out, in]`` magnitude (added to every entry of row i).
        pretrained_normalized: ``magnitude`` already is ``norm(magnitude [+ |bias|])`` (the pretrained term never
            changes, so a caller may normalise it once; then ``bias`` must be None).

    Returns:
        float32 tensor of ``magnitude``'s shape.
    """
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(f"alpha must be in [0, 1] (0 = magnitude only, 1 = movement only); got {alpha}")
    _check_normalization(normalization)
    if movement.shape != magnitude.shape:
        raise ValueError(f"movement must have magnitude's shape {tuple(magnitude.shape)}; got {tuple(movement.shape)}")
    pretrained = magnitude.detach().to(torch.float32)
    if pretrained_normalized:
        if bias is not None:
            raise ValueError("bias must be folded into an already-normalised pretrained term")
        if alpha == 1.0:
            return normalize_scores(movement, normalization)
        if alpha == 0.0:
            return pretrained.clone()
        return (1.0 - alpha) * pretrained + alpha * normalize_scores(movement, normalization)
    if bias is not None:
        b = bias.detach().abs().to(torch.float32)
        if b.shape == pretrained.shape:
            pretrained = pretrained + b
        elif b.dim() == 1 and pretrained.dim() >= 1 and b.shape[0] == pretrained.shape[0]:
            pretrained = pretrained + b.reshape(-1, *([1] * (pretrained.dim() - 1)))
        else:
            raise ValueError(
                f"bias must have magnitude's shape {tuple(magnitude.shape)} or [{magnitude.shape[0]}] "
                f"(one per output unit); got {tuple(bias.shape)}"
            )
    # At the ends skip the unused indicator: no wasted sort, and its content (e.g. an untouched buffer) cannot matter.
    if alpha == 0.0:
        return normalize_scores(pretrained, normalization)
    if alpha == 1.0:
        return normalize_scores(movement, normalization)
    return (1.0 - alpha) * normalize_scores(pretrained, normalization) + alpha * normalize_scores(
        movement, normalization
    )


GroupSpec = tuple[Tensor, int] | tuple[Tensor, int, int]
"""``(tensor, dim)`` or ``(tensor, dim, group_size)``: groups are indexed along ``dim``; with ``group_size`` each
group spans that many consecutive slices along ``dim`` (e.g. the ``head_dim`` rows of one attention head)."""


def _per_group(weights: Sequence[GroupSpec], square: bool) -> Tensor:
    if len(weights) == 0:
        raise ValueError("weights must name at least one (tensor, dim) pair")
    total: Tensor | None = None
    for spec in weights:
        if len(spec) not in (2, 3):
            raise ValueError(f"each entry of weights must be (tensor, dim) or (tensor, dim, group_size); got {spec!r}")
        tensor, dim = spec[0], int(spec[1])
        group_size = int(spec[2]) if len(spec) == 3 else 1
        t = tensor.detach().to(torch.float32)
        dim = dim % t.dim()
        if group_size < 1 or t.shape[dim] % group_size != 0:
            raise ValueError(
                f"group_size must be >= 1 and divide the size {t.shape[dim]} of dim {dim}; got {group_size}"
            )
        # [num_groups, group_size * everything else]: consecutive slices along dim form one group.
        num_groups = t.shape[dim] // group_size
        t = t.movedim(dim, 0).reshape(num_groups, -1)
        per = t.pow(2).sum(dim=1) if square else t.sum(dim=1)
        if total is None:
            total = per
        elif per.shape != total.shape:
            raise ValueError(
                f"every tensor in weights must index the same number of groups; got {total.shape[0]} and "
                f"{per.shape[0]}"
            )
        else:
            total = total + per
    assert total is not None
    return total


def group_l2(weights: Sequence[GroupSpec]) -> Tensor:
    """L2 norm of each structural group over all the weights it owns (the magnitude indicator for groups).

    Example, MLP neuron i = row i of gate and up, column i of down::

        group_l2([(gate.weight, 0), (up.weight, 0), (down.weight, 1)])  # -> [intermediate_size]

    Attention head h of ``head_dim`` rows in q and columns in o::

        group_l2([(q.weight, 0, head_dim), (o.weight, 1, head_dim)])  # -> [num_heads]

    Args:
        weights: ``(tensor, dim)`` or ``(tensor, dim, group_size)`` entries; all must index the same number of
            groups.

    Returns:
        float32 ``[num_groups]``, ``sqrt(sum of squares)`` over every weight of the group.
    """
    return _per_group(weights, square=True).sqrt()


def group_sum(weights: Sequence[GroupSpec]) -> Tensor:
    """Signed sum of each group's entries (movement of a group = sum of its weights' movement).

    Same arguments as :func:`group_l2`; returns float32 ``[num_groups]``.
    """
    return _per_group(weights, square=False)

"""Pruning a model whose parameters are sharded by PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter is a ``DTensor`` sharded on dim 0 (``Shard(0)`` over a 1-D mesh): each rank holds a
contiguous block of rows, ``weight.to_local()``. The pruner keeps its masks and per-weight indicators for that local
block only, exactly like the parameter, so its memory divides by the world size. What needs the whole layer is done
with collectives whose size does not depend on the layer's size:

* **Row-local selections** (``comparison="row"``, the final N:M pattern) are computed on the shard, no communication.
* **Exact-k selections** over a layer (``comparison="layer"``, a partial N:M step) or over every layer
  (``comparison="global"``) use :func:`dist_prune_lowest`: a bisection over the order-preserving integer image of
  the fp32 scores (33 rounds, each an ``all_reduce`` of one count per selection) finds the k-th lowest value exactly;
  entries below it are pruned, and entries equal to it are taken by **global** flat index (a rank's shard starts at
  ``row_offset * cols``), so the result is bit-for-bit the one-process :func:`~grpo_prune.pruning.masks.unstructured_mask`
  / :func:`~grpo_prune.pruning.masks.global_unstructured_masks` (ties by ascending flat index, previously pruned
  entries forced and counted towards k).
* **Rank normalisation** (MAMA with ``0 < alpha < 1``): each rank's sorted shard is broadcast in turn and every rank
  counts, with ``searchsorted``, how many entries of the layer lie below and at each of its values: the same average
  ranks as :func:`~grpo_prune.pruning.scores.normalize_scores`, holding at most one other shard at a time.

Activation statistics need nothing new: FSDP2 all-gathers the weights in forward and each ``nn.Linear`` sees its full
input, so the hooks record full per-feature statistics, summed across ranks by the pruner's ``reduce_fn`` as under DDP.

Not supported under FSDP2 (refused by :func:`check_supported`): structured units (their scores would need per-unit
sums across the rows of ``gate/up`` and the columns of the row-sharded ``down_proj``), compensation (it adds bias
parameters, which cannot be added to a module after ``fully_shard``), z-score normalisation (its mean and standard
deviation, all-reduced, would not be bit-identical to one process's), non-uniform per-layer allocation (``owl``,
``reward``: the sharded selection prunes every layer at one sparsity) and 2-D meshes (HSDP).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from grpo_prune.pruning import masks as M

__all__ = [
    "ShardLayout",
    "check_supported",
    "dist_prune_lowest",
    "dist_rank_normalize",
    "is_sharded",
    "local",
    "order_keys",
    "sharded_new_masks",
]

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or optimizer state of an FSDP2 module)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (same storage: in-place ops on it change the parameter), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def check_supported(settings: Any) -> None:
    """Refuse, with a ValueError naming the field, what the sharded pruner does not do (see the module docstring)."""
    if settings.granularity == "structured":
        raise ValueError(
            "`granularity`='structured' is not supported under FSDP2 (unit scores would need sums across the rows "
            "of gate/up_proj and the columns of the row-sharded down_proj); use 'unstructured' or 'n:m', or train "
            "structured pruning with DDP."
        )
    if settings.compensate:
        raise ValueError(
            "`compensate`=True is not supported under FSDP2: it adds bias parameters, which cannot be added to a "
            "module after fully_shard. Use compensate=False, or DDP."
        )
    if settings.scorer == "sparsegpt":
        raise ValueError(
            "`scorer`='sparsegpt' is not supported under FSDP2 (OBS needs whole rows and the Gram matrix of each "
            "layer's full input on one rank); prune one-shot with sparsegpt and train with `prune_init_masks`, or "
            "use DDP."
        )
    allocation = getattr(settings, "allocation", "uniform")
    if allocation == "owl":
        raise ValueError(
            "`allocation`='owl' is not supported under FSDP2 (the outlier densities would need every rank's rows); "
            "prune one-shot with it and train with `prune_init_masks`, or use DDP."
        )
    if allocation != "uniform":
        raise ValueError(
            f"`allocation`={allocation!r} is not supported under FSDP2 (the sharded selection prunes every layer at "
            "the same sparsity; per-layer sparsities from the statistic's mass on every rank's rows are not "
            "implemented); use allocation 'uniform', or DDP."
        )
    mixes = settings.scorer == "mama" and 0.0 < settings.alpha < 1.0
    if mixes and settings.normalization != "rank":
        raise ValueError(
            f"`normalization`={settings.normalization!r} is not supported under FSDP2 (an all-reduced mean and std "
            "would not match one process bit for bit); use 'rank'."
        )


class ShardLayout:
    """Where each target's local shard lies in its full weight, and the process group that shares them.

    Attributes:
        group: the process group of the FSDP2 mesh (every collective of the sharded pruner runs on it).
        rank, world_size: this process's rank in ``group`` and the group's size.
        global_shapes: target name -> full weight shape ``(out, in)``.
        row_offsets: ``[world_size, num_targets]`` int64 (CPU): first row of every rank's shard of every target.
        index: target name -> column of ``row_offsets``.

    Raises:
        ValueError: some targets sharded and others not, a placement other than ``Shard(0)``, a mesh that is not
            1-D, or targets on different meshes.
    """

    def __init__(self, targets: Mapping[str, nn.Linear]):
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        weights = {n: mod.weight for n, mod in targets.items()}
        plain = [n for n, w in weights.items() if not is_sharded(w)]
        if plain:
            raise ValueError(
                f"Some target weights are sharded (FSDP2 DTensors) and others are not (e.g. {plain[0]!r}); "
                "fully_shard every decoder layer (or the root) so that all targets are sharded alike."
            )
        first = next(iter(weights.values()))
        mesh = first.device_mesh
        if mesh.ndim != 1 or any(w.device_mesh != mesh for w in weights.values()):
            raise ValueError("The sharded pruner needs every target on one 1-D FSDP2 mesh (HSDP is not supported).")
        for name, w in weights.items():
            if tuple(w.placements) != (Shard(0),):
                raise ValueError(f"{name}: placement {w.placements}, expected (Shard(0),) as fully_shard makes.")
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.global_shapes = {n: tuple(w.shape) for n, w in weights.items()}
        self.index = {n: i for i, n in enumerate(weights)}
        mine = []
        for name, w in weights.items():
            local_shape, offset = compute_local_shape_and_global_offset(w.shape, mesh, w.placements)
            if tuple(local_shape) != tuple(w.to_local().shape):
                raise ValueError(f"{name}: local shard {tuple(w.to_local().shape)} != expected {local_shape}.")
            mine.append(offset[0])
        self.device = first.to_local().device
        self.row_offsets = self.all_gather(torch.tensor(mine, dtype=torch.int64)).cpu()

    # -------------------------------------------------------------------------------------------- collectives
    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over the group (a new tensor on ``t``'s device)."""
        out = t.to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(t.device)

    def all_gather(self, t: Tensor) -> Tensor:
        """``[world_size, *t.shape]``: every rank's ``t`` (same shape on every rank)."""
        src = t.to(self.device).contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world_size)]
        dist.all_gather(parts, src, group=self.group)
        return torch.stack(parts).to(t.device)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank."""
        return bool(self.all_reduce_sum(torch.tensor([int(flag)], dtype=torch.int64)).item() > 0)

    # ----------------------------------------------------------------------------------------------- shards
    def row_offset(self, name: str) -> int:
        return int(self.row_offsets[self.rank, self.index[name]])

    def numel(self, name: str) -> int:
        """Elements of the full weight of ``name``."""
        out, cols = self.global_shapes[name]
        return out * cols

    def local_rows(self, name: str, full: Tensor) -> Tensor:
        """This rank's rows of a full-layer tensor (e.g. seeded random scores drawn for the whole weight)."""
        start = self.row_offset(name)
        return full[start : start + self._rows_of(name, self.rank)]

    def full_tensor(self, name: str, local_t: Tensor) -> Tensor:
        """The full ``[out, in]`` tensor of ``name`` from every rank's local rows (bools travel as uint8)."""
        out, cols = self.global_shapes[name]
        rows = max(self._rows_of(name, r) for r in range(self.world_size))
        padded = torch.zeros((rows, cols), dtype=torch.uint8 if local_t.dtype == torch.bool else local_t.dtype)
        padded = padded.to(self.device)
        padded[: local_t.shape[0]] = local_t.to(self.device, padded.dtype)
        gathered = self.all_gather(padded)
        full = torch.empty((out, cols), dtype=padded.dtype, device=self.device)
        for r in range(self.world_size):
            start, n = int(self.row_offsets[r, self.index[name]]), self._rows_of(name, r)
            full[start : start + n] = gathered[r, :n]
        return full.bool() if local_t.dtype == torch.bool else full

    def _rows_of(self, name: str, r: int) -> int:
        """Rows of rank ``r``'s shard of ``name``: up to the next rank's first row (shards are contiguous)."""
        offsets = self.row_offsets[:, self.index[name]]
        start = int(offsets[r])
        later = [int(o) for o in offsets if int(o) > start]
        return (min(later) if later else self.global_shapes[name][0]) - start


# ----------------------------------------------------------------------------------------------- selection
def order_keys(scores: Tensor) -> Tensor:
    """int64 keys with the order of the fp32 values of ``scores`` (``-0.0`` and ``+0.0`` get the same key).

    The sign-magnitude bit pattern of an IEEE float, read as an integer, orders non-negative floats; negating the
    magnitude of negative ones orders them too. Keys lie in ``[-(2**31 - 1), 2**31 - 1]``.
    """
    x = scores.detach().float() + 0.0  # -0.0 + 0.0 = +0.0: equal floats, equal keys
    bits = x.view(torch.int32).to(torch.int64)
    magnitude = bits & _INT32_MAX
    return torch.where(bits < 0, -magnitude, magnitude)


def dist_prune_lowest(
    layout: ShardLayout,
    names: Sequence[str],
    scores: Mapping[str, Tensor],
    selections: Sequence[tuple[Sequence[str], int]],
    forced: Mapping[str, Tensor] | None = None,
    eligible: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Distributed :func:`grpo_prune.pruning.masks._prune_lowest` over row shards, several selections at once.

    Args:
        layout: the shards' layout and process group.
        names: every layer taking part (each in exactly one selection).
        scores: name -> local scores ``[local_rows, cols]`` (float; NaN refused on every rank).
        selections: ``(layer names in ranking order, k)``: prune ``k`` entries in total among those layers (forced
            ones included), ranked jointly; ties by layer order, then by global flat index within a layer.
        forced: name -> local bool, entries already pruned (they stay pruned and count towards k).
        eligible: name -> local bool, entries that may be pruned besides the forced ones (default: all).

    Returns:
        name -> local bool ``[local_rows, cols]``, True = pruned. Identical, once the shards are put together, to
        the one-process selection over the full layers.
    """
    names = list(names)
    col = {n: i for i, n in enumerate(names)}
    flat = {n: scores[n].detach().reshape(-1) for n in names}
    keys = {n: order_keys(flat[n]) for n in names}
    pruned = {
        n: (torch.zeros_like(flat[n], dtype=torch.bool) if forced is None else forced[n].reshape(-1).clone())
        for n in names
    }
    pool = {n: ~pruned[n] if eligible is None else eligible[n].reshape(-1) & ~pruned[n] for n in names}
    sel_of = {n: s for s, (members, _) in enumerate(selections) for n in members}

    def per_selection(counts: Tensor) -> Tensor:  # [num_layers] -> [num_selections]
        out = torch.zeros(len(selections), dtype=torch.int64)
        for n in names:
            out[sel_of[n]] += counts[col[n]]
        return out

    # One collective for the facts every rank must agree on: NaNs, forced and pool sizes.
    local_counts = torch.tensor(
        [[int(torch.isnan(flat[n]).sum()), int(pruned[n].sum()), int(pool[n].sum())] for n in names],
        dtype=torch.int64,
    ).reshape(len(names), 3)
    totals = layout.all_reduce_sum(local_counts)
    if int(totals[:, 0].sum()):
        raise ValueError("scores contain NaN")
    forced_total, pool_total = per_selection(totals[:, 1]), per_selection(totals[:, 2])
    k_new = torch.tensor(
        [min(max(k - int(forced_total[s]), 0), int(pool_total[s])) for s, (_, k) in enumerate(selections)]
    )
    everything = k_new == pool_total
    active = (k_new > 0) & ~everything
    for n in names:
        if bool(everything[sel_of[n]]) and bool(k_new[sel_of[n]] > 0):
            pruned[n] |= pool[n]
    if not bool(active.any()):
        return {n: pruned[n].reshape(scores[n].shape) for n in names}

    # Bisection on the key: the smallest t with count(pool & key <= t) >= k_new is the k-th lowest value.
    lo = torch.full((len(selections),), _INT32_MIN, dtype=torch.int64)  # count(<= lo) = 0 < k_new
    hi = torch.full((len(selections),), _INT32_MAX, dtype=torch.int64)  # count(<= hi) = pool >= k_new
    while bool(((hi - lo > 1) & active).any()):
        mid = (lo + hi) // 2
        counts = torch.tensor(
            [int((pool[n] & (keys[n] <= int(mid[sel_of[n]]))).sum()) for n in names], dtype=torch.int64
        )
        reached = layout.all_reduce_sum(per_selection(counts)) >= k_new
        hi = torch.where(reached & active, mid, hi)
        lo = torch.where(~reached & active, mid, lo)
    threshold = hi

    below = {n: pool[n] & (keys[n] < int(threshold[sel_of[n]])) for n in names}
    tied = {n: pool[n] & (keys[n] == int(threshold[sel_of[n]])) for n in names}
    below_counts = layout.all_reduce_sum(torch.tensor([int(below[n].sum()) for n in names], dtype=torch.int64))
    tied_counts = layout.all_gather(torch.tensor([int(tied[n].sum()) for n in names], dtype=torch.int64))
    need = k_new - per_selection(below_counts)  # tied entries to take, per selection
    for members, _ in selections:
        s = sel_of[members[0]]
        if not bool(active[s]):
            continue
        before = 0  # tied entries ahead of this rank's, in (layer order, global flat index) order
        for n in members:
            c, offsets = col[n], layout.row_offsets[:, layout.index[n]]
            mine = int(offsets[layout.rank])
            ahead = before + sum(int(tied_counts[r, c]) for r in range(layout.world_size) if int(offsets[r]) < mine)
            take = max(0, min(int(need[s]) - ahead, int(tied_counts[layout.rank, c])))
            pruned[n] |= below[n]
            if take:
                pruned[n][torch.nonzero(tied[n]).squeeze(1)[:take]] = True
            before += int(tied_counts[:, c].sum())
    return {n: pruned[n].reshape(scores[n].shape) for n in names}


def sharded_new_masks(
    layout: ShardLayout,
    settings: Any,
    sparsity: float,
    scores: Mapping[str, Tensor],
    prev_masks: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Local keep-masks at ``sparsity`` for unstructured and N:M pruning, equal to the one-process masks.

    Args:
        layout: shards and process group.
        settings: the pruner's ``PruningSettings`` (granularity, comparison, n_m).
        sparsity: fraction of every layer (``layer``, ``row``, N:M) or of all targets (``global``) to prune.
        scores: name -> local scores ``[local_rows, cols]``.
        prev_masks: name -> local keep-masks; their pruned entries stay pruned.
    """
    names = list(scores)
    for n in names:
        M._check_prev(prev_masks[n], scores[n].shape, f"prev_masks[{n!r}]")
    forced = {n: ~prev_masks[n] for n in names}
    if settings.granularity == "unstructured":
        if settings.comparison == "row":  # within a row: the shard holds whole rows
            return {n: M.unstructured_mask(scores[n], sparsity, prev_masks[n], per_row=True) for n in names}
        if settings.comparison == "global":
            total = sum(layout.numel(n) for n in names)
            selections = [(names, M.num_to_prune(sparsity, total))]
        else:
            selections = [([n], M.num_to_prune(sparsity, layout.numel(n))) for n in names]
        pruned = dist_prune_lowest(layout, names, scores, selections, forced)
        return {n: ~p for n, p in pruned.items()}
    if settings.granularity == "n:m":
        n_keep, m = M.parse_n_m(settings.n_m)
        final = {n: M.n_m_mask(scores[n], n_keep, m, None, prev_masks[n]) for n in names}  # within rows
        if sparsity >= 1.0 - n_keep / m - 1e-9:
            return final
        # A gradual step: the lowest of the final pattern's pruned entries, exactly k per layer.
        selections = [([n], M.num_to_prune(sparsity, layout.numel(n))) for n in names]
        eligible = {n: ~final[n] for n in names}
        pruned = dist_prune_lowest(layout, names, scores, selections, forced, eligible)
        return {n: ~p for n, p in pruned.items()}
    raise ValueError(f"`granularity`={settings.granularity!r} is not supported under FSDP2.")


def dist_rank_normalize(layout: ShardLayout, local_scores: Tensor) -> Tensor:
    """:func:`~grpo_prune.pruning.scores.normalize_scores` ``"rank"`` over the union of every rank's
    ``local_scores`` (any shapes), bit-identical to the one-process result. Returns fp32 of ``local_scores``' shape.

    Each rank's sorted values are broadcast in turn; ``searchsorted`` counts, for each local value, the entries of
    the whole population below it (``lt``) and at or below it (``le``): its average 0-based rank is
    ``le - (le - lt + 1) / 2``, computed in fp64 like the one-process version.
    """
    flat = local_scores.detach().reshape(-1).float()
    sizes = layout.all_gather(torch.tensor([flat.numel()], dtype=torch.int64)).reshape(-1)
    mine = torch.sort(flat).values
    lt = torch.zeros(flat.numel(), dtype=torch.int64, device=flat.device)
    le = torch.zeros_like(lt)
    for r in range(layout.world_size):
        buf = mine.to(layout.device) if r == layout.rank else torch.empty(int(sizes[r]), device=layout.device)
        dist.broadcast(buf, src=dist.get_global_rank(layout.group, r), group=layout.group)
        buf = buf.to(flat.device)
        lt += torch.searchsorted(buf, flat, side="left")
        le += torch.searchsorted(buf, flat, side="right")
    n = int(sizes.sum())
    run_rank = le.to(torch.float64) - ((le - lt).to(torch.float64) + 1.0) / 2.0
    ranks = run_rank.to(torch.float32)
    if n > 1:
        ranks /= n - 1
    return ranks.reshape(local_scores.shape)

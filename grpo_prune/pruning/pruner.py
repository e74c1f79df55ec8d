"""The slim pruning engine: masks over time, enforcement, compensation, save/resume.

A :class:`Pruner` holds, for every target ``nn.Linear`` (see :mod:`grpo_prune.pruning.structure`), a bool keep-mask
(weight shape, True = keep; 1 byte per target weight) and, for structured pruning, one bool per unit. What the
scores are made of lives in :class:`~grpo_prune.pruning.indicators.Indicators` (``pruner.indicators``: ``|W0|``,
``|b0|``, the reward-driven statistic, activation statistics and their hooks); how indicators become scores lives in
:data:`~grpo_prune.pruning.scorers.SCORERS`; selection, ties and monotonicity in :mod:`grpo_prune.pruning.masks`;
the sparsity schedule in :mod:`grpo_prune.pruning.schedule`. :meth:`Pruner.memory_bytes` reports the memory of
every piece.

Enforcement is in place, never by reparametrisation, so that vLLM weight sync and ``save_pretrained`` see the zeros:
:meth:`~Pruner.mask_gradients_` before the optimizer step, :meth:`~Pruner.apply_masks_` and
:meth:`~Pruner.mask_optimizer_state_` after it, so that neither momentum nor weight decay revives a pruned entry.

Compensation ("move"): when an entry ``W_ij`` is newly pruned, ``b_i += W_ij * mean(x_j)`` (computed before the
zeroing, in fp32), so that the layer's output at the mean input is unchanged. Unstructured/N:M compensate every
target; structured pruning compensates the consumer (``down_proj``, ``o_proj``), whose input columns are the units.
Bias-free layers get a zero-initialised bias ``Parameter`` first (listed in :attr:`Pruner.added_biases`, so that
export can set ``mlp_bias`` / ``attention_bias``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from grpo_prune.fileio import atomic_write, write_json_atomic
from grpo_prune.pruning import masks as M
from grpo_prune.pruning.indicators import ActivationStats, Indicators, ReducedActivations
from grpo_prune.pruning.schedule import sparsity_at
from grpo_prune.pruning.scorers import SCORERS, GroupContext, ScoringContext, ShardedWeightContext, WeightContext
from grpo_prune.pruning.settings import (
    COMPARISONS,
    GRANULARITIES,
    NORMALIZATIONS,
    STATISTICS,
    STRUCTURED_UNITS,
    PruningSettings,
    _is_number,
)
from grpo_prune.pruning.sharding import ShardLayout, check_supported, is_sharded, local, sharded_new_masks
from grpo_prune.pruning.structure import HeadGroup, MLPGroup, head_groups, mlp_groups, resolve_targets

__all__ = [
    "COMPARISONS",
    "GRANULARITIES",
    "NORMALIZATIONS",
    "STATISTICS",
    "STRUCTURED_UNITS",
    "Pruner",
    "PruningSettings",
]

STATE_FILE = "pruner_state.safetensors"
SETTINGS_FILE = "pruner_state.json"
# Sharded (FSDP2) state: one file per rank, each holding that rank's shards; SETTINGS_FILE records the world size.
SHARDED_STATE_FILE = "pruner_state.rank{rank}-of-{world_size}.safetensors"
# Settings that decide which tensors the state holds and what they mean: a checkpoint written under other values
# cannot be resumed. The schedule fields may legitimately change on resume (e.g. training longer).
_SCALARS = ("step", "movement_updates", "current_sparsity")
_STRUCTURAL_FIELDS = (
    "granularity",
    "n_m",
    "scorer",
    "targets",
    "structured_units",
    "comparison",
    "uniform",
    "statistic",
)


def _clone_settings(settings: PruningSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


class Pruner:
    """Owns the masks and indicators of one model and applies the schedule (see the module docstring).

    Args:
        model: the unwrapped causal LM (not a DDP/Accelerate wrapper: module names are those of the bare model).
        settings: validated here; ``settings.end_step`` etc. are read at every call, so the trainer may resolve
            them after construction.
        frozen_dense: a frozen unpruned copy of ``model`` (e.g. the distillation teacher): ``|W0|`` is read from it
            rather than stored (see :class:`~grpo_prune.pruning.indicators.Indicators`).
        magnitude_from_checkpoint: without ``frozen_dense``, read ``|W0|`` from the safetensors checkpoint the model
            was loaded from, if it still holds the model's weights, rather than store it (the trainer's choice).

    Sharded models (FSDP2, ``fully_shard``: target weights are ``DTensor`` row shards) are detected here
    (:attr:`layout` is then set): masks and per-weight indicators are held for the local shard only, enforcement
    acts on the local shards, selections run distributed (:mod:`grpo_prune.pruning.sharding`) and give the
    one-process masks; :meth:`sparsity` and the other figures are of the whole model (collectives: call them on
    every rank), :meth:`memory_bytes` is this rank's. Construction, prune events, figures and save/load are
    collective under FSDP2.

    Raises:
        ValueError: bad settings, a ``targets`` pattern that matches nothing, an N:M pattern that does not divide
            a target's input features, or a structured request that cannot keep the config consistent (GQA).
            Raised before anything is allocated; the model is never modified by the constructor. Under FSDP2
            also what the sharded pruner does not support (see :func:`~grpo_prune.pruning.sharding.check_supported`).
    """

    def __init__(
        self,
        model: nn.Module,
        settings: PruningSettings | None = None,
        frozen_dense: nn.Module | None = None,
        magnitude_from_checkpoint: bool = False,
    ):
        settings = PruningSettings() if settings is None else settings
        settings.validate()
        self.model = model
        self.settings = settings
        all_targets = resolve_targets(model, settings.targets)

        self.mlp_groups: list[MLPGroup] = []
        self.head_groups: list[HeadGroup] = []
        if settings.granularity == "structured":
            units = settings.structured_units.split("+")
            if "mlp" in units:
                self.mlp_groups = mlp_groups(model, all_targets)
            if "heads" in units:
                self.head_groups = head_groups(model, all_targets)
                self._check_head_sparsity(settings.target_sparsity)
            members = {n for g in self.groups for n in (*g.producers, g.consumer)}
            # Only the layers the units span carry masks: k/v_proj are never pruned by head units.
            self.targets: dict[str, nn.Linear] = {n: mod for n, mod in all_targets.items() if n in members}
        else:
            self.targets = all_targets
        if settings.granularity == "n:m":
            _, m = M.parse_n_m(settings.n_m)
            for name, mod in self.targets.items():
                if mod.in_features % m:
                    raise ValueError(
                        f"`n_m`={settings.n_m!r}: {name} has {mod.in_features} input features, not a multiple of "
                        f"M={m}; exclude it with `targets` or choose another M."
                    )

        #: Shard layout when the targets are FSDP2 row shards, else None.
        self.layout: ShardLayout | None = None
        if any(is_sharded(mod.weight) for mod in self.targets.values()):
            check_supported(settings)
            self.layout = ShardLayout(self.targets)
        self.masks: dict[str, Tensor] = {
            n: torch.ones_like(local(mod.weight), dtype=torch.bool) for n, mod in self.targets.items()
        }
        self.unit_masks: dict[str, Tensor] = {
            g.prefix: torch.ones(g.num_units, dtype=torch.bool, device=self.targets[g.consumer].weight.device)
            for g in self.groups
        }
        bias_producers = [n for g in self.groups for n in g.producers]
        self.indicators = Indicators(
            model,
            self.targets,
            settings,
            bias_producers,
            frozen_dense=frozen_dense,
            magnitude_from_checkpoint=magnitude_from_checkpoint,
            row_offset=self.layout.row_offset if self.layout is not None else None,
        )
        if self.layout is not None:
            self.indicators.any_fn = self.layout.any
            # Each rank's forwards see its own data: activation statistics are summed over the FSDP group (the
            # trainer may replace this with an equivalent reduction).
            self.indicators.set_reduce_fn(self.layout.all_reduce_sum)
        self._count_cache: dict[str, tuple[Tensor, int, int]] = {}
        self.step = 0
        self.current_sparsity = 0.0  # the scheduled sparsity the masks were last grown to
        self.added_biases: list[str] = []

    # ------------------------------------------------------------------------------------- indicators (views)
    @property
    def magnitude(self) -> dict[str, Tensor]:
        """``|W0|`` per target (empty when the scorer does not use it)."""
        return self.indicators.magnitude

    @property
    def bias_magnitude(self) -> dict[str, Tensor]:
        return self.indicators.bias_magnitude

    @property
    def movement(self) -> dict[str, Tensor]:
        """The reward-driven statistic per target in float32 (its form is ``settings.statistic``; empty when
        unused). A copy: the statistic is stored in 2 bytes per weight (:class:`~.compact.RowScaledHalf`)."""
        return {n: acc.value() for n, acc in self.indicators.statistic.items()}

    @property
    def movement_updates(self) -> int:
        return self.indicators.statistic_updates

    @property
    def activations(self) -> dict[str, ActivationStats]:
        return self.indicators.activations

    def attach_hooks(self) -> None:
        """Start recording activation statistics over real tokens (see :meth:`Indicators.attach_hooks`), and the
        Gram matrices of ``sparsegpt`` while a later event can still read them (:meth:`_sync_gram`)."""
        self._sync_gram()
        self.indicators.attach_hooks()

    @property
    def reached_target(self) -> bool:
        """Whether the masks have reached the final target sparsity: no later schedule event prunes anything. The
        same on every rank (it follows the masks, which are identical everywhere)."""
        return self.current_sparsity >= self.settings.final_sparsity - 1e-9

    def _sync_gram(self) -> None:
        """``sparsegpt``: free the Gram matrices once the target is reached (nothing reads them any more, and they
        would cost a forward-sized product per token plus ``4 * in^2`` bytes per input in memory and in every
        checkpoint), and start a fresh accumulator if a resumed run raised the target."""
        if not self.settings.needs_gram:
            return
        if self.reached_target:
            self.indicators.release_gram()
        else:
            self.indicators.restore_gram()

    def remove_hooks(self) -> None:
        self.indicators.remove_hooks()

    def reset_activation_stats(self) -> None:
        """Forget the activation statistics (e.g. to score on the current model's activations only)."""
        self.indicators.reset_activation_stats()

    def set_reduce_fn(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """``fn(t) -> t`` summing ``t`` over processes (DDP); see :meth:`Indicators.set_reduce_fn`."""
        self.indicators.set_reduce_fn(fn)

    def accumulate_movement_(self, grads: dict[str, Tensor] | None = None) -> None:
        """One step of the reward-driven statistic (see :meth:`Indicators.accumulate_statistic_`): from ``grads``
        (the policy-gradient term's gradients) or, by default, from each target's ``weight.grad``."""
        self.indicators.accumulate_statistic_(grads)

    # ---------------------------------------------------------------------------------------------- structure
    @property
    def groups(self) -> list[MLPGroup | HeadGroup]:
        """Structural unit groups (structured granularity only), MLP first."""
        return [*self.mlp_groups, *self.head_groups]

    def _check_head_sparsity(self, sparsity: float) -> None:
        r = self.head_groups[0].heads_per_kv
        pruned = sparsity * r
        if abs(pruned - round(pruned)) > 1e-6 or (sparsity > 0 and round(pruned) == 0):
            reachable = ", ".join(f"{k / r:.4g}" for k in range(1, r))
            raise ValueError(
                f"`target_sparsity`={sparsity} cannot keep GQA consistent for head pruning: each of the "
                f"{self.head_groups[0].num_kv_heads} KV groups has {r} query heads and must lose the same whole "
                f"number of them; reachable head sparsities: {reachable} (or use structured_units='mlp')."
            )

    # ------------------------------------------------------------------------------------------- enforcement
    def _pruned_targets(self):
        """``(name, module, mask)`` for every target with at least one pruned entry (layers with nothing pruned
        are skipped: there is nothing to enforce)."""
        for name, mod in self.targets.items():
            if self._pruned_count(name) > 0:
                yield name, mod, self.masks[name]

    # Enforcement multiplies by the bool keep-mask instead of ``masked_fill_(~mask, 0)``: on SmolLM2's 106M target
    # weights (CPU, 2 threads) one pass takes 0.06 s against 0.28 s, and needs no inverted copy of the masks. A
    # pruned entry becomes ``+0.0`` or ``-0.0``; both compare equal to zero.

    def mask_gradients_(self) -> None:
        """``grad *= mask`` in place, so pruned entries neither move nor count in the gradient norm."""
        for _, mod, mask in self._pruned_targets():
            if mod.weight.grad is not None:
                local(mod.weight.grad).mul_(mask)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """``weight *= mask`` in place (same storage, so tied views and vLLM weight sync see the zeros)."""
        for _, mod, mask in self._pruned_targets():
            local(mod.weight).mul_(mask)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: Any) -> None:
        """Zero every optimizer state tensor shaped like a target weight at its pruned entries (Adam's
        ``exp_avg``/``exp_avg_sq``, momentum buffers...). Accepts wrappers exposing ``.optimizer``.

        Needed when entries are newly pruned (and after loading state): from then on their gradients are masked,
        so Adam's and SGD's state stays zero there by itself.
        """
        state = getattr(optimizer, "state", None)
        if state is None and hasattr(optimizer, "optimizer"):
            state = optimizer.optimizer.state
        if not state:
            return
        for _, mod, mask in self._pruned_targets():
            param_state = state.get(mod.weight)
            if not param_state:
                continue
            for value in param_state.values():
                # Under FSDP2 the state tensors are DTensors too (or already local): mask their local shard.
                if torch.is_tensor(value) and value.shape == mod.weight.shape:
                    local(value).mul_(mask.to(value.device))
                elif torch.is_tensor(value) and value.shape == mask.shape:
                    value.mul_(mask.to(value.device))

    # -------------------------------------------------------------------------------------------------- scores
    def _context(self, acts: ReducedActivations) -> ScoringContext:
        if self.layout is not None:
            return ShardedWeightContext(self.indicators, self.settings, acts, self.targets, self.layout)
        if self.groups:
            return GroupContext(self.indicators, self.settings, acts, self.targets, self.groups)
        return WeightContext(self.indicators, self.settings, acts, self.targets)

    def _score(self) -> tuple[dict[str, Tensor], ScoringContext]:
        if self.settings.needs_gram:
            raise ValueError("scorer='sparsegpt' has no scores: it selects and reconstructs at each event.")
        acts = self.indicators.reduced_activations() if self._scores_need_activations() else ReducedActivations()
        ctx = self._context(acts)
        return SCORERS[self.settings.scorer](ctx), ctx

    def score_tensors(self) -> dict[str, Tensor]:
        """Current fp32 scores (higher = kept): per target weight (unstructured, N:M), or per unit ``[num_units]``
        keyed by the group prefix (structured). Already-pruned entries keep their raw score here."""
        return self._score()[0]

    def _scores_need_activations(self) -> bool:
        return self.settings.scorer not in ("random", "movement") and bool(self.indicators.activations)

    # ------------------------------------------------------------------------------------------------- pruning
    def target_sparsity_at(self, step: int) -> float:
        """Scheduled sparsity at optimizer step ``step`` (see :func:`~grpo_prune.pruning.schedule.sparsity_at`)."""
        s = self.settings
        return sparsity_at(
            step,
            schedule=s.schedule,
            initial=s.initial_sparsity,
            final=s.final_sparsity,
            start=s.start_step,
            end=s.end_step,
            every=s.every,
        )

    def maybe_prune(self, step: int) -> dict[str, Any] | None:
        """At a schedule event that raises the sparsity: rescore, grow the masks, apply (and compensate).

        A call after a missed event catches up to the scheduled value. Returns the event record (see
        :meth:`prune_to`) or None when the schedule asks for nothing new.
        """
        self.step = int(step)
        target = self.target_sparsity_at(step)
        if target <= self.current_sparsity + 1e-12:
            return None
        missing = self.missing_indicators()
        if missing:
            # E.g. an event at step 0, before any rollout or gradient: scoring now would rank by index (all-zero
            # movement) or fail (no activations). The next call catches up with the schedule.
            warnings.warn(
                f"Prune event at step {step} deferred: no {' and no '.join(missing)} recorded yet.", stacklevel=2
            )
            return None
        return self._prune(target)

    def missing_indicators(self) -> list[str]:
        """Indicators the scorer cannot do without that hold no data yet (``"activations"``, ``"movement"``).

        ``mama`` never waits for its reward statistic: without signal the pretrained term decides alone (see
        :func:`~grpo_prune.pruning.scorers.mama`); ``movement`` has nothing else to rank by and waits.
        """
        missing = []
        if (self._scores_need_activations() or self.settings.compensate) and not self.indicators.has_activations():
            missing.append("activations")
        if self.settings.needs_gram and not self.indicators.has_gram():
            missing.append("inputs (Gram matrices)")
        needs_statistic = self.settings.scorer == "movement" or (
            self.settings.scorer == "mama" and self.settings.alpha >= 1.0
        )
        if needs_statistic and not self.indicators.statistic_signal()[0]:
            missing.append("movement")
        return missing

    def prune_to(self, sparsity: float) -> dict[str, Any]:
        """Grow the masks to ``sparsity`` now, outside the schedule (one-shot).

        Returns:
            ``{"step", "target", "reached", "num_pruned", "newly_pruned", "layer_sparsity", "unit_sparsity"
            (structured), "compensated"}``; sparsities are fractions of the target weights (of units, which
            is the same figure, for structured pruning).

        Raises:
            ValueError: ``sparsity`` outside [current sparsity, 1), above ``1 - N/M`` for N:M, or off the GQA
                grid for head pruning.
        """
        if not _is_number(sparsity) or not self.current_sparsity - 1e-12 <= sparsity < 1.0:
            raise ValueError(
                f"`sparsity` must be in [{self.current_sparsity}, 1) (masks are monotone), got {sparsity!r}."
            )
        if self.settings.granularity == "n:m":
            n, m = M.parse_n_m(self.settings.n_m)
            if sparsity > 1.0 - n / m + 1e-6:
                raise ValueError(f"`sparsity` must be <= 1 - N/M = {1 - n / m:g} for n_m={self.settings.n_m!r}.")
        if self.head_groups:
            self._check_head_sparsity(sparsity)
        return self._prune(float(sparsity))

    @torch.no_grad()
    def start_from_masks(self, masks: dict[str, Tensor]) -> float:
        """Begin from given keep-masks (e.g. a one-shot prune's, read from its export's mask sidecar) instead of
        dense: they become the masks, the weights are zeroed where they say so, and :attr:`current_sparsity` is
        what they reach. Later schedule events only prune further (masks are monotone); with a target equal to
        the masks' sparsity they are held for the whole run.

        Args:
            masks: target module name -> full-size bool keep-mask ``[out, in]`` (True = keep), one per target.
                Under FSDP2 every rank passes the full masks and keeps its own rows.

        Returns:
            the sparsity reached (fraction of the target weights pruned).

        Raises:
            ValueError: structured granularity (a unit mask is not recoverable from weight masks: train the sliced
                export instead), masks already grown, names or shapes that differ from the targets, a non-bool
                mask, or, for N:M, a group of M inputs keeping fewer than N weights.
        """
        if self.groups:
            raise ValueError(
                "Starting from masks needs `granularity` 'unstructured' or 'n:m': for structured pruning, train the "
                "physically smaller export of the one-shot model instead (no masks needed)."
            )
        if self.current_sparsity > 0 or self.num_pruned():
            raise ValueError("start_from_masks() must come before any prune event (the masks are already grown).")
        missing, unexpected = sorted(set(self.masks) - set(masks)), sorted(set(masks) - set(self.masks))
        if missing or unexpected:
            raise ValueError(
                f"The given masks do not match the pruning targets: missing {missing[:3]}, unexpected "
                f"{unexpected[:3]} (masks from another model or `prune_targets`?)."
            )
        n_m = M.parse_n_m(self.settings.n_m) if self.settings.granularity == "n:m" else None
        for name, mask in masks.items():
            shape = tuple(self.targets[name].weight.shape)  # a DTensor's shape is the full one
            if mask.dtype != torch.bool or tuple(mask.shape) != shape:
                raise ValueError(
                    f"Mask of {name}: expected a bool tensor of shape {shape}, got {mask.dtype} {tuple(mask.shape)}."
                )
            if n_m is not None:
                kept = mask.reshape(shape[0], -1, n_m[1]).sum(-1)
                if bool((kept < n_m[0]).any()):
                    raise ValueError(
                        f"Mask of {name} keeps fewer than {n_m[0]} of some {n_m[1]} consecutive inputs: it does not "
                        f"follow n_m={self.settings.n_m!r}."
                    )
        for name, mask in masks.items():
            mine = self.masks[name]
            mask = mask.to(mine.device)
            mine.copy_(self.layout.local_rows(name, mask) if self.layout is not None else mask)
        self.apply_masks_()
        self.current_sparsity = self.sparsity()
        self._sync_gram()
        return self.current_sparsity

    @torch.no_grad()
    def _new_masks(
        self, sparsity: float, scores: dict[str, Tensor], notes: dict[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(weight masks, unit masks) at ``sparsity``, monotone w.r.t. the current ones. ``notes`` receives what
        the event records about the allocation (``reward_allocation``)."""
        s = self.settings
        if self.layout is not None:
            return sharded_new_masks(self.layout, s, sparsity, scores, self.masks), {}
        if s.granularity == "unstructured":
            if s.comparison == "global":
                new = M.global_unstructured_masks(scores, sparsity, dict(self.masks))
            elif (layer := self._allocated_sparsities(sparsity, scores, {} if notes is None else notes)) is not None:
                new = {n: M.unstructured_mask(sc, layer[n], self.masks[n]) for n, sc in scores.items()}
            else:
                per_row = s.comparison == "row"
                new = {
                    n: M.unstructured_mask(sc, sparsity, self.masks[n], per_row=per_row) for n, sc in scores.items()
                }
            return new, {}
        if s.granularity == "n:m":
            n, m = M.parse_n_m(s.n_m)
            partial = sparsity if sparsity < 1.0 - n / m - 1e-9 else None
            new = {name: M.n_m_mask(sc, n, m, partial, self.masks[name]) for name, sc in scores.items()}
            return new, {}

        units: dict[str, Tensor] = {}
        mlp_scores = {g.prefix: scores[g.prefix] for g in self.mlp_groups}
        if mlp_scores and not s.uniform:
            prev = {p: self.unit_masks[p] for p in mlp_scores}
            units.update(M.global_unstructured_masks(mlp_scores, sparsity, prev))
        else:
            for g in self.mlp_groups:
                units[g.prefix] = M.group_mask(
                    scores[g.prefix], round(sparsity * g.num_units), self.unit_masks[g.prefix]
                )
        for g in self.head_groups:
            # Equal numbers in every KV group: select within each group of r query heads.
            k, r = g.num_kv_heads, g.heads_per_kv
            per_kv, prev = scores[g.prefix].reshape(k, r), self.unit_masks[g.prefix].reshape(k, r)
            n_prune = g.heads_to_prune_per_kv(sparsity)
            units[g.prefix] = torch.cat([M.group_mask(per_kv[i], n_prune, prev[i]) for i in range(k)])
        return self.unit_weight_masks(units), units

    def unit_weight_masks(self, units: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keep-masks of the structural groups' layers from their unit keep-masks (group prefix -> ``[num_units]``):
        producers' rows and the consumer's columns, within the current masks."""
        new = {}
        for g in self.groups:
            for name, dim, size in GroupContext.layout(g):
                shape = tuple(self.targets[name].weight.shape)
                new[name] = M.expand_group_mask(units[g.prefix], shape, dim, group_size=size) & self.masks[name]
        return new

    def _allocated_sparsities(
        self, sparsity: float, scores: dict[str, Tensor], notes: dict[str, Any]
    ) -> dict[str, float] | None:
        """Per-target sparsities of ``settings.allocation`` (unstructured, layer comparison), or None: every target
        at ``sparsity``.

        ``"owl"``: :func:`~grpo_prune.pruning.masks.owl_sparsities` of the scores. ``"reward"``: the reward
        statistic's mass per decoder layer (:func:`~grpo_prune.pruning.masks.reward_sparsities`), both bounded by
        ``owl_lambda``; while the statistic carries no signal (not tracked, fewer than ``min_statistic_updates``
        reward-signal steps, all zero) the event is uniform, a warning says so and ``notes["reward_allocation"]``
        is False, as ``statistic_mixed`` is for mama (True when the statistic decided)."""
        s = self.settings
        if s.allocation == "owl":
            return M.owl_sparsities(scores, sparsity, lam=s.owl_lambda, m=s.owl_m, prev_masks=self.masks)
        if s.allocation != "reward":
            return None
        usable, why = self.indicators.statistic_signal()
        notes["reward_allocation"] = usable
        if not usable:
            warnings.warn(
                f"allocation='reward': the reward statistic has no signal ({why}); this event prunes every layer "
                "at the same sparsity.",
                stacklevel=5,
            )
            return None
        return M.reward_sparsities(_StatisticView(self.indicators), sparsity, lam=s.owl_lambda, prev_masks=self.masks)

    def _compensated_layers(self) -> list[str]:
        if self.groups:
            return [g.consumer for g in self.groups]
        return list(self.targets)

    def add_compensation_biases_(self) -> list[str]:
        """Give every layer that compensation may write to a zero bias ``Parameter`` if it has none.

        Optional: pruning adds them lazily. Calling this before building the optimizer (and before DDP wrapping)
        lets the new biases train and be registered everywhere. Returns the names that received a bias.
        """
        added = []
        for name in self._compensated_layers():
            mod = self.targets[name]
            if mod.bias is None:
                mod.bias = nn.Parameter(
                    torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device),
                    requires_grad=mod.weight.requires_grad,
                )
                self.added_biases.append(name)
                added.append(name)
        return added

    @torch.no_grad()
    def _compensate_(self, new_masks: dict[str, Tensor], acts: ReducedActivations) -> None:
        """``b_i += sum_j W_ij * mean(x_j)`` over newly pruned ``j``, before the weights are zeroed."""
        self.add_compensation_biases_()
        for name in self._compensated_layers():
            mod = self.targets[name]
            newly = self.masks[name] & ~new_masks[name]
            if not newly.any():
                continue
            delta = (mod.weight.float() * newly) @ acts.mean[name]
            mod.bias.add_(delta.to(mod.bias.dtype))

    @torch.no_grad()
    def _prune_sparsegpt(self, sparsity: float) -> dict[str, Any]:
        """An event of ``scorer='sparsegpt'``: each target is pruned to ``sparsity`` with OBS reconstruction of its
        kept weights from the Gram matrix of its inputs so far; the current masks stay pruned (monotone). N:M
        prunes the final pattern at its first event (a partial N:M pattern is not an OBS selection).

        The optimizer state of the reconstructed (kept) weights is kept as it is; only pruned entries' state is
        zeroed (:meth:`mask_optimizer_state_`). Measured against zeroing Adam's ``exp_avg`` of every reconstructed
        row (``scripts/measure_sparsegpt_moments.py``, ``results/sparsegpt_moments/``: tiny Llama, 3 events, 10
        seeds over two learning rates and sparsities): the reset lowers the loss of the 5 steps after an event by
        0.3-0.8% but ends with a 1.2% higher held-out perplexity in 10 of 10 runs."""
        from grpo_prune.pruning.sparsegpt import sparsegpt_prune_

        if not self.indicators.has_gram():
            freed = (
                " (they were freed when the masks reached the target sparsity)"
                if self.indicators.gram_released
                else ""
            )
            raise ValueError(
                f"scorer='sparsegpt' needs the Gram matrices of every target's inputs; none are held{freed}."
            )
        n_m = self.settings.n_m if self.settings.granularity == "n:m" else None
        if n_m is not None:  # OBS selects whole N:M groups: the final pattern at the first event
            sparsity = self.settings.final_sparsity
        before = self.num_pruned()
        for name, mod in self.targets.items():
            keep = sparsegpt_prune_(
                mod.weight.data,
                self.indicators.reduced_hessian(name),
                sparsity,
                n_m=n_m,
                prev_keep=self.masks[name],
                comparison=self.settings.comparison,
            )
            self.masks[name] = keep
        self.apply_masks_()
        self.current_sparsity = max(self.current_sparsity, sparsity)
        self._sync_gram()  # the last event: the Gram matrices go now, before any checkpoint is written
        return {**self._event_record(sparsity, before, compensated=False), "reconstructed": True}

    def _event_record(self, sparsity: float, pruned_before: int, compensated: bool) -> dict[str, Any]:
        return {
            "step": self.step,
            "target": sparsity,
            "reached": self.sparsity(),
            "num_pruned": self.num_pruned(),
            "newly_pruned": self.num_pruned() - pruned_before,
            "layer_sparsity": self.layer_sparsity(),
            "compensated": compensated,
        }

    def _prune(self, sparsity: float) -> dict[str, Any]:
        if self.settings.needs_gram:
            return self._prune_sparsegpt(sparsity)
        need_acts = self._scores_need_activations() or self.settings.compensate
        acts = self.indicators.reduced_activations() if need_acts else ReducedActivations()
        ctx = self._context(acts)
        scores = SCORERS[self.settings.scorer](ctx)
        new_masks, new_units = self._new_masks(sparsity, scores, ctx.notes)
        before = self.num_pruned()
        if self.settings.compensate:
            self._compensate_(new_masks, acts)
        self.masks.update(new_masks)
        self.unit_masks.update(new_units)
        self.apply_masks_()
        self.current_sparsity = max(self.current_sparsity, sparsity)
        record = self._event_record(sparsity, before, compensated=bool(self.settings.compensate))
        if self.unit_masks:
            record["unit_sparsity"] = self.unit_sparsity()
        record.update(ctx.notes)
        record["score_sample"] = _score_sample(scores)
        return record

    # -------------------------------------------------------------------------------------------------- figures
    def sparsity(self) -> float:
        """Fraction of target weights pruned (masked)."""
        total = sum(self._numel(n) for n in self.masks)
        return self.num_pruned() / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction pruned per target weight matrix."""
        counts = self._counts()
        return {n: counts[n] / self._numel(n) for n in self.masks}

    def unit_sparsity(self) -> dict[str, float]:
        """Fraction of units pruned per structural group (structured only)."""
        return {p: 1.0 - m.sum().item() / m.numel() for p, m in self.unit_masks.items()}

    def num_pruned(self) -> int:
        """Number of pruned target weights."""
        return sum(self._counts().values())

    def _numel(self, name: str) -> int:
        """Elements of the full weight of ``name`` (the mask holds only the local shard under FSDP2)."""
        return self.layout.numel(name) if self.layout is not None else self.masks[name].numel()

    def _counts(self) -> dict[str, int]:
        """Pruned entries per target over the whole model (one all-reduce under FSDP2)."""
        counts = {n: self._pruned_count(n) for n in self.masks}
        if self.layout is None:
            return counts
        total = self.layout.all_reduce_sum(torch.tensor(list(counts.values()), dtype=torch.int64))
        return dict(zip(counts, (int(c) for c in total), strict=True))

    def gathered_masks(self) -> dict[str, Tensor]:
        """Full keep-masks ``[out, in]`` on every rank (collective under FSDP2; the masks themselves otherwise),
        e.g. for :func:`grpo_prune.export.export_pruned` of the gathered model."""
        if self.layout is None:
            return dict(self.masks)
        return {n: self.layout.full_tensor(n, m) for n, m in self.masks.items()}

    def _pruned_count(self, name: str) -> int:
        # Counting a bool mask costs a pass over it; the trainer asks every step, masks change only at events.
        # The cache holds the mask object itself, so a replaced mask (new tensor) is recounted.
        mask = self.masks[name]
        cached = self._count_cache.get(name)
        if cached is None or cached[0] is not mask or cached[2] != mask._version:
            cached = (mask, mask.numel() - int(mask.sum().item()), mask._version)
            self._count_cache[name] = cached
        return cached[1]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held by each piece (``masks``, ``unit_masks``, and the indicators' ``magnitude``,
        ``bias_magnitude``, ``movement`` (the reward statistic), ``activations``), on this rank: under FSDP2 the
        per-weight pieces are this rank's shards (about the one-process figure divided by the world size)."""

        def size(tensors: Any) -> int:
            return int(sum(t.numel() * t.element_size() for t in tensors))

        return {
            "masks": size(self.masks.values()),
            "unit_masks": size(self.unit_masks.values()),
            **self.indicators.memory_bytes(),
        }

    def report(self) -> dict[str, Any]:
        """JSON-able summary: settings, targets, bias indicator presence, added biases, memory, sparsity."""
        biases_present = bool(self.indicators.bias_magnitude) or any(
            self.targets[n].bias is not None and n not in self.added_biases for g in self.groups for n in g.producers
        )
        return {
            "settings": _clone_settings(self.settings),
            "num_targets": len(self.targets),
            "target_params": int(sum(self._numel(n) for n in self.masks)),
            "bias_indicator": (
                "used" if self.bias_magnitude else ("absent: bias-free units" if self.groups else "not used")
            ),
            "biases_present": biases_present,
            "added_biases": list(self.added_biases),
            "indicator_memory_bytes": self.memory_bytes(),
            "step": self.step,
            "current_sparsity": self.current_sparsity,
            "sparsity": self.sparsity(),
        }

    # ---------------------------------------------------------------------------------------------- save/load
    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor needed to resume exactly: masks, unit masks, the indicators (|W0|/|b0| snapshots, reward
        statistic, activation statistics), biases added by compensation, step and current sparsity. Values are the
        live tensors."""
        sd: dict[str, Tensor] = {
            "step": torch.tensor([self.step], dtype=torch.int64),
            "current_sparsity": torch.tensor([self.current_sparsity], dtype=torch.float64),
        }
        sd.update({f"mask/{n}": t for n, t in self.masks.items()})
        sd.update({f"unit_mask/{n}": t for n, t in self.unit_masks.items()})
        sd.update(self.indicators.state_dict())
        for n in self.added_biases:
            sd[f"added_bias/{n}"] = self.targets[n].bias.detach()
        return sd

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict` bit-exactly (same keys, shapes and dtypes required; ValueError otherwise).

        Biases that compensation had added are re-created (or overwritten) with their saved values, so resuming
        is exact whether the model weights were loaded before or after. Weights are not re-masked here: call
        :meth:`apply_masks_` if the model may hold values at pruned entries.
        """
        state_dict = self.indicators.upgrade_state(state_dict)
        if self.settings.needs_gram and "current_sparsity" in state_dict:
            # At the target the Gram matrices are not needed: never recreated, and dropped from an older state.
            saved = float(state_dict["current_sparsity"].item())
            if saved >= self.settings.final_sparsity - 1e-9:
                self.indicators.release_gram()
            state_dict = self.indicators.drop_released_state(state_dict)
        self.indicators.prepare_state(state_dict)
        own = self.state_dict()
        own_keys = {k for k in own if not k.startswith("added_bias/")}
        given_keys = {k for k in state_dict if not k.startswith("added_bias/")}
        if own_keys != given_keys:
            missing, unexpected = sorted(own_keys - given_keys), sorted(given_keys - own_keys)
            raise ValueError(
                f"Pruner state does not match these settings/model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]} (a checkpoint from another granularity, scorer or target set?)."
            )
        for key in own_keys:
            mine, theirs = own[key], state_dict[key]
            if mine.shape != theirs.shape or mine.dtype != theirs.dtype:
                raise ValueError(
                    f"Pruner state {key!r}: saved {tuple(theirs.shape)}/{theirs.dtype}, expected "
                    f"{tuple(mine.shape)}/{mine.dtype}."
                )
        for key in own_keys:
            if key not in _SCALARS and not key.startswith(("gram_owner/", "gram_tokens/")):  # loaded by prepare_state
                own[key].copy_(state_dict[key])
        self.step = int(state_dict["step"].item())
        self.indicators.load_scalars(state_dict)
        self.current_sparsity = float(state_dict["current_sparsity"].item())
        self._sync_gram()
        for key, value in state_dict.items():
            if not key.startswith("added_bias/"):
                continue
            name = key.split("/", 1)[1]
            if name not in self.targets:
                raise ValueError(f"Pruner state adds a bias to {name!r}, which is not a target here.")
            mod = self.targets[name]
            if mod.bias is None:
                mod.bias = nn.Parameter(
                    torch.empty(mod.out_features, dtype=value.dtype, device=mod.weight.device),
                    requires_grad=mod.weight.requires_grad,
                )
            mod.bias.copy_(value)
            if name not in self.added_biases:
                self.added_biases.append(name)

    def state_file(self) -> str:
        """Name of this process's state file: ``pruner_state.safetensors``, or under FSDP2
        ``pruner_state.rank{r}-of-{w}.safetensors`` (each rank writes and reads its own shards)."""
        if self.layout is None:
            return STATE_FILE
        return SHARDED_STATE_FILE.format(rank=self.layout.rank, world_size=self.layout.world_size)

    def save(self, path_dir: str | os.PathLike[str], write: bool = True) -> None:
        """Write ``pruner_state.safetensors`` and ``pruner_state.json`` (settings) into ``path_dir`` atomically
        (temporary file, then ``os.replace``): an interrupted save never leaves a truncated state behind.

        Under FSDP2 every rank must call it: each writes ``pruner_state.rank{r}-of-{w}.safetensors`` with its
        shards, and rank 0 writes ``pruner_state.json`` (with ``world_size``). Under DDP (a reduce function set,
        no shards) every rank must call it too: the per-process sums are summed over processes
        (:meth:`Indicators.reduced_state_dict`), and only the rank given ``write=True`` writes them; on resume,
        ``load(..., holds_sums=False)`` on the other ranks counts them once."""
        state = self.state_dict()
        if self.layout is None and self.indicators._reduce_fn is not None:
            state.update(self.indicators.reduced_state_dict())
        if not write:
            return
        os.makedirs(path_dir, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        atomic_write(os.path.join(path_dir, self.state_file()), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        meta = {
            "settings": _clone_settings(self.settings),
            "step": self.step,
            "current_sparsity": self.current_sparsity,
            "added_biases": self.added_biases,
        }
        if self.layout is not None:
            meta["world_size"] = self.layout.world_size
            if self.layout.rank != 0:
                return
        write_json_atomic(os.path.join(path_dir, SETTINGS_FILE), meta)

    def load(self, path_dir: str | os.PathLike[str], holds_sums: bool = True) -> None:
        """Restore what :meth:`save` wrote. Structural settings (granularity, N:M, scorer, targets, units,
        comparison, uniform) must match (ValueError); other differences (e.g. a longer schedule) only warn.

        ``holds_sums=False`` (DDP, every rank but one): the saved per-process sums, already summed over processes,
        are zeroed after loading, so that the next cross-process reduction counts them once."""
        with open(os.path.join(path_dir, SETTINGS_FILE)) as f:
            meta = json.load(f)
        saved, mine = meta.get("settings", {}), _clone_settings(self.settings)
        clash = [k for k in _STRUCTURAL_FIELDS if k in saved and saved[k] != mine[k]]
        if clash:
            raise ValueError(
                "Pruner checkpoint was written with other settings: "
                + ", ".join(f"{k}={saved[k]!r} (now {mine[k]!r})" for k in clash)
            )
        changed = [k for k in mine if k in saved and saved[k] != mine[k] and k not in _STRUCTURAL_FIELDS]
        if changed:
            warnings.warn(f"Resuming pruning with changed settings: {changed}", stacklevel=2)
        saved_world = meta.get("world_size")  # None: an unsharded state
        world = None if self.layout is None else self.layout.world_size
        if saved_world != world:

            def how(w: int | None) -> str:
                return "unsharded (one file for the whole model)" if w is None else f"sharded by FSDP2 over {w} ranks"

            raise ValueError(
                f"Pruner checkpoint {path_dir} is {how(saved_world)}, but this run is {how(world)}: masks and "
                "indicators are stored per shard, so resume with the world size (and FSDP setting) it was saved with."
            )
        state = load_file(os.path.join(path_dir, self.state_file()))
        self.load_state_dict(state)
        if not holds_sums:
            self.indicators.clear_rank_sums_()


class _StatisticView(Mapping):
    """Target name -> the reward statistic in float32, decompressed on access (one tensor at a time, rather than a
    float32 copy of every target's at once)."""

    def __init__(self, indicators: Indicators):
        self._indicators = indicators

    def __getitem__(self, name: str) -> Tensor:
        return self._indicators.reduced_statistic(name)

    def __iter__(self):
        return iter(self._indicators.statistic)

    def __len__(self) -> int:
        return len(self._indicators.statistic)


SCORE_SAMPLE_SIZE = 10_000


def _score_sample(scores: dict[str, Tensor]) -> Tensor:
    """An evenly strided fp32 subsample (about ``SCORE_SAMPLE_SIZE`` values, on CPU) of every layer's scores at an
    event, for quantiles and histograms, so the caller never recomputes or holds the full scores."""
    total = sum(t.numel() for t in scores.values())
    stride = max(1, total // SCORE_SAMPLE_SIZE)
    return torch.cat([t.detach().flatten()[::stride].float().cpu() for t in scores.values()])

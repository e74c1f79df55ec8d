"""The stateful pruning engine: indicators, masks, schedule events, enforcement, save/resume.

A :class:`Pruner` owns, for every target ``nn.Linear`` (see :mod:`grpo_prune.pruning.structure`):

========================  ====================================================  =========================================
state                     what                                                  memory
========================  ====================================================  =========================================
``masks``                 bool keep-mask, weight shape (True = keep)            1 byte per target weight
``magnitude``             ``|W0|`` snapshot at construction, weight dtype       one weight copy (2 B/weight in bf16,
                          (magnitude, wanda, mama with alpha < 1)               4 B in fp32)
``bias_magnitude``        ``|b0|`` of the unit producers' biases (structured,   one bias copy; absent on bias-free
                          where biases exist)                                   models (Llama, SmolLM2)
``movement``              fp32 ``R = sum_t -(grad_t * W_t)`` (movement, mama)   4 bytes per target weight
``activations``           per input feature: sum of squares, sum (fp64) and a   3 vectors per target layer input:
                          token count (wanda, structured, compensate)           ``16 * in_features + 8`` bytes per layer
========================  ====================================================  =========================================

Unit masks (structured) add one bool per neuron/head. Nothing is allocated for an indicator the scorer does not use.
:meth:`Pruner.memory_bytes` reports the actual figures.

Enforcement is in place, never by reparametrisation, so that vLLM weight sync and ``save_pretrained`` see the zeros:
:meth:`~Pruner.mask_gradients_` before the optimizer step, :meth:`~Pruner.apply_masks_` and
:meth:`~Pruner.mask_optimizer_state_` after it, so that neither momentum nor weight decay revives a pruned entry.

Scores (higher = kept; selection, ties and monotonicity live in :mod:`grpo_prune.pruning.masks`):

- unstructured / N:M, per weight: ``magnitude`` = ``|W0|``; ``wanda`` = ``|W0_ij| * a_j``; ``movement`` = ``R``;
  ``random``; ``mama`` = ``(1 - alpha) * norm(P) + alpha * norm(R)`` where the pretrained term ``P`` is ``|W0|``,
  or ``|W0_ij| * a_j`` when activations are tracked. ``a_j`` is the RMS of input feature ``j`` over every token
  seen by the forward hooks (Wanda's L2 norm divided by sqrt(tokens): the same ranking within a layer, and
  comparable across layers whatever the token count).
- structured, per unit (always activation-aware: DESIGN.md measured weight-norm-only scores collapsing the model):
  ``magnitude`` = ``(||W0_group||_2 + ||b0_group||_2) * a_unit``, where ``a_unit`` is the RMS of the unit's output
  as seen by the consumer layer (``down_proj`` input feature ``i`` for a neuron; the L2 over the head's ``head_dim``
  ``o_proj`` input features for a head) and ``b0_group`` the producers' biases of the unit (absent: 0);
  ``wanda`` = L2 over the group of the per-weight Wanda scores; ``movement`` = sum of ``R`` over the group;
  ``mama`` = ``(1 - alpha) * norm(||W0_group|| * a + ||b0_group|| * a) + alpha * norm(sum R)``.

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
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from grpo_prune.fileio import atomic_write, write_json_atomic
from grpo_prune.pruning import masks as M
from grpo_prune.pruning import scores as S
from grpo_prune.pruning.schedule import SCHEDULES, sparsity_at
from grpo_prune.pruning.structure import HeadGroup, MLPGroup, head_groups, mlp_groups, resolve_targets

__all__ = ["GRANULARITIES", "NORMALIZATIONS", "COMPARISONS", "STRUCTURED_UNITS", "Pruner", "PruningSettings"]

GRANULARITIES = ("unstructured", "n:m", "structured")
NORMALIZATIONS = ("rank", "zscore")
COMPARISONS = ("layer", "row", "global")
STRUCTURED_UNITS = ("mlp", "heads", "mlp+heads")

STATE_FILE = "pruner_state.safetensors"
SETTINGS_FILE = "pruner_state.json"
# Settings that decide which tensors the state holds and what they mean: a checkpoint written under other values
# cannot be resumed. The schedule fields may legitimately change on resume (e.g. training longer).
_SCALARS = ("step", "movement_updates", "current_sparsity")
_STRUCTURAL_FIELDS = ("granularity", "n_m", "scorer", "targets", "structured_units", "comparison", "uniform")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class PruningSettings:
    """What to prune, how to score it and when.

    Parameters that control the target:
        target_sparsity: final fraction pruned, in [0, 1): of the target weights (unstructured, N:M: must equal
            ``1 - N/M``) or of the units of every layer (structured).
        granularity: ``"unstructured"``, ``"n:m"`` or ``"structured"``.
        n_m: N:M pattern (``"2:4"``: keep 2 of every 4 consecutive inputs), used with ``granularity="n:m"``.
        targets: regexes (``re.search`` on module names) among the decoder-layer linears; None = all of them.
        comparison: ``"layer"`` (exactly k pruned per matrix), ``"row"`` (per output row, as Wanda) or ``"global"``
            (one ranking across all targets). Unstructured only.
        structured_units: ``"mlp"`` (intermediate neurons), ``"heads"`` (query heads, equal numbers in every KV
            group) or ``"mlp+heads"``.
        uniform: structured: prune the same number of units in every layer (exportable as a vanilla config).
            ``False`` ranks MLP neurons across layers (heads always stay uniform).

    Parameters that control the scores:
        scorer: one of ``SCORERS`` (``magnitude``, ``wanda``, ``movement``, ``random``, ``mama``).
        alpha: MAMA weight of the movement indicator, in [0, 1].
        normalization: MAMA per-layer normalisation, ``"rank"`` (percentile, the default) or ``"zscore"``. Rank
            bounds each indicator's influence; z-scores let the heavy tails of movement override magnitude.
            Measured (``scripts/measure_mama_normalisation.py``: SmolLM2-135M, one-shot 50% unstructured, LM-loss
            movement, perplexity ratio to dense): alpha 0.1: rank 3.9e3x vs zscore 1.8e13x (with activations
            511x vs 1.4e7x); alpha 0.25: rank 5.7e7x vs zscore 1.0e16x.
        track_activations: forward hooks for activation statistics; None = when needed (wanda, structured
            magnitude/wanda/mama, compensate). True also makes MAMA's unstructured pretrained term Wanda-like.
        compensate: fold each pruned weight's mean contribution into the output bias.
        seed: seed of the ``random`` scorer.

    Parameters that control the schedule (see :mod:`grpo_prune.pruning.schedule`):
        schedule: ``"cubic"``, ``"linear"`` or ``"oneshot"``.
        initial_sparsity: sparsity of the first prune event, in [0, target_sparsity].
        start_step, end_step, every: first and last prune event (optimizer steps) and the spacing of events.
    """

    target_sparsity: float = 0.5
    granularity: str = "unstructured"
    n_m: str = "2:4"
    scorer: str = "mama"
    alpha: float = 0.0
    normalization: str = "rank"
    schedule: str = "cubic"
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 0
    every: int = 1
    targets: list[str] | None = None
    comparison: str = "layer"
    structured_units: str = "mlp"
    uniform: bool = True
    compensate: bool = False
    track_activations: bool | None = None
    seed: int = 0

    # ------------------------------------------------------------------------------------------ derived flags
    @property
    def needs_magnitude(self) -> bool:
        """Whether the |W0| snapshot is used by the scorer."""
        return self.scorer in ("magnitude", "wanda") or (self.scorer == "mama" and self.alpha < 1.0)

    @property
    def needs_movement(self) -> bool:
        """Whether the scorer reads the movement buffers."""
        return self.scorer == "movement" or (self.scorer == "mama" and self.alpha > 0.0)

    @property
    def activations_required(self) -> bool:
        """Whether some part of the configuration cannot work without activation statistics."""
        structured_pretrained = self.granularity == "structured" and self.needs_magnitude
        return self.scorer == "wanda" or self.compensate or structured_pretrained

    @property
    def tracks_activations(self) -> bool:
        """Auto (``track_activations=None``): whenever something needs them, and for ``mama`` with a pretrained
        term, whose magnitude is then activation-aware (|W0| * ||x||, the Wanda form): measured 5-8x lower one-shot
        perplexity on SmolLM2-135M than |W0| alone, for 2.4 MB of statistics."""
        if self.track_activations is not None:
            return bool(self.track_activations)
        return self.activations_required or (self.scorer == "mama" and self.alpha < 1.0)

    @property
    def final_sparsity(self) -> float:
        return float(self.target_sparsity)

    def validate(self) -> None:
        """Check every field and every combination; ValueError naming the field and the allowed values."""
        if not _is_number(self.target_sparsity) or not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"`target_sparsity` must be a number in [0, 1), got {self.target_sparsity!r}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {self.granularity!r}.")
        n, m = M.parse_n_m(self.n_m)  # raises ValueError naming `n_m`
        if self.scorer not in S.SCORERS:
            raise ValueError(f"`scorer` must be one of {tuple(S.SCORERS)}, got {self.scorer!r}.")
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {self.alpha!r}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {tuple(SCHEDULES)}, got {self.schedule!r}.")
        if not _is_number(self.initial_sparsity) or not 0.0 <= self.initial_sparsity <= self.target_sparsity:
            raise ValueError(
                f"`initial_sparsity` must be in [0, target_sparsity={self.target_sparsity}], got "
                f"{self.initial_sparsity!r}."
            )
        for name in ("start_step", "end_step", "every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be an int, got {value!r}.")
        if self.start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {self.start_step}.")
        if self.end_step < self.start_step:
            raise ValueError(f"`end_step` ({self.end_step}) must be >= `start_step` ({self.start_step}).")
        if self.every < 1:
            raise ValueError(f"`every` must be >= 1, got {self.every}.")
        if self.targets is not None:
            if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) for t in self.targets):
                raise ValueError(f"`targets` must be None or a non-empty list of regex strings, got {self.targets!r}.")
            for pattern in self.targets:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"`targets` pattern {pattern!r} is not a valid regex: {err}") from err
        if self.comparison not in COMPARISONS:
            raise ValueError(f"`comparison` must be one of {COMPARISONS}, got {self.comparison!r}.")
        if self.structured_units not in STRUCTURED_UNITS:
            raise ValueError(f"`structured_units` must be one of {STRUCTURED_UNITS}, got {self.structured_units!r}.")
        for name in ("uniform", "compensate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        if self.track_activations not in (None, True, False):
            raise ValueError(f"`track_activations` must be None, True or False, got {self.track_activations!r}.")
        if self.track_activations is False and self.activations_required:
            raise ValueError(
                "`track_activations=False` but activation statistics are required by "
                f"scorer={self.scorer!r}, granularity={self.granularity!r}, compensate={self.compensate}; "
                "use None (auto) or True."
            )
        if self.granularity == "n:m":
            full = 1.0 - n / m
            if abs(self.target_sparsity - full) > 1e-6:
                raise ValueError(
                    f"`target_sparsity` ({self.target_sparsity}) must equal 1 - N/M = {full:g} for "
                    f"granularity='n:m' with n_m={self.n_m!r}: the final pattern keeps exactly N of every M."
                )
        if self.granularity != "unstructured" and self.comparison != "layer":
            raise ValueError(
                f"`comparison` must be 'layer' for granularity={self.granularity!r} (N:M groups and structured "
                f"units are selected within each layer; use uniform=False for a cross-layer MLP ranking), "
                f"got {self.comparison!r}."
            )
        if self.granularity == "structured" and not self.uniform and "heads" in self.structured_units:
            raise ValueError(
                "`uniform=False` is only supported for structured_units='mlp': heads are pruned in equal numbers "
                "in every KV group and layer so that the config stays a vanilla GQA one."
            )


def _clone_settings(settings: PruningSettings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


@dataclass
class _ActStats:
    """Running statistics of one layer's input: fp64 so that long runs do not lose small increments."""

    sumsq: Tensor  # [in_features]
    sum: Tensor  # [in_features]
    count: Tensor  # [1], tokens seen


@dataclass
class _Reduced:
    """Activation statistics summed across processes, as used by one scoring pass."""

    rms: dict[str, Tensor] = field(default_factory=dict)  # fp32 [in_features]
    mean: dict[str, Tensor] = field(default_factory=dict)  # fp32 [in_features]


class Pruner:
    """Owns the masks and indicators of one model and applies the schedule (see the module docstring).

    Args:
        model: the unwrapped causal LM (not a DDP/Accelerate wrapper: module names are those of the bare model).
        settings: validated here; ``settings.end_step`` etc. are read at every call, so the trainer may resolve
            them after construction.

    Raises:
        ValueError: bad settings, a ``targets`` pattern that matches nothing, an N:M pattern that does not divide
            a target's input features, or a structured request that cannot keep the config consistent (GQA).
            Raised before anything is allocated; the model is never modified by the constructor.
    """

    def __init__(self, model: nn.Module, settings: PruningSettings | None = None):
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

        self.masks: dict[str, Tensor] = {
            n: torch.ones_like(mod.weight, dtype=torch.bool) for n, mod in self.targets.items()
        }
        self.unit_masks: dict[str, Tensor] = {
            g.prefix: torch.ones(g.num_units, dtype=torch.bool, device=self.targets[g.consumer].weight.device)
            for g in self.groups
        }
        with torch.no_grad():
            # Unstructured/N:M MAMA without activations only ever uses norm(|W0|), which never changes: store that
            # (fp32) instead of |W0|, so a prune event normalises one indicator (movement), not two.
            self.magnitude_normalized = (
                settings.scorer == "mama"
                and settings.needs_magnitude
                and not self.groups
                and not settings.tracks_activations
            )
            self.magnitude: dict[str, Tensor] = {}
            if settings.needs_magnitude:
                for n, mod in self.targets.items():
                    w0 = mod.weight.detach().abs()
                    self.magnitude[n] = (
                        S.normalize_scores(w0, settings.normalization) if self.magnitude_normalized else w0
                    )
            self.bias_magnitude: dict[str, Tensor] = {}
            if settings.needs_magnitude and self.groups:
                for g in self.groups:
                    for n in g.producers:
                        if self.targets[n].bias is not None:
                            self.bias_magnitude[n] = self.targets[n].bias.detach().abs()
        self.movement: dict[str, Tensor] = (
            {n: torch.zeros_like(mod.weight, dtype=torch.float32) for n, mod in self.targets.items()}
            if settings.needs_movement
            else {}
        )
        self.activations: dict[str, _ActStats] = {}
        if settings.tracks_activations:
            for n, mod in self.targets.items():
                kw = {"dtype": torch.float64, "device": mod.weight.device}
                self.activations[n] = _ActStats(
                    torch.zeros(mod.in_features, **kw), torch.zeros(mod.in_features, **kw), torch.zeros(1, **kw)
                )
        self._count_cache: dict[str, tuple[Tensor, int, int]] = {}
        self.step = 0
        self.movement_updates = 0  # optimizer steps whose gradients reached the movement buffers
        self.current_sparsity = 0.0  # the scheduled sparsity the masks were last grown to
        self.added_biases: list[str] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._reduce_fn: Callable[[Tensor], Tensor] | None = None

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

    # -------------------------------------------------------------------------------------------- activations
    def attach_hooks(self) -> None:
        """Register forward hooks that accumulate per-input-feature statistics (no-op if not tracked/attached).

        Every forward pass counts, rollouts' generation included; padded positions count too (a ``nn.Linear``
        hook cannot see the attention mask), which shifts the statistics slightly on heavily padded batches.
        """
        if self._hooks or not self.activations:
            return
        for name, mod in self.targets.items():
            self._hooks.append(mod.register_forward_hook(self._make_hook(self.activations[name])))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @staticmethod
    def _make_hook(stats: _ActStats) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            with torch.no_grad():
                x = args[0].detach()
                x = x.reshape(-1, x.shape[-1]).float()
                # Per batch in fp32 (fast), accumulated in fp64 (exact enough over a whole run).
                stats.sumsq += x.square().sum(0).to(stats.sumsq.device)
                stats.sum += x.sum(0).to(stats.sum.device)
                stats.count += x.shape[0]

        return hook

    def reset_activation_stats(self) -> None:
        """Forget the activation statistics (e.g. to score on the current model's activations only)."""
        for stats in self.activations.values():
            stats.sumsq.zero_()
            stats.sum.zero_()
            stats.count.zero_()

    def set_reduce_fn(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """``fn(t) -> t`` summing ``t`` over processes (DDP); applied to activation statistics before scoring.

        Movement needs no reduction: it is accumulated from gradients that DDP has already averaged.
        """
        self._reduce_fn = fn

    def _reduced_activations(self) -> _Reduced:
        out = _Reduced()
        if not self.activations:
            return out
        names = list(self.activations)
        parts = [t for n in names for t in (self.activations[n].sumsq, self.activations[n].sum)]
        parts += [self.activations[n].count for n in names]
        flat = torch.cat([p.to(parts[0].device) for p in parts])
        if self._reduce_fn is not None:  # one collective for everything: same statistics, hence masks, on all ranks
            flat = self._reduce_fn(flat.clone())
        counts = flat[-len(names) :]
        offset = 0
        for i, name in enumerate(names):
            size = self.activations[name].sumsq.numel()
            sumsq, total = flat[offset : offset + size], flat[offset + size : offset + 2 * size]
            offset += 2 * size
            count = counts[i]
            if count <= 0:
                raise RuntimeError(
                    f"No activations recorded for {name}: call attach_hooks() and run forward passes (calibration "
                    "batches or rollouts) before scoring."
                )
            device = self.targets[name].weight.device
            out.rms[name] = (sumsq / count).sqrt().float().to(device)
            out.mean[name] = (total / count).float().to(device)
        return out

    # ------------------------------------------------------------------------------------------- enforcement
    def accumulate_movement_(self) -> None:
        """``R += -(grad * W)`` for each target whose ``weight.grad`` is set; call once per optimizer step, when
        gradients are complete (after accumulation / DDP all-reduce, before masking and clipping)."""
        if not self.movement:
            return
        seen = False
        for name, mod in self.targets.items():
            if mod.weight.grad is not None:
                S.movement_update_(self.movement[name], mod.weight.detach(), mod.weight.grad)
                seen = True
        self.movement_updates += int(seen)

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
                mod.weight.grad.mul_(mask)

    @torch.no_grad()
    def apply_masks_(self) -> None:
        """``weight *= mask`` in place (same storage, so tied views and vLLM weight sync see the zeros)."""
        for _, mod, mask in self._pruned_targets():
            mod.weight.mul_(mask)

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
                if torch.is_tensor(value) and value.shape == mod.weight.shape:
                    value.mul_(mask.to(value.device))

    # -------------------------------------------------------------------------------------------------- scores
    def _pretrained_weight_scores(self, name: str, acts: _Reduced) -> Tensor:
        """fp32 ``|W0|``, times the input RMS when activations are tracked (Wanda form)."""
        if name in acts.rms:
            return S.wanda_scores(self.magnitude[name], acts.rms[name])
        return S.magnitude_scores(self.magnitude[name])

    def _weight_scores(self, name: str, acts: _Reduced) -> Tensor:
        s, mod = self.settings, self.targets[name]
        if s.scorer == "magnitude":
            return S.magnitude_scores(self.magnitude[name])
        if s.scorer == "wanda":
            return S.wanda_scores(self.magnitude[name], acts.rms[name])
        if s.scorer == "movement":
            return self.movement[name].clone()
        if s.scorer == "random":
            return S.random_scores(tuple(mod.weight.shape), s.seed, name).to(mod.weight.device)
        if s.alpha == 0.0 and s.comparison != "global" and not self.magnitude_normalized:
            # One indicator ranked within one matrix: normalising it is a monotone map (ties keep their index
            # order) that cannot change which entries are lowest, so its per-layer sort is skipped. Global ranking
            # compares layers and keeps the normalisation.
            return self._pretrained_weight_scores(name, acts)
        movement = self.movement.get(name)
        if movement is None:  # alpha == 0: movement is not tracked and has no weight in the score
            movement = torch.zeros_like(mod.weight, dtype=torch.float32)
        if s.alpha >= 1.0:  # the pretrained term has no weight: no snapshot was taken
            magnitude = torch.zeros_like(movement)
        elif self.magnitude_normalized:
            return S.mama_scores(self.magnitude[name], movement, s.alpha, s.normalization, pretrained_normalized=True)
        else:
            magnitude = self._pretrained_weight_scores(name, acts)
        return S.mama_scores(magnitude, movement, s.alpha, s.normalization)

    def _group_layout(self, g: MLPGroup | HeadGroup) -> list[tuple[str, int, int]]:
        """(module name, dim, group_size) per member: producers' rows (dim 0), the consumer's columns (dim 1);
        a head spans ``head_dim`` consecutive rows/columns."""
        size = 1 if isinstance(g, MLPGroup) else g.head_dim
        return [*((n, 0, size) for n in g.producers), (g.consumer, 1, size)]

    def _unit_activation(self, g: MLPGroup | HeadGroup, acts: _Reduced) -> Tensor:
        """RMS of each unit's output as the consumer sees it: fp32 ``[num_units]``."""
        rms = acts.rms[g.consumer]
        if isinstance(g, HeadGroup):
            rms = rms.reshape(g.num_heads, g.head_dim).norm(dim=1)
        return rms

    def _bias_norm(self, g: MLPGroup | HeadGroup) -> Tensor | None:
        parts = [self.bias_magnitude[n].float() for n in g.producers if n in self.bias_magnitude]
        if not parts:
            return None
        per_unit = [p.reshape(g.num_units, -1) for p in parts]  # heads: head_dim bias entries per unit
        return torch.cat(per_unit, dim=1).norm(dim=1)

    def _group_scores(self, g: MLPGroup | HeadGroup, acts: _Reduced) -> Tensor:
        s = self.settings
        layout = self._group_layout(g)
        device = self.targets[g.consumer].weight.device
        if s.scorer == "random":
            return S.random_scores((g.num_units,), s.seed, g.prefix).to(device)
        movement = None
        if self.movement:
            movement = S.group_sum([(self.movement[n], d, size) for n, d, size in layout])
        if s.scorer == "movement":
            return movement
        if s.scorer == "wanda":
            return S.group_l2([(S.wanda_scores(self.magnitude[n], acts.rms[n]), d, size) for n, d, size in layout])
        pretrained = bias = None
        if s.needs_magnitude:
            act = self._unit_activation(g, acts)
            pretrained = S.group_l2([(self.magnitude[n], d, size) for n, d, size in layout]) * act
            bias_norm = self._bias_norm(g)
            bias = None if bias_norm is None else bias_norm * act
        if s.scorer == "magnitude":
            return pretrained if bias is None else pretrained + bias
        # mama
        if movement is None:
            movement = torch.zeros(g.num_units, dtype=torch.float32, device=device)
        if pretrained is None:
            pretrained = torch.zeros_like(movement)
        return S.mama_scores(pretrained, movement, s.alpha, s.normalization, bias=bias)

    def score_tensors(self) -> dict[str, Tensor]:
        """Current fp32 scores (higher = kept): per target weight (unstructured, N:M), or per unit ``[num_units]``
        keyed by the group prefix (structured). Already-pruned entries keep their raw score here."""
        acts = self._reduced_activations() if self._scores_need_activations() else _Reduced()
        if self.groups:
            return {g.prefix: self._group_scores(g, acts) for g in self.groups}
        return {n: self._weight_scores(n, acts) for n in self.targets}

    def _scores_need_activations(self) -> bool:
        s = self.settings
        if s.scorer in ("random", "movement") or not self.activations:
            return False
        return True

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
        """Indicators the scorer needs that hold no data yet (``"activations"``, ``"movement"``)."""
        missing = []
        if (self._scores_need_activations() or self.settings.compensate) and not any(
            st.count.item() > 0 for st in self.activations.values()
        ):
            missing.append("activations")
        if self.movement and self.movement_updates == 0:
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
    def _new_masks(self, sparsity: float, scores: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(weight masks, unit masks) at ``sparsity``, monotone w.r.t. the current ones."""
        s = self.settings
        if s.granularity == "unstructured":
            if s.comparison == "global":
                new = M.global_unstructured_masks(scores, sparsity, dict(self.masks))
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
        new = {}
        for g in self.groups:
            for name, dim, size in self._group_layout(g):
                shape = tuple(self.targets[name].weight.shape)
                new[name] = M.expand_group_mask(units[g.prefix], shape, dim, group_size=size) & self.masks[name]
        return new, units

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
    def _compensate_(self, new_masks: dict[str, Tensor], acts: _Reduced) -> None:
        """``b_i += sum_j W_ij * mean(x_j)`` over newly pruned ``j``, before the weights are zeroed."""
        self.add_compensation_biases_()
        for name in self._compensated_layers():
            mod = self.targets[name]
            newly = self.masks[name] & ~new_masks[name]
            if not newly.any():
                continue
            delta = (mod.weight.float() * newly) @ acts.mean[name]
            mod.bias.add_(delta.to(mod.bias.dtype))

    def _prune(self, sparsity: float) -> dict[str, Any]:
        need_acts = self._scores_need_activations() or self.settings.compensate
        acts = self._reduced_activations() if need_acts else _Reduced()
        if self.groups:
            scores = {g.prefix: self._group_scores(g, acts) for g in self.groups}
        else:
            scores = {n: self._weight_scores(n, acts) for n in self.targets}
        new_masks, new_units = self._new_masks(sparsity, scores)
        before = self.num_pruned()
        if self.settings.compensate:
            self._compensate_(new_masks, acts)
        self.masks.update(new_masks)
        self.unit_masks.update(new_units)
        self.apply_masks_()
        self.current_sparsity = max(self.current_sparsity, sparsity)
        record: dict[str, Any] = {
            "step": self.step,
            "target": sparsity,
            "reached": self.sparsity(),
            "num_pruned": self.num_pruned(),
            "newly_pruned": self.num_pruned() - before,
            "layer_sparsity": self.layer_sparsity(),
            "compensated": bool(self.settings.compensate),
        }
        if self.unit_masks:
            record["unit_sparsity"] = self.unit_sparsity()
        record["score_sample"] = _score_sample(scores)
        return record

    # -------------------------------------------------------------------------------------------------- figures
    def sparsity(self) -> float:
        """Fraction of target weights pruned (masked)."""
        total = sum(m.numel() for m in self.masks.values())
        return self.num_pruned() / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction pruned per target weight matrix."""
        return {n: self._pruned_count(n) / m.numel() for n, m in self.masks.items()}

    def unit_sparsity(self) -> dict[str, float]:
        """Fraction of units pruned per structural group (structured only)."""
        return {p: 1.0 - m.sum().item() / m.numel() for p, m in self.unit_masks.items()}

    def num_pruned(self) -> int:
        """Number of pruned target weights."""
        return sum(self._pruned_count(n) for n in self.masks)

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
        """Bytes held by each indicator (``masks``, ``magnitude``, ``bias_magnitude``, ``movement``,
        ``activations``, ``unit_masks``)."""

        def size(tensors: Any) -> int:
            return int(sum(t.numel() * t.element_size() for t in tensors))

        acts = [t for st in self.activations.values() for t in (st.sumsq, st.sum, st.count)]
        return {
            "masks": size(self.masks.values()),
            "unit_masks": size(self.unit_masks.values()),
            "magnitude": size(self.magnitude.values()),
            "bias_magnitude": size(self.bias_magnitude.values()),
            "movement": size(self.movement.values()),
            "activations": size(acts),
        }

    def report(self) -> dict[str, Any]:
        """JSON-able summary: settings, targets, bias indicator presence, added biases, memory, sparsity."""
        biases_present = bool(self.bias_magnitude) or any(
            self.targets[n].bias is not None and n not in self.added_biases for g in self.groups for n in g.producers
        )
        return {
            "settings": _clone_settings(self.settings),
            "num_targets": len(self.targets),
            "target_params": int(sum(m.numel() for m in self.masks.values())),
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
        """Every tensor needed to resume exactly: masks, unit masks, |W0|/|b0| snapshots, movement, activation
        statistics, biases added by compensation, step and current sparsity. Values are the live tensors."""
        sd: dict[str, Tensor] = {
            "step": torch.tensor([self.step], dtype=torch.int64),
            "movement_updates": torch.tensor([self.movement_updates], dtype=torch.int64),
            "current_sparsity": torch.tensor([self.current_sparsity], dtype=torch.float64),
        }
        for prefix, store in (
            ("mask", self.masks),
            ("unit_mask", self.unit_masks),
            ("magnitude", self.magnitude),
            ("bias_magnitude", self.bias_magnitude),
            ("movement", self.movement),
        ):
            sd.update({f"{prefix}/{n}": t for n, t in store.items()})
        for n, st in self.activations.items():
            sd.update({f"act_sumsq/{n}": st.sumsq, f"act_sum/{n}": st.sum, f"act_count/{n}": st.count})
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
            if key not in _SCALARS:
                own[key].copy_(state_dict[key])
        self.step = int(state_dict["step"].item())
        self.movement_updates = int(state_dict["movement_updates"].item())
        self.current_sparsity = float(state_dict["current_sparsity"].item())
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

    def save(self, path_dir: str | os.PathLike[str]) -> None:
        """Write ``pruner_state.safetensors`` and ``pruner_state.json`` (settings) into ``path_dir`` atomically
        (temporary file, then ``os.replace``): an interrupted save never leaves a truncated state behind."""
        os.makedirs(path_dir, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(path_dir, STATE_FILE), lambda tmp: save_file(tensors, tmp, {"format": "pt"}))
        meta = {
            "settings": _clone_settings(self.settings),
            "step": self.step,
            "current_sparsity": self.current_sparsity,
            "added_biases": self.added_biases,
        }
        write_json_atomic(os.path.join(path_dir, SETTINGS_FILE), meta)

    def load(self, path_dir: str | os.PathLike[str]) -> None:
        """Restore what :meth:`save` wrote. Structural settings (granularity, N:M, scorer, targets, units,
        comparison, uniform) must match (ValueError); other differences (e.g. a longer schedule) only warn."""
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
        state = load_file(os.path.join(path_dir, STATE_FILE))
        self.load_state_dict(state)


SCORE_SAMPLE_SIZE = 10_000


def _score_sample(scores: dict[str, Tensor]) -> Tensor:
    """An evenly strided fp32 subsample (about ``SCORE_SAMPLE_SIZE`` values, on CPU) of every layer's scores at an
    event, for quantiles and histograms, so the caller never recomputes or holds the full scores."""
    total = sum(t.numel() for t in scores.values())
    stride = max(1, total // SCORE_SAMPLE_SIZE)
    return torch.cat([t.detach().flatten()[::stride].float().cpu() for t in scores.values()])

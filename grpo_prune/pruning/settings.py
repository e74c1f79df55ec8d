"""`PruningSettings`: what to prune, how to score it and when, validated in one place (no torch state)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from grpo_prune.pruning import masks as M
from grpo_prune.pruning.schedule import SCHEDULES
from grpo_prune.pruning.scores import SCORERS as SCORER_NAMES
from grpo_prune.pruning.scores import STATISTICS

#: Scorers of the pruner: the score functions of :data:`~grpo_prune.pruning.scorers.SCORERS`, and ``sparsegpt``
#: (selection with OBS reconstruction, from the Gram matrices of the targets' inputs).
PRUNER_SCORERS = (*SCORER_NAMES, "sparsegpt")

__all__ = [
    "ALLOCATIONS",
    "COMPARISONS",
    "GRANULARITIES",
    "NORMALIZATIONS",
    "STATISTICS",
    "STRUCTURED_UNITS",
    "PruningSettings",
]

GRANULARITIES = ("unstructured", "n:m", "structured")
NORMALIZATIONS = ("rank", "zscore")
COMPARISONS = ("layer", "row", "global")
STRUCTURED_UNITS = ("mlp", "heads", "mlp+heads")
ALLOCATIONS = ("uniform", "owl", "reward")


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
        allocation: how the target spreads over decoder layers (unstructured, ``comparison="layer"``):
            ``"uniform"`` (every matrix at the target), ``"owl"`` (outlier-weighted, Yin et al. 2023: layers
            with more score outliers are pruned less; see :func:`~grpo_prune.pruning.masks.owl_sparsities`) or
            ``"reward"`` (where RL moves the model, prune less: a layer's density is the reward statistic's mass
            ``sum |R| / numel`` over its target weights, ``|R|`` for the signed form; see
            :func:`~grpo_prune.pruning.masks.reward_sparsities`). Both map densities to sparsities alike (denser
            layers pruned less, linearly, each within ``owl_lambda`` of the target, the global count exact, the
            masks monotone). ``"owl"`` reads raw scores, so it needs scorer ``wanda`` (``|W| * ||x||``, as in the
            paper) or ``magnitude``. ``"reward"`` needs the statistic: scorer ``movement``, or ``mama`` with
            ``alpha > 0``; an event at which it carries no signal yet (fewer than ``min_statistic_updates``
            reward-signal steps, or all zero) prunes uniformly, warns, and records ``reward_allocation: False``.
        owl_lambda: largest deviation of a layer's sparsity from the target, for both non-uniform allocations
            (OWL's lambda; the name is OWL's, the bound is shared by ``"reward"``).
        owl_m: OWL's outlier threshold, in multiples of the layer's mean score (the paper's M).

    Parameters that control the scores:
        scorer: one of ``SCORERS`` (``magnitude``, ``wanda``, ``movement``, ``random``, ``mama``), or
            ``sparsegpt``: no score, but OBS reconstruction at each event from the Gram matrices of the layers'
            inputs seen since the start (unstructured or N:M, ``comparison`` ``layer`` or ``row``; see
            :mod:`grpo_prune.pruning.sparsegpt`).
        alpha: MAMA weight of the movement indicator, in [0, 1].
        statistic: form of the reward-driven statistic ``R``, accumulated from the gradient ``g`` of the
            policy-gradient term only: ``"signed"`` ``R += -(g * W)`` (movement, Sanh et al. 2020; needs many
            steps), ``"abs"`` ``R += |g * W|`` (PLATON-like) or ``"squared"`` ``R += (g * W)^2`` (empirical Fisher,
            OBD). Structured units sum it over their weights. Default ``"abs"``: by measurement the most reliable
            over short runs (see ``MamaGRPOConfig.mama_statistic``).
        min_statistic_updates: optimizer steps with a reward signal (some non-zero advantage) the statistic needs
            before it is mixed into ``mama``; below it, or when it is all zero, the pretrained term decides alone and
            the event says so. ``movement`` (nothing else to rank by) defers the event instead.
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
    statistic: str = "abs"
    min_statistic_updates: int = 4
    schedule: str = "cubic"
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 0
    every: int = 1
    targets: list[str] | None = None
    comparison: str = "layer"
    structured_units: str = "mlp"
    uniform: bool = True
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_m: float = 5.0
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
    def needs_gram(self) -> bool:
        """Whether the Gram matrices of the targets' inputs are collected (``sparsegpt``)."""
        return self.scorer == "sparsegpt"

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
        if self.scorer not in PRUNER_SCORERS:
            raise ValueError(f"`scorer` must be one of {PRUNER_SCORERS}, got {self.scorer!r}.")
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {self.alpha!r}.")
        if self.statistic not in STATISTICS:
            raise ValueError(f"`statistic` must be one of {STATISTICS}, got {self.statistic!r}.")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"`normalization` must be one of {NORMALIZATIONS}, got {self.normalization!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {tuple(SCHEDULES)}, got {self.schedule!r}.")
        if not _is_number(self.initial_sparsity) or not 0.0 <= self.initial_sparsity <= self.target_sparsity:
            raise ValueError(
                f"`initial_sparsity` must be in [0, target_sparsity={self.target_sparsity}], got "
                f"{self.initial_sparsity!r}."
            )
        for name in ("start_step", "end_step", "every", "seed", "min_statistic_updates"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"`{name}` must be an int, got {value!r}.")
        if self.start_step < 0:
            raise ValueError(f"`start_step` must be >= 0, got {self.start_step}.")
        if self.end_step < self.start_step:
            raise ValueError(f"`end_step` ({self.end_step}) must be >= `start_step` ({self.start_step}).")
        if self.min_statistic_updates < 1:
            raise ValueError(f"`min_statistic_updates` must be >= 1, got {self.min_statistic_updates}.")
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
        if self.scorer == "sparsegpt":
            if self.granularity == "structured":
                raise ValueError(
                    "`scorer`='sparsegpt' at prune events reconstructs weights, not whole units: use granularity "
                    "'unstructured' or 'n:m', or a structured scorer such as 'wanda' (one-shot, `grpo-prune oneshot "
                    "--scorer sparsegpt --granularity structured` removes MLP neurons)."
                )
            if self.comparison not in ("layer", "row"):
                raise ValueError(
                    f"`comparison` must be 'layer' or 'row' for scorer='sparsegpt' (its saliencies are "
                    f"reconstruction errors of one layer, not comparable across layers), got {self.comparison!r}."
                )
            if self.compensate:
                raise ValueError("`compensate` is not supported with scorer='sparsegpt' (OBS already compensates).")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"`allocation` must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if self.allocation != "uniform":
            if self.granularity != "unstructured" or self.comparison != "layer":
                raise ValueError(
                    f"`allocation`={self.allocation!r} sets one sparsity per decoder layer: it needs granularity "
                    f"'unstructured' and comparison 'layer', got {self.granularity!r} and {self.comparison!r}."
                )
            if not (_is_number(self.owl_lambda) and 0.0 <= self.owl_lambda < 1.0):
                raise ValueError(f"`owl_lambda` must be in [0, 1), got {self.owl_lambda!r}.")
        if self.allocation == "owl":
            if self.scorer not in ("wanda", "magnitude"):
                raise ValueError(
                    "`allocation`='owl' counts outliers of raw scores (|W| * ||x|| or |W|): use scorer 'wanda' or "
                    f"'magnitude', got {self.scorer!r}."
                )
            if not (_is_number(self.owl_m) and self.owl_m > 0):
                raise ValueError(f"`owl_m` must be > 0, got {self.owl_m!r}.")
        if self.allocation == "reward" and not self.needs_movement:
            raise ValueError(
                "`allocation`='reward' spreads the sparsity by the reward statistic, which only `scorer`='movement' "
                f"or `scorer`='mama' with `alpha` > 0 accumulates; got scorer={self.scorer!r}, alpha={self.alpha!r}."
            )
        if self.granularity == "structured" and not self.uniform and "heads" in self.structured_units:
            raise ValueError(
                "`uniform=False` is only supported for structured_units='mlp': heads are pruned in equal numbers "
                "in every KV group and layer so that the config stays a vanilla GQA one."
            )

"""Scorers: small functions from indicators to scores, one per name, in a plain dict (:data:`SCORERS`).

A scorer receives a :class:`ScoringContext` and returns ``{key: scores}`` (higher = kept), where a key is a target
layer name (unstructured, N:M: scores shaped like the weight) or a structural group prefix (structured: one score
per unit). The context hides which of the two it is: it serves each indicator in the unit's shape,

============  ===========================================  ==================================================
indicator     per weight (:class:`WeightContext`)          per unit (:class:`GroupContext`)
============  ===========================================  ==================================================
magnitude     ``|W0|``                                     ``(||W0_group|| + ||b0_group||) * a_unit``
wanda         ``|W0_ij| * a_j``                            L2 over the group of the per-weight Wanda scores
pretrained    wanda form when activations are tracked,     same as magnitude (always activation-aware:
              else ``|W0|`` (the term MAMA mixes)          weight norms alone collapse structured pruning)
statistic     the reward-driven statistic ``R``            ``R`` summed over the unit's weights
random        seeded uniform draws                         seeded uniform draws
============  ===========================================  ==================================================

where ``a_j`` is the RMS of input feature ``j`` over real tokens, and ``a_unit`` the RMS of the unit's output as
its consumer sees it (``down_proj`` input ``i`` for a neuron; the L2 over a head's ``head_dim`` ``o_proj`` inputs).

A new scorer is one function added to :data:`SCORERS` (and its name to ``scores.SCORERS``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from grpo_prune.pruning import scores as S
from grpo_prune.pruning.indicators import Indicators, ReducedActivations
from grpo_prune.pruning.settings import PruningSettings
from grpo_prune.pruning.sharding import ShardLayout, dist_rank_normalize, local
from grpo_prune.pruning.structure import HeadGroup, MLPGroup

__all__ = [
    "SCORERS",
    "GroupContext",
    "ScoringContext",
    "ShardedWeightContext",
    "WeightContext",
    "mama",
    "normalize_jointly",
]


class ScoringContext:
    """What a scorer may read, per key, in the unit's shape (see the module docstring)."""

    def __init__(self, indicators: Indicators, settings: PruningSettings, acts: ReducedActivations):
        self.indicators = indicators
        self.settings = settings
        self.acts = acts
        self._signal: tuple[bool, str] | None = None
        #: Filled by scorers: facts worth recording in the event (e.g. whether the statistic was mixed in).
        self.notes: dict[str, Any] = {}

    keys: list[str]
    #: Whether scores of different keys compete in one ranking (global comparison, cross-layer MLP ranking).
    cross_key: bool = False

    def magnitude(self, key: str) -> Tensor:
        raise NotImplementedError

    def wanda(self, key: str) -> Tensor:
        raise NotImplementedError

    def pretrained(self, key: str) -> Tensor:
        raise NotImplementedError

    def statistic(self, key: str) -> Tensor:
        raise NotImplementedError

    def random(self, key: str) -> Tensor:
        raise NotImplementedError

    def normalize(self, terms: dict[str, Tensor], method: str, jointly: bool) -> dict[str, Tensor]:
        """MAMA's normalisation of one indicator (see :func:`normalize_jointly`)."""
        return normalize_jointly(terms, method, jointly)

    def statistic_signal(self) -> tuple[bool, str]:
        """``(usable, why not)`` of the reward-driven statistic, computed once per scoring pass."""
        if self._signal is None:
            self._signal = self.indicators.statistic_signal()
        return self._signal


class WeightContext(ScoringContext):
    """Per-weight indicators of unstructured and N:M pruning."""

    def __init__(
        self,
        indicators: Indicators,
        settings: PruningSettings,
        acts: ReducedActivations,
        targets: dict[str, nn.Linear],
    ):
        super().__init__(indicators, settings, acts)
        self.targets = targets
        self.keys = list(targets)
        self.cross_key = settings.comparison == "global"

    def magnitude(self, key: str) -> Tensor:
        return S.magnitude_scores(self.indicators.magnitude[key])

    def wanda(self, key: str) -> Tensor:
        return S.wanda_scores(self.indicators.magnitude[key], self.acts.rms[key])

    def pretrained(self, key: str) -> Tensor:
        return self.wanda(key) if key in self.acts.rms else self.magnitude(key)

    def statistic(self, key: str) -> Tensor:
        return self.indicators.reduced_statistic(key).clone()

    def random(self, key: str) -> Tensor:
        weight = self.targets[key].weight
        return S.random_scores(tuple(weight.shape), self.settings.seed, key).to(weight.device)


class ShardedWeightContext(WeightContext):
    """Per-weight indicators of an FSDP2-sharded model: every tensor is the local row shard of its layer.

    Element-wise indicators need nothing else; the seeded random scores are drawn for the full weight and sliced,
    and rank normalisation ranks each entry among the whole layer's (or, jointly, all layers') entries with
    :func:`~grpo_prune.pruning.sharding.dist_rank_normalize`.
    """

    def __init__(self, indicators, settings, acts, targets, layout: ShardLayout):
        super().__init__(indicators, settings, acts, targets)
        self.layout = layout

    def random(self, key: str) -> Tensor:
        full = S.random_scores(self.layout.global_shapes[key], self.settings.seed, key)
        return self.layout.local_rows(key, full).to(local(self.targets[key].weight).device)

    def normalize(self, terms: dict[str, Tensor], method: str, jointly: bool) -> dict[str, Tensor]:
        if method != "rank":
            raise ValueError(f"`normalization`={method!r} is not supported under FSDP2; use 'rank'.")
        if not jointly:
            return {k: dist_rank_normalize(self.layout, t) for k, t in terms.items()}
        flat = dist_rank_normalize(self.layout, torch.cat([t.reshape(-1).float() for t in terms.values()]))
        out, offset = {}, 0
        for key, t in terms.items():
            out[key] = flat[offset : offset + t.numel()].reshape(t.shape)
            offset += t.numel()
        return out


class GroupContext(ScoringContext):
    """Per-unit indicators of structured pruning (MLP neurons, attention heads)."""

    def __init__(
        self,
        indicators: Indicators,
        settings: PruningSettings,
        acts: ReducedActivations,
        targets: dict[str, nn.Linear],
        groups: list[MLPGroup | HeadGroup],
    ):
        super().__init__(indicators, settings, acts)
        self.targets = targets
        self.groups = {g.prefix: g for g in groups}
        self.keys = list(self.groups)
        self.cross_key = not settings.uniform

    @staticmethod
    def layout(g: MLPGroup | HeadGroup) -> list[tuple[str, int, int]]:
        """(module name, dim, group_size) per member: producers' rows (dim 0), the consumer's columns (dim 1);
        a head spans ``head_dim`` consecutive rows/columns."""
        size = 1 if isinstance(g, MLPGroup) else g.head_dim
        return [*((n, 0, size) for n in g.producers), (g.consumer, 1, size)]

    def _activation(self, g: MLPGroup | HeadGroup) -> Tensor:
        rms = self.acts.rms[g.consumer]
        if isinstance(g, HeadGroup):
            rms = rms.reshape(g.num_heads, g.head_dim).norm(dim=1)
        return rms

    def bias_norm(self, key: str) -> Tensor | None:
        """L2 norm of each unit's pretrained producer biases ``[num_units]``; None on bias-free units."""
        g, biases = self.groups[key], self.indicators.bias_magnitude
        parts = [biases[n].float().reshape(g.num_units, -1) for n in g.producers if n in biases]
        return torch.cat(parts, dim=1).norm(dim=1) if parts else None

    def magnitude(self, key: str) -> Tensor:
        g = self.groups[key]
        weight_norm = S.group_l2([(self.indicators.magnitude[n], d, size) for n, d, size in self.layout(g)])
        bias = self.bias_norm(key)
        return (weight_norm if bias is None else weight_norm + bias) * self._activation(g)

    def wanda(self, key: str) -> Tensor:
        mags, rms = self.indicators.magnitude, self.acts.rms
        return S.group_l2([(S.wanda_scores(mags[n], rms[n]), d, size) for n, d, size in self.layout(self.groups[key])])

    def pretrained(self, key: str) -> Tensor:
        return self.magnitude(key)

    def statistic(self, key: str) -> Tensor:
        return S.group_sum([(self.indicators.reduced_statistic(n), d, s) for n, d, s in self.layout(self.groups[key])])

    def random(self, key: str) -> Tensor:
        g = self.groups[key]
        return S.random_scores((g.num_units,), self.settings.seed, key).to(self.targets[g.consumer].weight.device)


def normalize_jointly(terms: dict[str, Tensor], method: str, jointly: bool) -> dict[str, Tensor]:
    """Normalise each key's term on its own, or all keys as one population when they compete in one ranking
    (a per-layer normalisation would give every layer the same score distribution, making a global ranking
    uniform)."""
    if not jointly:
        return {k: S.normalize_scores(t, method) for k, t in terms.items()}
    flat = S.normalize_scores(torch.cat([t.reshape(-1).float() for t in terms.values()]), method)
    out, offset = {}, 0
    for key, t in terms.items():
        out[key] = flat[offset : offset + t.numel()].reshape(t.shape)
        offset += t.numel()
    return out


# ----------------------------------------------------------------------------------------------------- scorers
def magnitude(ctx: ScoringContext) -> dict[str, Tensor]:
    return {k: ctx.magnitude(k) for k in ctx.keys}


def wanda(ctx: ScoringContext) -> dict[str, Tensor]:
    return {k: ctx.wanda(k) for k in ctx.keys}


def movement(ctx: ScoringContext) -> dict[str, Tensor]:
    return {k: ctx.statistic(k) for k in ctx.keys}


def random(ctx: ScoringContext) -> dict[str, Tensor]:
    return {k: ctx.random(k) for k in ctx.keys}


def mama(ctx: ScoringContext) -> dict[str, Tensor]:
    """``(1 - alpha) * norm(pretrained) + alpha * norm(statistic)``, normalised per key or jointly.

    A statistic without signal (too few reward-signal steps, or all zero) is not mixed in: the pretrained term
    decides alone, a warning says so, and ``ctx.notes["statistic_mixed"]`` is False. A single indicator needs no
    normalisation (a monotone map cannot change which entries are lowest), so its sort is skipped.
    """
    s = ctx.settings
    alpha = s.alpha
    if alpha > 0.0:
        usable, why = ctx.statistic_signal()
        ctx.notes["statistic_mixed"] = usable
        if not usable:
            if alpha >= 1.0:
                raise RuntimeError(f"mama with alpha=1 needs the reward statistic, which has no signal: {why}")
            warnings.warn(
                f"mama: the reward statistic is not mixed in ({why}); the pretrained term decides alone.", stacklevel=3
            )
            alpha = 0.0
    if alpha == 0.0:
        return {k: ctx.pretrained(k) for k in ctx.keys}
    if alpha >= 1.0:
        return {k: ctx.statistic(k) for k in ctx.keys}
    pretrained = ctx.normalize({k: ctx.pretrained(k) for k in ctx.keys}, s.normalization, ctx.cross_key)
    statistic = ctx.normalize({k: ctx.statistic(k) for k in ctx.keys}, s.normalization, ctx.cross_key)
    return {k: (1.0 - alpha) * pretrained[k] + alpha * statistic[k] for k in ctx.keys}


ScorerFn = Callable[[ScoringContext], dict[str, Tensor]]

#: Scorer name -> function. Baselines share every piece of the machinery with ``mama``.
SCORERS: dict[str, ScorerFn] = {
    "magnitude": magnitude,
    "wanda": wanda,
    "movement": movement,
    "random": random,
    "mama": mama,
}
assert tuple(SCORERS) == S.SCORERS, "scores.SCORERS must name exactly the registered scorers"

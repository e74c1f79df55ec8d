"""One-shot pruning of a model, outside any training loop (baselines, quick experiments, evaluation).

Uses the same :class:`~grpo_prune.pruning.pruner.Pruner` as training, so a one-shot result and a gradual one are
scored and masked by the same code. Calibration batches provide what the scorer needs:

- activation statistics (wanda, structured magnitude/wanda/mama, compensation) from forward hooks;
- movement for ``movement``/``mama``: one backward pass of the language-modelling loss summed over the calibration
  batches, ``R = -(grad * W)`` (the first-order Taylor estimate of the loss increase when a weight is removed);
- Gram matrices of every target's inputs for ``sparsegpt`` (:mod:`grpo_prune.pruning.sparsegpt`), which prunes
  and reconstructs the weights decoder layer by decoder layer; its masks are then handed to the same Pruner, so
  the report and the masks look exactly like any other scorer's.

Everything (settings, calibration, model structure) is validated before the model is touched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from grpo_prune.pruning import scores as S
from grpo_prune.pruning.pruner import Pruner, PruningSettings
from grpo_prune.pruning.sparsegpt import sparsegpt_oneshot_, sparsegpt_structured_oneshot_

__all__ = ["ONESHOT_SCORERS", "PruneReport", "prune_oneshot"]

ONESHOT_SCORERS = (*S.SCORERS, "sparsegpt")
"""Scorers accepted by :func:`prune_oneshot`: the training scorers plus ``sparsegpt`` (one-shot only for now)."""


@dataclass
class PruneReport:
    """What :func:`prune_oneshot` did.

    Attributes:
        layer_sparsity: target module name -> fraction of its weight pruned.
        global_sparsity: fraction of all target weights pruned.
        params_zeroed: number of target weights pruned (set to zero).
        params_total: number of target weights.
        target_sparsity, granularity, n_m, scorer: the request.
        unit_sparsity: structured only: group prefix (``model.layers.3.mlp``) -> fraction of units pruned.
        biases_present: whether the pruned units have pretrained biases (the ``|b0|`` indicator is used only then).
        added_biases: layers that received a new bias from compensation (export must set ``mlp_bias`` /
            ``attention_bias`` or carry them otherwise).
        notes: human-readable remarks (e.g. the bias indicator being absent).
        masks: target module name -> bool keep-mask (True = keep), for export sidecars. Not in ``repr``.
    """

    layer_sparsity: dict[str, float]
    global_sparsity: float
    params_zeroed: int
    params_total: int
    target_sparsity: float
    granularity: str
    n_m: str | None
    scorer: str
    unit_sparsity: dict[str, float] = field(default_factory=dict)
    biases_present: bool = False
    added_biases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (without the masks)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "masks"}


def _calibration_batches(calibration: Any, vocab_size: int | None) -> list[dict[str, Tensor]]:
    """Normalise ``calibration`` into a list of ``model(**batch)`` kwargs, validating every batch first."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, bytes)):
        # The engine reads no data itself (it imports nothing above it): a named source is turned into windows by
        # the caller.
        raise ValueError(
            f"`calibration` takes token ids, not a source name ({calibration!r}): make the windows first, e.g. "
            "grpo_prune.data.calibration_windows(tokenizer, 'mix', 128, 256, model=model), and pass them "
            "(or their .split(8) for batches of 8)."
        )
    if isinstance(calibration, Tensor) or isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (str, bytes)):
        items = list(calibration)
    else:
        raise ValueError(
            f"`calibration` must be a LongTensor [B, T] of input_ids, a dict for model(**batch), or an iterable of "
            f"those; got {type(calibration).__name__}."
        )
    if not items:
        raise ValueError("`calibration` is empty: give at least one batch of input_ids.")
    batches = []
    for i, item in enumerate(items):
        batch = {"input_ids": item} if isinstance(item, Tensor) else dict(item) if isinstance(item, Mapping) else None
        ids = None if batch is None else batch.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"`calibration` batch {i}: expected input_ids as an integer tensor [B, T] (alone or under "
                f"'input_ids' in a dict); got {type(item).__name__}"
                + (
                    f" with input_ids {getattr(ids, 'dtype', None)} {tuple(getattr(ids, 'shape', ()))}"
                    if batch
                    else ""
                )
            )
        if ids.numel() == 0:
            raise ValueError(f"`calibration` batch {i} is empty.")
        if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"`calibration` batch {i} has token ids outside [0, {vocab_size}).")
        batches.append(batch)
    return batches


def _run_calibration(model: nn.Module, pruner: Pruner, batches: list[dict[str, Tensor]], movement: bool) -> None:
    """Forward passes (hooks collect activations) and, for movement, one summed LM-loss backward pass."""
    device = next(model.parameters()).device
    was_training = model.training
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    target_weights = {id(mod.weight) for mod in pruner.targets.values()}
    model.eval()  # no dropout: the scores describe the model that will be used
    try:
        for p in params:
            p.grad = None
            # Gradients are needed only for the targets; other leaves stay frozen to save memory.
            p.requires_grad_(movement and id(p) in target_weights)
        pruner.attach_hooks()
        with torch.set_grad_enabled(movement):
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                if movement:
                    labels = batch.get("labels")
                    if labels is None:
                        labels = batch["input_ids"].clone()
                        if "attention_mask" in batch:
                            labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
                    out = model(**{**batch, "labels": labels}, use_cache=False)
                    out.loss.backward()
                else:
                    model(**batch, use_cache=False)
        if movement:
            pruner.accumulate_movement_()
    finally:
        pruner.remove_hooks()
        for p, flag, grad in zip(params, saved_flags, saved_grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def prune_oneshot(
    model: nn.Module,
    sparsity: float = 0.5,
    granularity: str = "unstructured",
    n_m: str = "2:4",
    scorer: str = "magnitude",
    calibration: Any = None,
    **settings_overrides: Any,
) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` in one step.

    Args:
        model: a causal LM (Llama/Qwen2-like); its weights are zeroed in place (and biases added by compensation).
        sparsity: fraction in [0, 1) of the target weights (unstructured), of every layer's units (structured);
            for ``"n:m"`` it must equal ``1 - N/M``.
        granularity: ``"unstructured"``, ``"n:m"`` or ``"structured"``.
        n_m: the N:M pattern (``"2:4"``) for ``granularity="n:m"``.
        scorer: ``"magnitude"``, ``"wanda"``, ``"movement"``, ``"random"``, ``"mama"`` or ``"sparsegpt"`` (OBS
            reconstruction: the kept weights change too; unstructured and N:M with ``comparison`` ``"layer"`` or
            ``"row"``, or structured, the same number of units per layer: MLP neurons with ``down_proj``
            reconstructed, query heads (as many per KV head) with ``o_proj`` reconstructed; see
            :mod:`grpo_prune.pruning.sparsegpt`).
        calibration: input_ids ``[B, T]``, a dict for ``model(**batch)``, or an iterable of either. Required by
            wanda, sparsegpt, structured pruning (activation-aware), compensation, and movement/mama (LM-loss
            gradient). A batch's ``attention_mask`` keeps padding out of the sparsegpt Gram matrices.
        **settings_overrides: any other :class:`PruningSettings` field (``alpha``, ``normalization``,
            ``targets``, ``comparison``, ``structured_units``, ``uniform``, ``compensate``, ``seed``...).

    Returns:
        a :class:`PruneReport`.

    Raises:
        ValueError: naming the argument and the allowed values, before anything in the model changes.
    """
    fields = {f.name for f in dataclasses.fields(PruningSettings)}
    fixed = {"target_sparsity", "granularity", "n_m", "scorer", "schedule"}
    unknown = sorted(set(settings_overrides) - (fields - fixed))
    if unknown:
        raise ValueError(
            f"prune_oneshot got unknown or reserved settings {unknown}; allowed: {sorted(fields - fixed)} "
            "(sparsity, granularity, n_m and scorer are arguments)."
        )
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    if scorer not in ONESHOT_SCORERS:
        raise ValueError(f"`scorer` must be one of {ONESHOT_SCORERS}, got {scorer!r}.")
    if scorer == "sparsegpt":
        return _prune_sparsegpt(model, float(sparsity), granularity, n_m, calibration, settings_overrides)
    # The calibration gives the statistic one update (one summed backward pass): that is all a one-shot run has.
    settings_overrides.setdefault("min_statistic_updates", 1)
    settings = PruningSettings(
        target_sparsity=float(sparsity),
        granularity=granularity,
        n_m=n_m,
        scorer=scorer,
        schedule="oneshot",
        **settings_overrides,
    )
    try:
        settings.validate()
    except ValueError as err:  # name the function's argument where it differs from the settings field
        raise ValueError(str(err).replace("`target_sparsity`", "`sparsity`")) from None
    needs_data = settings.tracks_activations or settings.needs_movement
    if needs_data and calibration is None:
        why = []
        if settings.scorer == "wanda":
            why.append("wanda scores weigh |W| by input activation norms")
        if settings.granularity == "structured" and settings.needs_magnitude:
            why.append("structured scores are activation-aware")
        if settings.compensate:
            why.append("compensation needs mean inputs")
        if settings.needs_movement:
            why.append(f"scorer={scorer!r} needs movement from an LM-loss gradient")
        if settings.track_activations and not why:
            why.append("track_activations=True")
        raise ValueError(f"`calibration` is required here ({'; '.join(why)}): pass input_ids [B, T] or batches.")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = _calibration_batches(calibration, vocab) if needs_data else []

    pruner = Pruner(model, settings)  # validates targets and structure; does not touch weights
    if batches:
        _run_calibration(model, pruner, batches, movement=settings.needs_movement)
    event = pruner.prune_to(settings.target_sparsity)

    info = pruner.report()
    notes = []
    uses_bias = settings.scorer == "magnitude" or (settings.scorer == "mama" and settings.alpha < 1)
    if pruner.groups and uses_bias and not pruner.bias_magnitude:
        notes.append("bias indicator absent: the pruned units have no pretrained biases (|b0| = 0).")
    if pruner.added_biases:
        notes.append(f"compensation added biases to {len(pruner.added_biases)} bias-free layers.")
    return PruneReport(
        layer_sparsity=event["layer_sparsity"],
        global_sparsity=event["reached"],
        params_zeroed=pruner.num_pruned(),
        params_total=info["target_params"],
        target_sparsity=settings.target_sparsity,
        granularity=granularity,
        n_m=n_m if granularity == "n:m" else None,
        scorer=scorer,
        unit_sparsity=event.get("unit_sparsity", {}),
        biases_present=info["biases_present"],
        added_biases=list(pruner.added_biases),
        notes=notes,
        masks={n: m.clone() for n, m in pruner.masks.items()},
    )


# Settings that would change what sparsegpt computes but that it does not implement: refused, never ignored.
_SPARSEGPT_REFUSED = {
    "compensate": (False, "sparsegpt already reconstructs the kept weights; bias compensation would count twice"),
    "track_activations": (None, "sparsegpt collects Gram matrices, not activation norms"),
    "alpha": (0.0, "alpha weighs movement in mama"),
}


def _prune_sparsegpt(
    model: nn.Module,
    sparsity: float,
    granularity: str,
    n_m: str,
    calibration: Any,
    overrides: dict[str, Any],
) -> PruneReport:
    """``prune_oneshot(scorer="sparsegpt")``: validate, reconstruct layer by layer, record masks in a Pruner."""
    if granularity == "structured" and not overrides.get("uniform", True):
        raise ValueError(
            "scorer='sparsegpt' with `granularity`='structured' removes the same number of units in every layer "
            "(its costs are reconstruction errors of one layer, not comparable across layers): use uniform=True, or "
            "a structured scorer such as 'wanda' for a cross-layer MLP ranking."
        )
    for name, (default, why) in _SPARSEGPT_REFUSED.items():
        if name in overrides and overrides[name] != default:
            raise ValueError(f"`{name}`={overrides[name]!r} is not supported by scorer='sparsegpt' ({why}).")
    comparison = overrides.get("comparison", "layer")
    if comparison not in ("layer", "row"):
        raise ValueError(
            f"`comparison` must be 'layer' or 'row' for scorer='sparsegpt' (its saliencies are reconstruction "
            f"errors of one layer, not comparable across layers), got {comparison!r}."
        )
    # The Pruner validates everything else (sparsity vs N:M, targets, N:M divisibility) and holds the masks.
    # "random" stands in for the scorer: it allocates no indicator, and no score of it is ever computed here.
    settings = PruningSettings(
        target_sparsity=sparsity,
        granularity=granularity,
        n_m=n_m,
        scorer="random",
        schedule="oneshot",
        **{k: v for k, v in overrides.items() if k not in _SPARSEGPT_REFUSED},
    )
    try:
        settings.validate()
    except ValueError as err:
        raise ValueError(str(err).replace("`target_sparsity`", "`sparsity`")) from None
    if calibration is None:
        raise ValueError(
            "`calibration` is required here (sparsegpt reconstructs weights from the Gram matrices of their "
            "inputs): pass input_ids [B, T] or batches."
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = _calibration_batches(calibration, vocab)
    pruner = Pruner(model, settings)
    device = next(model.parameters()).device
    batches = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in b.items()} for b in batches]

    if granularity == "structured":
        units = sparsegpt_structured_oneshot_(model, pruner.groups, sparsity, batches)
        pruner.masks.update(pruner.unit_weight_masks(units))
        pruner.unit_masks.update(units)
    else:
        keep = sparsegpt_oneshot_(
            model,
            pruner.targets,
            sparsity,
            batches,
            n_m=n_m if granularity == "n:m" else None,
            comparison=comparison,
        )
        pruner.masks.update(keep)
    pruner.apply_masks_()  # already zero; keeps the Pruner's invariant explicit
    pruner.current_sparsity = sparsity
    info = pruner.report()
    return PruneReport(
        layer_sparsity=pruner.layer_sparsity(),
        global_sparsity=pruner.sparsity(),
        params_zeroed=pruner.num_pruned(),
        params_total=info["target_params"],
        target_sparsity=sparsity,
        granularity=granularity,
        n_m=n_m if granularity == "n:m" else None,
        scorer="sparsegpt",
        unit_sparsity=pruner.unit_sparsity(),
        biases_present=info["biases_present"],
        notes=[
            "sparsegpt: kept weights were reconstructed (OBS), decoder layer by decoder layer"
            + (" (down_proj / o_proj, for the units removed)." if granularity == "structured" else ".")
        ],
        masks={n: m.clone() for n, m in pruner.masks.items()},
    )

"""One-shot pruning on calibration windows: the start of the one-shot-then-recover recipe.

Both routes to that start run this one function, so that they prune alike: ``grpo-prune oneshot`` (which then
exports the model, :mod:`grpo_prune.oneshot_cli`) and ``grpo-prune train`` with ``prune_init_scorer`` (which then
starts its pruner from the masks, `MamaGRPOTrainer`). It makes the calibration windows (the self-generated sources
sample the model given, which must still be dense) and runs :func:`~grpo_prune.pruning.oneshot.prune_oneshot` on
them in chunks. It lives outside :mod:`grpo_prune.pruning` because it reads data (the engine does not).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from grpo_prune import data
from grpo_prune.pruning.oneshot import PruneReport, prune_oneshot

__all__ = ["CALIBRATION_CHUNK", "CalibratedPrune", "prune_on_calibration"]

#: Calibration windows per forward pass: bounds the activations' memory (wanda's forward computes the logits of
#: every window), whatever the number of windows.
CALIBRATION_CHUNK = 8


@dataclass
class CalibratedPrune:
    """What :func:`prune_on_calibration` did.

    Attributes:
        report: the one-shot prune's :class:`~grpo_prune.pruning.oneshot.PruneReport` (masks included).
        calibration, windows, length: the calibration source and its ``windows x length`` tokens.
        calibration_seed: the seed of its self-generated samples (unused by a plain text).
        task_share: the share of a ``self`` calibration's tokens that answer the task (the rest open continuations).
        cpu_seconds: CPU time of this process (every thread), sampling the calibration text included; a cached
            sample costs nothing.
        wall_seconds: elapsed time, the same span.
    """

    report: PruneReport
    calibration: str
    windows: int
    length: int
    calibration_seed: int
    task_share: float
    cpu_seconds: float
    wall_seconds: float

    def summary(self) -> dict[str, Any]:
        """JSON-able record (no masks): scorer, requested and reached sparsity, calibration, time."""
        return {
            "scorer": self.report.scorer,
            "sparsity": self.report.target_sparsity,
            "sparsity_reached": self.report.global_sparsity,
            "params_pruned": self.report.params_zeroed,
            "calibration": self.calibration,
            "calibration_windows": self.windows,
            "calibration_length": self.length,
            "calibration_seed": self.calibration_seed,
            "calibration_task_share": self.task_share,
            "cpu_seconds": round(self.cpu_seconds, 2),
            "wall_seconds": round(self.wall_seconds, 2),
        }


def prune_on_calibration(
    model: Any,
    tokenizer: Any,
    *,
    scorer: str,
    sparsity: float,
    calibration: str = "self",
    windows: int = 128,
    length: int = 256,
    calibration_seed: int = 0,
    task: str = "arithmetic",
    task_share: float = data.SELF_TASK_SHARE,
    granularity: str = "unstructured",
    n_m: str = "2:4",
    **settings_overrides: Any,
) -> CalibratedPrune:
    """Prune ``model`` in place to ``sparsity`` with ``scorer``, calibrated on ``windows x length`` tokens.

    Args:
        model: the dense causal LM (bare, not a DDP wrapper); with a self-generated source (``self``,
            ``self:task``, ``self:open``, ``mix``) its own samples are the calibration text, drawn before pruning
            and cached on disk (:func:`grpo_prune.data.calibration_windows`).
        tokenizer: its tokenizer.
        scorer, sparsity, granularity, n_m, settings_overrides: as :func:`~grpo_prune.pruning.oneshot.prune_oneshot`
            (``allocation``, ``targets``, ``comparison``, ``seed`` of the random scorer...).
        calibration: a source :func:`grpo_prune.data.validate_calibration_source` accepts.
        windows, length: number and length (tokens) of the calibration windows.
        calibration_seed, task: which self-generated samples (their seed, and the prompt dataset whose train
            prompts are answered); ``settings_overrides``' ``seed`` is the random scorer's.
        task_share: the share of a ``self`` calibration's tokens that answer ``task`` (default half; the rest
            continue neutral openings). More of the task keeps more of it at the cost of held-out perplexity
            (results/frontier, ``sparsegpt-taskcal``).

    Returns:
        a :class:`CalibratedPrune` (the report, with the masks, and the time taken).

    Raises:
        ValueError: a bad source or task share, too little text, or what ``prune_oneshot`` refuses (before the
            model changes).
    """
    cpu, wall = time.process_time(), time.perf_counter()
    ids = data.calibration_windows(
        tokenizer, calibration, windows, length, model=model, seed=calibration_seed, task=task, task_share=task_share
    )
    report = prune_oneshot(
        model,
        sparsity=sparsity,
        granularity=granularity,
        n_m=n_m,
        scorer=scorer,
        calibration=list(ids.split(CALIBRATION_CHUNK)),
        **settings_overrides,
    )
    return CalibratedPrune(
        report=report,
        calibration=str(calibration),
        windows=windows,
        length=length,
        calibration_seed=calibration_seed,
        task_share=task_share,
        cpu_seconds=time.process_time() - cpu,
        wall_seconds=time.perf_counter() - wall,
    )

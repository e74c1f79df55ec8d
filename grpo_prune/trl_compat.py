"""The private TRL methods `MamaGRPOTrainer` overrides, checked against the installed TRL.

The trainer hooks into `trl.GRPOTrainer` at a few private seams (see the `grpo_prune.trainer` docstring). TRL may
rename or re-sign them in any release, which would make the override silently dead (never called) or fail deep inside
training. `check_trl_seams` compares them with what this project was written against and raises one clear
`TrlSeamError` naming the seam; the trainer calls it at construction and `tests/test_trl_seams.py` runs it in CI.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

#: The TRL versions the test-suite runs against (also the pin in pyproject.toml).
TESTED_TRL = ">=1.16.0,<1.17"

#: Seam -> (parameter names after `self`, required). A seam that is not required may be absent (there is a fallback:
#: without `_clip_grad_norm`, gradients are processed in the `on_pre_optimizer_step` callback).
SEAMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "_compute_loss": (("model", "inputs"), True),
    "_generate_and_score_completions": (("inputs",), True),
    "_clip_grad_norm": (("model",), False),
    "_load_optimizer_and_scheduler": (("checkpoint",), True),
}


class TrlSeamError(RuntimeError):
    """The installed TRL changed a private method or attribute that `MamaGRPOTrainer` relies on."""


def _fail(seam: str, problem: str) -> TrlSeamError:
    import trl

    return TrlSeamError(
        f"TRL seam `GRPOTrainer.{seam}` {problem} in the installed trl {trl.__version__}; grpo-prune overrides it and "
        f"is tested with trl{TESTED_TRL} (pip install 'trl{TESTED_TRL}')."
    )


@functools.cache
def check_trl_seams(trainer_cls: Any = None) -> None:
    """Raise `TrlSeamError` if a seam of `trainer_cls` (default `trl.GRPOTrainer`) differs from :data:`SEAMS`.

    Checks each method's parameter names (positional, in order) and that `__init__` sets up `self._metrics`, the
    per-mode `defaultdict(list)` of logged values the trainer appends to. Cached: it costs nothing after the first
    call.
    """
    if trainer_cls is None:
        from trl import GRPOTrainer as trainer_cls
    for seam, (expected, required) in SEAMS.items():
        method = getattr(trainer_cls, seam, None)
        if method is None:
            if required:
                raise _fail(seam, "does not exist")
            continue
        params = list(inspect.signature(method).parameters.values())[1:]  # drop self
        names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        extra_required = [p.name for p in params[len(expected) :] if p.default is p.empty and p.kind != p.VAR_KEYWORD]
        if names[: len(expected)] != expected or extra_required:
            found = ", ".join(p.name for p in params)
            raise _fail(seam, f"takes (self, {found}), not (self, {', '.join(expected)})")
    try:
        init_source = inspect.getsource(trainer_cls.__init__)
    except (OSError, TypeError):  # no source shipped (e.g. a compiled install): the instance check still runs
        return
    if "self._metrics" not in init_source:
        raise _fail("_metrics", "is not set up in __init__")


def check_metrics_seam(trainer: Any) -> None:
    """Raise `TrlSeamError` unless `trainer._metrics` is TRL's ``{"train": ..., "eval": ...}`` of lists."""
    metrics = getattr(trainer, "_metrics", None)
    if not isinstance(metrics, dict) or not all(mode in metrics for mode in ("train", "eval")):
        raise _fail("_metrics", f"is {type(metrics).__name__}, not a dict with 'train' and 'eval' metric lists")

"""The private TRL and transformers methods `MamaGRPOTrainer` overrides, checked against the installed versions.

The trainer hooks into `trl.GRPOTrainer` (and the `transformers.Trainer` under it) at a few private seams (see the
`grpo_prune.trainer` docstring). Either library may rename or re-sign them in any release, which would make the
override silently dead (never called) or fail deep inside training. `check_trl_seams` compares them with what this
project was written against and raises one clear `TrlSeamError` naming the seam; the trainer calls it at
construction and `tests/test_trl_seams.py` runs it in CI.

The other direction matters as much: a method of ours whose name a TRL or transformers method already has replaces
it for every caller, with whatever signature ours has (TRL hands reward functions ``log_metric=self._log_metric``).
`check_overrides` fails on any such name that is not in :data:`INTENDED_OVERRIDES`.

One switch is changed rather than overridden: `compact_fused_lm_head_on_cpu` lets TRL's fused LM head skip the prompt
positions on CPU, as it does on GPUs (a quarter of the time of the policy's forward and backward on a quickstart micro-batch, one CPU thread).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

#: The TRL versions the test-suite runs against (also the pin in pyproject.toml).
TESTED_TRL = ">=1.16.0,<1.17"
#: The transformers versions the test-suite runs against (also the bound in pyproject.toml).
TESTED_TRANSFORMERS = ">=5.24.0,<5.26"

#: Seam -> (parameter names after `self`, required). A seam that is not required may be absent (there is a fallback:
#: without `_clip_grad_norm`, gradients are processed in the `on_pre_optimizer_step` callback).
SEAMS: dict[str, tuple[tuple[str, ...], bool]] = {
    "_compute_loss": (("model", "inputs"), True),
    "_generate_and_score_completions": (("inputs",), True),
    "_clip_grad_norm": (("model",), False),
    "_load_optimizer_and_scheduler": (("checkpoint",), True),
    # transformers.Trainer's (inherited by GRPOTrainer)
    "_prepare_for_training": (("max_steps", "train_dataloader", "resume_from_checkpoint"), True),
    "_save_checkpoint": (("model", "trial"), True),
}

#: Every attribute of `MamaGRPOTrainer` that replaces one of `GRPOTrainer` (TRL's or transformers') on purpose: the
#: seams above plus public methods whose signatures are kept. Anything else of ours with such a name is an accident.
INTENDED_OVERRIDES: frozenset[str] = frozenset({*SEAMS, "__init__", "_tag_names", "save_model", "create_model_card"})


class TrlSeamError(RuntimeError):
    """The installed TRL changed a private method or attribute that `MamaGRPOTrainer` relies on."""


def _fail(seam: str, problem: str) -> TrlSeamError:
    import transformers
    import trl

    return TrlSeamError(
        f"TRL seam `GRPOTrainer.{seam}` {problem} in the installed trl {trl.__version__} / transformers "
        f"{transformers.__version__}; grpo-prune overrides it and is tested with trl{TESTED_TRL} and "
        f"transformers{TESTED_TRANSFORMERS} (pip install 'trl{TESTED_TRL}' 'transformers{TESTED_TRANSFORMERS}')."
    )


def check_overrides(cls: Any, base: Any = None, intended: frozenset[str] = INTENDED_OVERRIDES) -> None:
    """Raise `TrlSeamError` if ``cls`` defines an attribute that ``base`` (default `trl.GRPOTrainer`, with
    `transformers.Trainer` in its MRO) already has and that is not in ``intended``: an accidental shadowing."""
    if base is None:
        from trl import GRPOTrainer as base
    shadowing = sorted(
        name
        for name in vars(cls)
        if name not in intended
        and not (name.startswith("__") and name.endswith("__"))
        and any(name in vars(klass) for klass in base.__mro__ if klass is not object)
    )
    if shadowing:
        owners = {n: next(k.__qualname__ for k in base.__mro__ if n in vars(k)) for n in shadowing}
        raise TrlSeamError(
            f"{cls.__qualname__} shadows {', '.join(f'{owners[n]}.{n}' for n in shadowing)}: rename it, or add it to "
            "grpo_prune.trl_compat.INTENDED_OVERRIDES if the override is meant (with the parent's signature)."
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


def compact_fused_lm_head_on_cpu() -> None:
    """Make TRL's fused LM head score only the labelled positions on CPU, as it already does on CUDA and XPU.

    `trl.trainer.utils.add_fused_lm_head` projects through the 49k-entry vocabulary either the positions whose label
    is not -100 (on Triton devices) or every position (elsewhere), because on compiled backends (Neuron, XLA) a
    batch-dependent token count would recompile the tiles on each call. Eager CPU has nothing to recompile, and a
    GRPO micro-batch labels only its completion: the quickstart's 32 completion tokens follow about 87 prompt
    tokens, so three quarters of that projection, forward and backward, is thrown away. Each position's
    log-probability and entropy is computed on its own either way, so they agree to float rounding (the matrix
    products change shape), as do the gradients. TRL reads the decision from its module global `_use_triton` at call
    time; this wraps it so CPU devices answer True there. Only `trl.trainer.utils` sees the wrapper: which kernel
    folds the tiles is decided in `trl.kernels.chunked_logprob`, unchanged. Idempotent; raises `TrlSeamError` if the
    installed TRL no longer has the global.
    """
    import trl
    from trl.trainer import utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if decide is None or not callable(decide):
        raise TrlSeamError(
            "trl.trainer.utils._use_triton (the fused LM head's switch between scoring the labelled positions and "
            f"every position) does not exist in the installed trl {trl.__version__}; grpo-prune "
            f"is tested with trl{TESTED_TRL} (pip install 'trl{TESTED_TRL}')."
        )
    if getattr(decide, "_grpo_prune_compacts_cpu", False):
        return

    @functools.wraps(decide)
    def compact_on_cpu(device: Any) -> bool:
        return device.type == "cpu" or decide(device)

    compact_on_cpu._grpo_prune_compacts_cpu = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact_on_cpu

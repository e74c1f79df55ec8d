"""grpo-prune: MAMA pruning and distillation inside TRL's GRPO training.

The heavy entry points are imported lazily so that ``import grpo_prune.pruning`` (pure torch) never pulls in TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "MamaGRPOConfig": "grpo_prune.config",
    "MamaGRPOTrainer": "grpo_prune.trainer",
    "prune_oneshot": "grpo_prune.pruning.oneshot",
    "PruneReport": "grpo_prune.pruning.oneshot",
    "Pruner": "grpo_prune.pruning.pruner",
    "PruningSettings": "grpo_prune.pruning.pruner",
    "load_model": "grpo_prune.models",
    "export_pruned": "grpo_prune.export",
}

__all__ = [
    "MamaGRPOConfig",
    "MamaGRPOTrainer",
    "PruneReport",
    "Pruner",
    "PruningSettings",
    "export_pruned",
    "load_model",
    "prune_oneshot",
]

if TYPE_CHECKING:  # pragma: no cover
    from grpo_prune.config import MamaGRPOConfig
    from grpo_prune.pruning.oneshot import PruneReport, prune_oneshot
    from grpo_prune.pruning.pruner import Pruner, PruningSettings
    from grpo_prune.trainer import MamaGRPOTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grpo_prune' has no attribute {name!r}")

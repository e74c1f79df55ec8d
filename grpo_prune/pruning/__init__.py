"""Pure-torch pruning engine: scores, masks, schedules, the Pruner and one-shot pruning (no TRL import)."""

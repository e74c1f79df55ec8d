"""W&B views of a pruning run: per-layer sparsity tables and score histograms at each prune event, a final summary.

Scalars (``prune/*``, ``distill/*``, rewards) already reach W&B through transformers' `WandbCallback`, which logs
everything the trainer emits plus the whole config (every pruning field included). This callback adds what a scalar
cannot show. It is a no-op unless ``report_to`` includes ``wandb`` and a run is active, and it only ever runs on the
main process. Offline runs (``WANDB_MODE=offline``) write the same records to ``wandb/offline-run-*``, which
``wandb sync`` uploads later.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class WandbPruningCallback(TrainerCallback):
    """Logs each new prune event of a `MamaGRPOTrainer` to the active W&B run."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self._logged_events = 0

    @staticmethod
    def _run():
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            return None
        return wandb.run

    def on_step_end(self, args, state, control, **kwargs):
        self._log_new_events(state)

    def on_train_begin(self, args, state, control, **kwargs):
        self._log_new_events(state)

    def _log_new_events(self, state) -> None:
        run = self._run()
        events = self.trainer.prune_events
        if run is None or not state.is_world_process_zero or self._logged_events >= len(events):
            return
        import wandb

        for event in events[self._logged_events :]:
            rows = [[layer, float(s)] for layer, s in event["layer_sparsity"].items()]
            payload = {
                "prune/layer_sparsity": wandb.Table(columns=["layer", "sparsity"], data=rows),
                "prune/event_sparsity": event["sparsity"],
                "train/global_step": event["step"],
            }
            sample = self.trainer.last_score_sample
            if sample is not None and sample.numel():
                payload["prune/score_histogram"] = wandb.Histogram(sample.float().cpu().numpy())
            run.log(payload)
        self._logged_events = len(events)

    def on_train_end(self, args, state, control, **kwargs):
        run = self._run()
        if run is None or not state.is_world_process_zero:
            return
        report = self.trainer.pruning_report()
        run.summary.update(
            {
                "prune/final_sparsity": report.get("global_sparsity", 0.0),
                "prune/params_pruned": report.get("params_pruned", 0),
                "prune/num_events": len(report.get("events", [])),
                "prune/reward_guard_holds": report.get("reward_guard_holds", 0),
            }
        )

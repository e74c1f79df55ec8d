"""`PruningCallback`: the pruner's clock inside `transformers.Trainer`.

It owns what happens *between* optimizer steps: the schedule clock (optimizer steps, minus those the reward guard
held), the reward guard, prune events and their records (``pruning_events.jsonl``), and their save/resume state.
The trainer keeps the loss and gradient seams (where the reward statistic is taken and gradients are masked).

The callback does not know the trainer class: it talks to the pruner and to a `PruningHost`, the narrow interface
that `MamaGRPOTrainer` provides (its arguments, optimizer and pruner, the two gradient seams, the training metrics).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Protocol

import torch
from transformers import TrainerCallback

from grpo_prune.fileio import write_text_atomic
from grpo_prune.pruning.pruner import Pruner
from grpo_prune.pruning.reward_guard import RewardGuard

EVENTS_NAME = "pruning_events.jsonl"
SCORE_QUANTILES = (0.1, 0.5, 0.9)


class PruningHost(Protocol):
    """What `PruningCallback` needs of the trainer that runs it.

    Attributes:
        args: the run's `MamaGRPOConfig` (schedule, reward guard and `output_dir` fields).
        optimizer: the optimizer whose state is masked at prune events.
        pruner: the run's pruner (built late under FSDP2, so read at each use).
        train_metrics: the per-key lists of training metrics the trainer logs (``prune/*`` are appended).
    """

    args: Any
    optimizer: Any
    pruner: Pruner | None

    @property
    def train_metrics(self) -> dict[str, list[float]]: ...

    def process_pruning_gradients(self) -> None:
        """Gradients are complete: feed the reward statistic, mask the gradients of pruned entries (once a step)."""

    def enforce_pruning_masks(self) -> None:
        """After the optimizer step: re-zero the pruned weights."""

    def is_world_process_zero(self) -> bool: ...


class PruningCallback(TrainerCallback):
    """Runs the pruner at the optimizer-step seams of `transformers.Trainer`.

    Attributes:
        reward_guard: rolling reward around prune events (and the optional hold).
        prune_events: one record per prune event (step, target and reached sparsity, per-layer sparsity, rewards,
            whether the reward statistic was mixed in, seconds).
        prune_clock: schedule time.
        last_score_sample: strided sample of the last event's scores (for histograms).
    """

    def __init__(self, host: PruningHost):
        self.host = host
        args = host.args
        self.reward_guard = RewardGuard(window=args.reward_window, tolerance=args.reward_guard_tolerance)
        self.prune_events: list[dict[str, Any]] = []
        self.prune_clock = 0
        self.last_score_sample: torch.Tensor | None = None

    @property
    def pruner(self) -> Pruner:
        return self.host.pruner

    # ------------------------------------------------------------------------------------------- trainer events
    def on_train_begin(self, args, state, control, **kwargs):
        self.pruner.settings.end_step = self.resolve_end_step(state.max_steps)
        if state.global_step == 0 and self.pruner.step == 0 and not self.prune_events:
            self.run_prune_event(step=0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.host.process_pruning_gradients()  # already done inside gradient clipping when that is on

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.host.enforce_pruning_masks()

    def on_step_end(self, args, state, control, **kwargs):
        metrics = self.host.train_metrics
        if self.reward_guard.should_hold():
            self.reward_guard.holds += 1
            metrics["prune/guard_hold"].append(1.0)
        else:
            self.prune_clock += 1
            self.run_prune_event(step=state.global_step)
        metrics["prune/sparsity"].append(self.pruner.sparsity())
        metrics["prune/target_sparsity"].append(self.pruner.target_sparsity_at(self.prune_clock))

    # --------------------------------------------------------------------------------------------------- rewards
    def observe_reward(self, reward: float) -> None:
        """Feed one generation batch's mean reward (identical on every rank) to the guard."""
        completed = self.reward_guard.update(reward)
        for event in completed:
            self.host.train_metrics["prune/reward_after_event"].append(event["reward_after"])
            for record in self.prune_events:
                if record["step"] == event["step"]:
                    record["reward_after"] = event["reward_after"]
        if completed:
            self._write_events()

    # ---------------------------------------------------------------------------------------------------- events
    def resolve_end_step(self, max_steps: int) -> int:
        """``prune_end_step`` for a run of ``max_steps`` (see `MamaGRPOConfig.resolve_end_step`)."""
        return self.host.args.resolve_end_step(max_steps, at_target=self.pruner.reached_target)

    def run_prune_event(self, step: int) -> None:
        """Prune if the schedule calls for it at the current clock; record and log the event."""
        start = time.perf_counter()
        event = self.pruner.maybe_prune(self.prune_clock)
        if event is None:
            return
        self.pruner.mask_optimizer_state_(self.host.optimizer)
        seconds = time.perf_counter() - start
        guard_event = self.reward_guard.record_event(step)
        record = {
            "step": step,
            "schedule_step": self.prune_clock,
            "target_sparsity": event["target"],
            "sparsity": event["reached"],
            "reward_before": guard_event["reward_before"],
            "reward_after": None,  # known `reward_window` generation batches later; the file is rewritten then
            "layer_sparsity": event["layer_sparsity"],
            "seconds": seconds,
        }
        # Whether the reward statistic decided this event (mama's mix, the "reward" allocation): false = fell back.
        for flag in ("statistic_mixed", "reward_allocation"):
            if flag in event:
                record[flag] = event[flag]
        record.update(self._score_quantiles(event.get("score_sample")))
        self.prune_events.append(record)
        metrics = self.host.train_metrics
        if guard_event["reward_before"] is not None:
            metrics["prune/reward_before_event"].append(guard_event["reward_before"])
        for flag in ("statistic_mixed", "reward_allocation"):
            if flag in record:
                metrics[f"prune/{flag}"].append(float(record[flag]))
        for key, value in record.items():
            if key.startswith("score_q"):
                metrics[f"prune/{key}"].append(value)
        self._write_events()

    def _write_events(self) -> None:
        """Rewrite ``pruning_events.jsonl``: one line per prune event, the same records as the report's ``events``.

        Rewritten (atomically) rather than appended, so that each event's ``reward_after`` is filled in once it is
        known; the file is a few lines long."""
        if self.host.is_world_process_zero():
            text = "".join(json.dumps(record) + "\n" for record in self.prune_events)
            os.makedirs(self.host.args.output_dir, exist_ok=True)
            write_text_atomic(os.path.join(self.host.args.output_dir, EVENTS_NAME), text)

    def _score_quantiles(self, sample: torch.Tensor | None) -> dict[str, float]:
        """Quantiles of the event's scores, from the pruner's strided subsample of them."""
        if sample is None or not sample.numel():
            return {}
        self.last_score_sample = sample
        values = torch.quantile(sample.float(), torch.tensor(SCORE_QUANTILES))
        return {f"score_q{int(q * 100)}": v.item() for q, v in zip(SCORE_QUANTILES, values, strict=True)}

    # ------------------------------------------------------------------------------------------ save and resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "prune_clock": self.prune_clock,
            "reward_guard": self.reward_guard.state_dict(),
            "prune_events": self.prune_events,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prune_clock = state["prune_clock"]
        self.reward_guard.load_state_dict(state["reward_guard"])
        self.prune_events = state["prune_events"]
        # Records of checkpoints written before they carried `reward_after`: take it from the guard once.
        after = {e["step"]: e.get("reward_after") for e in self.reward_guard.public_events()}
        for record in self.prune_events:
            record.setdefault("reward_after", after.get(record["step"]))

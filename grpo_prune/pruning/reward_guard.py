"""Reward verification around prune events, and the optional guard that holds the schedule.

Pure Python: the trainer feeds it one mean reward per generation batch. Each prune event records the rolling mean
reward just before it and, once ``window`` more batches have been seen, the rolling mean just after it. With a
tolerance set, the guard holds the schedule (no further prune event) while the current rolling reward is below the
last event's pre-event level by more than ``tolerance * |level|``; using the magnitude keeps the rule meaningful for
rewards that are negative.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class RewardGuard:
    """Rolling reward bookkeeping for prune events.

    Args:
        window: number of generation batches in the rolling mean (>= 1).
        tolerance: allowed relative drop below the pre-event level before the schedule is held; ``None`` records
            rewards but never holds.
    """

    def __init__(self, window: int = 4, tolerance: float | None = None):
        if window < 1:
            raise ValueError(f"`window` must be >= 1, got {window}")
        if tolerance is not None and not 0.0 <= tolerance < 1.0:
            raise ValueError(f"`tolerance` must be in [0, 1) or None, got {tolerance}")
        self.window = window
        self.tolerance = tolerance
        self.recent: deque[float] = deque(maxlen=window)
        self.events: list[dict[str, Any]] = []  # {"step", "reward_before", "reward_after", "_seen_after"}
        self.holds = 0

    def rolling_mean(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def update(self, reward: float) -> list[dict[str, Any]]:
        """Add one batch's mean reward; returns the events whose post-event reward just became known."""
        completed = []
        if reward != reward:  # NaN: every reward function returned None for the batch
            return completed
        self.recent.append(float(reward))
        for event in self.events:
            if event["reward_after"] is None:
                event["_seen_after"] += 1
                if event["_seen_after"] >= self.window:
                    event["reward_after"] = self.rolling_mean()
                    completed.append(event)
        return completed

    def record_event(self, step: int) -> dict[str, Any]:
        """Record a prune event at ``step`` with the current rolling reward as its pre-event level."""
        event = {"step": step, "reward_before": self.rolling_mean(), "reward_after": None, "_seen_after": 0}
        self.events.append(event)
        return event

    def should_hold(self) -> bool:
        """True while the reward has not recovered to within tolerance of the last event's pre-event level."""
        if self.tolerance is None or not self.events or not self.recent:
            return False
        level = self.events[-1]["reward_before"]
        if level is None:
            return False
        return self.rolling_mean() < level - self.tolerance * abs(level)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "events": [dict(e) for e in self.events], "holds": self.holds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(state["recent"], maxlen=self.window)
        self.events = [dict(e) for e in state["events"]]
        self.holds = int(state["holds"])

    def public_events(self) -> list[dict[str, Any]]:
        """Events without internal counters, for reports."""
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.events]

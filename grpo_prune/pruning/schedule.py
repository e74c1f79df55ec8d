"""Sparsity schedules: target sparsity as a pure function of the optimizer step.

Prune events happen at ``start, start + every, start + 2*every, ...`` and always at ``end`` (``oneshot``: only at
``start``). Between events the sparsity of the last event is held; after ``end`` the final sparsity is held while
training recovers. With ``p = clamp((t - start) / (end - start), 0, 1)`` at the last event ``t <= step``:

- ``cubic`` (Zhu & Gupta 2017, the default): ``s = final + (initial - final) * (1 - p)**3``; prunes fast early,
  when the network has the most redundancy, and slowly near the end.
- ``linear``: ``s = initial + (final - initial) * p``.
- ``oneshot``: ``s = final`` from ``start`` on.

Before ``start`` the sparsity is 0.0 (nothing pruned yet); at ``start`` it is ``initial``. ``end == start`` puts
everything at ``start``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

__all__ = ["SCHEDULES", "is_prune_event", "prune_event_steps", "sparsity_at"]

SCHEDULES = ("cubic", "linear", "oneshot")
"""Schedule names accepted by :func:`sparsity_at` (``PruningSettings.schedule``)."""


def _cubic(p: float, initial: float, final: float) -> float:
    return final + (initial - final) * (1.0 - p) ** 3


def _linear(p: float, initial: float, final: float) -> float:
    return initial + (final - initial) * p


def _oneshot(p: float, initial: float, final: float) -> float:
    return final


_SCHEDULE_FNS: dict[str, Callable[[float, float, float], float]] = {
    "cubic": _cubic,
    "linear": _linear,
    "oneshot": _oneshot,
}


def _as_int(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    try:
        return operator.index(value)  # ints and numpy/torch integer scalars, not floats
    except TypeError:
        raise ValueError(f"{name} must be an integer; got {value!r}") from None


def _check_steps(schedule: str, start: int, end: int, every: int) -> tuple[int, int, int]:
    if schedule not in _SCHEDULE_FNS:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    start, end, every = _as_int("start", start), _as_int("end", end), _as_int("every", every)
    if start < 0:
        raise ValueError(f"start must be >= 0; got {start}")
    if end < start:
        raise ValueError(f"end must be >= start ({start}); got {end}")
    if every < 1:
        raise ValueError(f"every must be >= 1; got {every}")
    return start, end, every


def _check_fractions(initial: float, final: float) -> tuple[float, float]:
    initial, final = float(initial), float(final)
    for name, value in (("initial", initial), ("final", final)):
        if not (0.0 <= value < 1.0):  # also rejects NaN
            raise ValueError(f"{name} sparsity must be in [0, 1); got {value}")
    if final < initial:
        raise ValueError(f"final sparsity must be >= initial ({initial}); got {final}")
    return initial, final


def prune_event_steps(*, schedule: str = "cubic", start: int = 0, end: int = 0, every: int = 1) -> list[int]:
    """Steps at which the masks grow: ``[start, start + every, ..., end]`` (``oneshot``: ``[start]``).

    ``end`` is always an event even when ``end - start`` is not a multiple of ``every``, so the final sparsity is
    reached exactly at ``end``.
    """
    start, end, every = _check_steps(schedule, start, end, every)
    if schedule == "oneshot":
        return [start]
    steps = list(range(start, end, every))
    steps.append(end)
    return steps


def is_prune_event(step: int, *, schedule: str = "cubic", start: int = 0, end: int = 0, every: int = 1) -> bool:
    """Whether ``step`` is one of :func:`prune_event_steps` (computed without building the list)."""
    start, end, every = _check_steps(schedule, start, end, every)
    step = _as_int("step", step)
    if schedule == "oneshot":
        return step == start
    return start <= step <= end and ((step - start) % every == 0 or step == end)


def sparsity_at(
    step: int,
    *,
    schedule: str = "cubic",
    initial: float = 0.0,
    final: float,
    start: int = 0,
    end: int = 0,
    every: int = 1,
) -> float:
    """Target sparsity (fraction of prunable units pruned) at optimizer step ``step``.

    Args:
        step: optimizer step (>= 0 in practice; any step before ``start`` gives 0.0).
        schedule: one of :data:`SCHEDULES`.
        initial: sparsity at the first event ``start``, in ``[0, 1)``.
        final: sparsity from ``end`` on, in ``[initial, 1)``.
        start: first prune event (step), ``>= 0``.
        end: last prune event, ``>= start``.
        every: steps between prune events, ``>= 1``.

    Returns:
        The sparsity of the last prune event at or before ``step`` (see the module docstring for the formulas).
    """
    start, end, every = _check_steps(schedule, start, end, every)
    initial, final = _check_fractions(initial, final)
    step = _as_int("step", step)
    if step < start:
        return 0.0
    if schedule == "oneshot" or step >= end:
        p = 1.0  # held at the final value (also covers end == start)
    else:
        event = start + (step - start) // every * every  # last event <= step; < end here
        p = (event - start) / (end - start)
    return float(_SCHEDULE_FNS[schedule](p, initial, final))

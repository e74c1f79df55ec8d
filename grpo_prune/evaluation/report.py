"""Tables of evaluation results: one model's headline metrics (:func:`format_results`), and a dense and a pruned
model side by side with ratios pruned / dense (:func:`compare_results`, :class:`Comparison`, JSON-ready)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grpo_prune.evaluation.tasks import TASKS


@dataclass(frozen=True)
class _Metric:
    label: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: Callable[[float], str]
    better: str  # "lower" or "higher": which way is good, for the reader of the table


def _percent(x: float) -> str:
    return f"{100 * x:.1f}"


def _scaled(key: str, scale: float) -> Callable[[dict[str, Any]], float | None]:
    return lambda result: None if result.get(key) is None else result[key] * scale


def _task_metric(task: str, *keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result.get("tasks", {}).get(task)
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    return get


def _metrics_of(result: dict[str, Any]) -> list[tuple[str, str, _Metric]]:
    """The headline metrics present in ``result``: ``(task, row title, metric)`` in table order."""
    millions = "{:.2f}".format
    rows: list[tuple[str, str, _Metric]] = [
        ("size", "size", _Metric("parameters (M)", _scaled("parameters", 1e-6), millions, "lower")),
        (
            "size",
            "size",
            _Metric("nonzero parameters (M)", _scaled("nonzero_parameters", 1e-6), millions, "lower"),
        ),
    ]
    for task, metrics in result.get("tasks", {}).items():
        kind = TASKS[task].kind if task in TASKS else None
        if kind == "perplexity":
            title = f"{task} ({metrics.get('windows')} x {metrics.get('max_length')} tokens)"
            rows.append(
                (task, title, _Metric("perplexity", _task_metric(task, "perplexity"), "{:.2f}".format, "lower"))
            )
        elif kind == "multiple_choice":
            title = f"{task} (n={metrics.get('n')})"
            rows.append((task, title, _Metric("acc (%)", _task_metric(task, "acc"), _percent, "higher")))
            rows.append((task, title, _Metric("acc_norm (%)", _task_metric(task, "acc_norm"), _percent, "higher")))
        elif kind == "generation":
            title = f"{task} (n={metrics.get('n')})"
            rows.append((task, title, _Metric("accuracy (%)", _task_metric(task, "accuracy"), _percent, "higher")))
            for wording in list(metrics.get("wordings", {}))[1:]:  # the first one is the headline above
                get = _task_metric(task, "wordings", wording, "accuracy")
                rows.append((task, title, _Metric(f"accuracy (%), {wording} wording", get, _percent, "higher")))
        elif kind == "throughput":
            title = f"{task} ({metrics.get('new_tokens')} new tokens)"
            for key, value in metrics.items():
                if key.startswith("batch_") and isinstance(value, dict):
                    b = value["batch_size"]
                    speed = _task_metric(task, key, "tokens_per_s")
                    latency = _task_metric(task, key, "latency_s")
                    rows.append((task, title, _Metric(f"tokens/s, batch {b}", speed, "{:.1f}".format, "higher")))
                    rows.append((task, title, _Metric(f"latency (s), batch {b}", latency, "{:.3f}".format, "lower")))
    return rows


def format_results(result: dict[str, Any]) -> str:
    """One model's headline metrics as a markdown table (accuracies in %, perplexity, tokens/s, seconds)."""
    lines = [f"| task | metric | {result.get('model', 'model')} |", "| --- | --- | ---: |"]
    for _, title, metric in _metrics_of(result):
        value = metric.get(result)
        lines.append(f"| {title} | {metric.label} | {'-' if value is None else metric.fmt(value)} |")
    return "\n".join(lines)


@dataclass
class Comparison:
    """Dense and pruned results side by side.

    Attributes:
        dense, pruned: the two :func:`evaluate_model` results.
        rows: one dict per headline metric: ``task``, ``metric``, ``dense``, ``pruned``, ``ratio`` (pruned / dense;
            ``None`` where dense is 0 or a value is missing) and ``better`` (``"lower"`` or ``"higher"``).
        labels: column titles for the two models.
    """

    dense: dict[str, Any]
    pruned: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: tuple[str, str] = ("dense", "pruned")

    @property
    def markdown(self) -> str:
        """The table in markdown; the ratio column is pruned / dense (a speedup for tokens/s)."""
        a, b = self.labels
        lines = [f"| task | metric | {a} | {b} | {b} / {a} |", "| --- | --- | ---: | ---: | ---: |"]
        for row in self.rows:
            fmt = row["_fmt"]
            cells = ["-" if row[k] is None else fmt(row[k]) for k in ("dense", "pruned")]
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}x"
            lines.append(
                f"| {row['task']} | {row['metric']} ({row['better']} is better) | {cells[0]} | {cells[1]} | {ratio} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: both results, the rows (without formatting functions) and the markdown table."""
        rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in self.rows]
        return {
            "labels": list(self.labels),
            "dense": self.dense,
            "pruned": self.pruned,
            "rows": rows,
            "markdown": self.markdown,
        }

    def __str__(self) -> str:
        return self.markdown


def compare_results(
    dense: dict[str, Any], pruned: dict[str, Any], labels: tuple[str, str] = ("dense", "pruned")
) -> Comparison:
    """Side-by-side table of two :func:`evaluate_model` results (no model is run). Rows follow ``dense``'s tasks;
    a task's row title carries its item count, and a mismatch between the two (different subsets) is marked."""
    titles = {(task, metric.label): title for task, title, metric in _metrics_of(pruned)}
    rows = []
    for task, title, metric in _metrics_of(dense):
        other = titles.get((task, metric.label))
        if other is not None and other != title:  # different subsets or settings: the ratio compares unlike things
            title = f"{title} vs {other} (!)"
        a, b = metric.get(dense), (metric.get(pruned) if other is not None else None)
        ratio = b / a if a not in (None, 0) and b is not None else None
        rows.append(
            {
                "task": title,
                "metric": metric.label,
                "dense": a,
                "pruned": b,
                "ratio": ratio,
                "better": metric.better,
                "_fmt": metric.fmt,
            }
        )
    return Comparison(dense, pruned, rows, labels)

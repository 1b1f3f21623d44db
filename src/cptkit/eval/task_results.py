"""Downstream task scores as cptkit records them: lm-eval's results read into
{task: {metric: {value, stderr, higher_is_better, samples}}}, each model's change against the base with an
interval from lm-eval's standard errors, and the tables and lines that show them (results.md, report.md,
the terminal, `cptkit run`'s summary)."""

from __future__ import annotations

import math
from typing import Any

from cptkit.eval.results import markdown_table

Z95 = 1.96  # a 95% interval of a difference of two means, from their standard errors
TaskScores = dict[str, dict[str, dict[str, Any]]]


def scores_of(result: dict[str, Any]) -> TaskScores:
    """lm-eval's simple_evaluate result as {task: {metric: {value, stderr, higher_is_better, samples}}}.
    lm-eval names a score `metric,filter` (filter `none` when the task has none): the metric is `metric`,
    or `metric:filter` under a filter."""
    out: TaskScores = {}
    better = result.get("higher_is_better") or {}
    counts = result.get("n-samples") or {}
    for task, numbers in (result.get("results") or {}).items():
        metrics = {}
        for key, value in numbers.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = numbers.get(f"{metric}_stderr,{filt}")
            metrics[metric if filt == "none" else f"{metric}:{filt}"] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "higher_is_better": (better.get(task) or {}).get(metric),
                "samples": (counts.get(task) or {}).get("effective", numbers.get("sample_len")),
            }
        if metrics:
            out[task] = metrics
    return out


def task_deltas(tasks: dict[str, TaskScores], base: str = "base") -> list[dict[str, Any]]:
    """Every non-base model's change against `base`, per task and metric, with a 95% interval from the
    two standard errors (None where lm-eval gave none) and what it reads as."""
    before = tasks.get(base) or {}
    out = []
    for model, scores in tasks.items():
        if model == base:
            continue
        for task, metrics in scores.items():
            for metric, after in metrics.items():
                b = (before.get(task) or {}).get(metric)
                if b is None:
                    continue
                delta = after["value"] - b["value"]
                se = _combined(b["stderr"], after["stderr"])
                low, high = (None, None) if se is None else (delta - Z95 * se, delta + Z95 * se)
                out.append(
                    {
                        "model": model,
                        "task": task,
                        "metric": metric,
                        "before": b["value"],
                        "after": after["value"],
                        "delta": delta,
                        "stderr": se,
                        "low": low,
                        "high": high,
                        "reading": task_reading(low, high, after.get("higher_is_better")),
                    }
                )
    return out


def _combined(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else math.sqrt(a * a + b * b)


def task_reading(low: float | None, high: float | None, higher_is_better: bool | None) -> str:
    """better or worse only when the whole interval says so; otherwise within noise."""
    if low is None or high is None:
        return "no interval"
    if low > 0 or high < 0:
        up = low > 0
        return "better" if up == (higher_is_better is not False) else "worse"
    return "within noise"


def _value(m: dict[str, Any]) -> str:
    return f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m.get("stderr") is not None else "")


def _change(d: dict[str, Any] | None) -> str:
    if d is None:
        return ""
    interval = f" [{d['low']:+.4f}, {d['high']:+.4f}]" if d["low"] is not None else ""
    return f"{d['delta']:+.4f}{interval}"


def task_rows(record: dict[str, Any]) -> list[list[str]]:
    """One row per model, task and metric: [model, task, metric, value ± stderr, change [95%], reading]."""
    by_key = {(d["model"], d["task"], d["metric"]): d for d in record.get("task_deltas") or []}
    rows = []
    for model, scores in (record.get("tasks") or {}).items():
        for task, metrics in scores.items():
            for metric, m in metrics.items():
                d = by_key.get((model, task, metric))
                rows.append([model, task, metric, _value(m), _change(d), d["reading"] if d else ""])
    return rows


TASK_HEADERS = ["model", "task", "metric", "value ± stderr", "change vs base [95%]", "reading"]


def tasks_markdown(record: dict[str, Any], heading: str = "## Downstream tasks") -> list[str]:
    """The downstream task table of results.json's `tasks` and `task_deltas` (none: no lines)."""
    rows = task_rows(record)
    if not rows:
        return []
    return [
        heading,
        "",
        "lm-evaluation-harness scores; the change against the base model with a 95% interval from the "
        "two standard errors: better or worse only when the whole interval says so.",
        "",
        *markdown_table(TASK_HEADERS, rows, [False] * 3 + [True] * 2 + [False]),
        "",
    ]


def append_tasks_markdown(results_md: Any, record: dict[str, Any]) -> None:
    """Add the downstream task table to a results.md just written (nothing when no task ran)."""
    lines = tasks_markdown(record)
    if lines:
        with open(results_md, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines))


def print_task_summary(record: dict[str, Any]) -> None:
    """The downstream task table on the terminal (stderr), after the perplexity table."""
    rows = task_rows(record)
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cptkit eval: downstream tasks")
    for i, header in enumerate(TASK_HEADERS):
        table.add_column(header, justify="right" if i in (3, 4) else "left")
    for row in rows:
        table.add_row(*row)
    Console(stderr=True).print(table)


def task_summary_lines(record: dict[str, Any]) -> list[str]:
    """One line per task and metric: the base's score, the last listed model's, and the reading. The
    interpolation sweep's points (scored after the evaluated models) are left out, as in the eval summary."""
    from cptkit.eval.tradeoff import is_point

    tasks = record.get("tasks") or {}
    if not tasks:
        return []
    models = list(tasks)
    deltas = [d for d in record.get("task_deltas") or [] if not is_point(d["model"])]
    last = {(d["task"], d["metric"]): d for d in deltas}  # the last model wins
    lines = []
    for task, metrics in tasks[models[0]].items():
        for metric, m in metrics.items():
            d = last.get((task, metric))
            if d is None:
                lines.append(f"{task} {metric}: {models[0]} {m['value']:.4f}")
            else:
                lines.append(
                    f"{task} {metric}: {models[0]} {d['before']:.4f} -> {d['model']} {d['after']:.4f} "
                    f"({_change(d)}: {d['reading']})"
                )
    return lines

"""The demo's headline: perplexity before -> after on the domain and the general held-out sets, read from
eval's results.json, with each change's bootstrap interval; the chat-retention probe's answer loss and each
downstream task's score, base -> merged, when eval measured them; whether training stayed within its
forgetting budget (run_meta.json), when one was set; and the lines the demo ends with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cptkit.eval.chat_probe import probe_change
from cptkit.eval.results import HEADLINE_WORDING, interval_text, perplexity_change, verdict
from cptkit.train.budget import budget_text


def read_headline(
    results_path: Path, model: str = "merged", train_meta: Path | None = None
) -> dict[str, Any]:
    """Perplexity before -> after (and the change's interval) on the domain and the general held-out
    sets; the chat probe (`chat`) and the downstream tasks' changes (`tasks`) of `model` against the base
    when results.json has them; the forgetting budget's record from the training run's `train_meta` when
    it has one."""
    results = json.loads(results_path.read_text(encoding="utf-8"))
    headline: dict[str, Any] = {}
    for d in results["deltas"]:
        if d["model"] == model:
            headline[d["role"]] = {
                "set": d["set"],
                "before": d["perplexity_before"],
                "after": d["perplexity_after"],
                "interval": d.get("perplexity_change_interval"),
            }
    probe = results.get("chat_probe") or {}
    if "base" in probe and model in probe:
        headline["chat"] = {
            "examples": probe["base"]["examples"],
            "before": probe["base"]["loss"],
            "after": probe[model]["loss"],
            "change": probe_change(probe, model),
        }
    tasks = [d for d in results.get("task_deltas") or [] if d["model"] == model]
    if tasks:
        headline["tasks"] = tasks
    if train_meta is not None and train_meta.is_file():
        budget = json.loads(train_meta.read_text(encoding="utf-8")).get("forgetting_budget")
        if budget:
            headline["forgetting_budget"] = budget
    return headline


def headline_line(role: str, h: dict[str, Any]) -> str:
    """One role's line, e.g. `domain perplexity (python_docs): 14.73 -> 11.68 (-20.7% [-23.1%, -18.0%]:
    learned)`."""
    change = perplexity_change(h["before"], h["after"])
    interval = h.get("interval")
    reading = verdict(role, change, HEADLINE_WORDING, interval)
    within = f" {interval_text(interval)}" if interval else ""
    return (
        f"[bold]{role} perplexity[/bold] ({h['set']}): {h['before']:.2f} -> {h['after']:.2f} "
        f"({change:+.1f}%{within}: {reading})"
    )


def chat_line(h: dict[str, Any]) -> str:
    """The chat probe's line, e.g. `chat behaviour (answer loss on 52 held-out instructions): 1.201 ->
    1.128 (-6.1%)`: a rise is chat behaviour lost."""
    change = f" ({h['change']:+.1f}%)" if h.get("change") is not None else ""
    return (
        f"[bold]chat behaviour[/bold] (answer loss on {h['examples']} held-out instructions): "
        f"{h['before']:.3f} -> {h['after']:.3f}{change}"
    )


def task_line(d: dict[str, Any]) -> str:
    """One downstream task's line (a `task_deltas` row), e.g. `task arc_easy acc: 0.4410 -> 0.4520
    (+0.0110 [-0.0180, +0.0400]: within noise)`."""
    interval = f" [{d['low']:+.4f}, {d['high']:+.4f}]" if d.get("low") is not None else ""
    return (
        f"[bold]task {d['task']}[/bold] {d['metric']}: {d['before']:.4f} -> {d['after']:.4f} "
        f"({d['delta']:+.4f}{interval}: {d['reading']})"
    )


def print_headline(console: Any, headline: dict[str, Any], run_dir: Path) -> None:
    """Where the report is, the domain and general lines, the chat probe's and each task's (when eval
    measured them), the forgetting budget's (when one was set), and the total time."""
    console.print(f"\nreport: {run_dir / 'report' / 'report.md'}")
    for role in ("domain", "general"):
        if role in headline:
            console.print(headline_line(role, headline[role]))
    if headline.get("chat"):
        console.print(chat_line(headline["chat"]))
    for d in headline.get("tasks") or []:
        console.print(task_line(d))
    if headline.get("forgetting_budget"):
        console.print(f"[bold]training[/bold] {budget_text(headline['forgetting_budget'])}")
    console.print(f"total time: {headline['seconds']:.0f} s")

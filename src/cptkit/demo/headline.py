"""The demo's headline: perplexity before -> after on the domain and the general held-out sets, read from
eval's results.json, with each change's bootstrap interval; whether training stayed within its forgetting
budget (run_meta.json), when one was set; and the lines the demo ends with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cptkit.eval.results import HEADLINE_WORDING, interval_text, perplexity_change, verdict
from cptkit.train.budget import budget_text


def read_headline(
    results_path: Path, model: str = "merged", train_meta: Path | None = None
) -> dict[str, Any]:
    """Perplexity before -> after (and the change's interval) on the domain and the general held-out
    sets; the forgetting budget's record from the training run's `train_meta` when it has one."""
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


def print_headline(console: Any, headline: dict[str, Any], run_dir: Path) -> None:
    """Where the report is, the domain and general lines, and the total time."""
    console.print(f"\nreport: {run_dir / 'report' / 'report.md'}")
    for role in ("domain", "general"):
        if role in headline:
            console.print(headline_line(role, headline[role]))
    if headline.get("forgetting_budget"):
        console.print(f"[bold]training[/bold] {budget_text(headline['forgetting_budget'])}")
    console.print(f"total time: {headline['seconds']:.0f} s")

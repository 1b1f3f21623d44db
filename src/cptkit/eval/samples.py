"""Sample generations: a few greedy continuations of domain and general prompts from every evaluated
model, side by side in the report, so what the numbers measure can be read.

Both kinds are raw continuations (no chat template, even for an instruction-tuned base): continued
pretraining changes how a model continues text, and that is what these show; the chat probe
(`eval.chat_probe`) measures chat behaviour. Domain prompts default to the first words of the first
held-out domain documents, general prompts to cptkit's shipped neutral prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cptkit.config.evaluate import EvalModel, SamplesConfig
from cptkit.eval.each_model import each_model
from cptkit.eval.sets import EvalSet
from cptkit.generate import Sampling, generate_with_model

PROMPT_WORDS = 12  # of a held-out document, as its domain prompt
SHOWN_CHARACTERS = 300  # of each continuation in the report


def sample_prompts(cfg: SamplesConfig, sets: Sequence[EvalSet]) -> list[tuple[str, str]]:
    """(role, prompt) pairs: `cfg.count` of each kind, the configured ones first."""
    from cptkit.data.self_replay import read_prompts

    domain = list(cfg.domain_prompts)
    for s in (s for s in sets if s.role == "domain"):
        domain += [" ".join(t.split()[:PROMPT_WORDS]) for t in s.texts if t.strip()]
        break  # the first domain set's documents
    general = list(cfg.general_prompts) or read_prompts(None)
    return [("domain", p) for p in domain[: cfg.count]] + [("general", p) for p in general[: cfg.count]]


def generate_samples(
    cfg: SamplesConfig,
    models: Sequence[EvalModel],
    sets: Sequence[EvalSet],
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]] | None:
    """results.json's `samples`: [{model, role, prompt, text}], every prompt of a model in one batch;
    None when `eval.samples.count` is 0."""
    prompts = sample_prompts(cfg, sets) if cfg.count else []
    if not prompts:
        return None
    greedy = Sampling(cfg.max_new_tokens)
    out = []
    for spec, model, tokenizer in each_model(models, device, dtype, trust_remote_code):
        texts = generate_with_model(model, tokenizer, [p for _, p in prompts], greedy, len(prompts))
        out += [
            {"model": spec.name, "role": role, "prompt": prompt, "text": g.text}
            for (role, prompt), g in zip(prompts, texts, strict=True)
        ]
    return out


def _cell(text: str) -> str:
    """A continuation on one table line: whitespace runs as one space, cut at a word near the limit."""
    flat = " ".join(text.split()).replace("|", "\\|")
    if len(flat) <= SHOWN_CHARACTERS:
        return flat
    return flat[:SHOWN_CHARACTERS].rsplit(" ", 1)[0] + " ..."


def markdown_lines(samples: list[dict[str, Any]]) -> list[str]:
    """Each prompt, then each model's continuation of it."""
    prompts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for s in samples:
        prompts.setdefault((s["role"], s["prompt"]), []).append(s)
    out = []
    for (role, prompt), rows in prompts.items():
        shown = _cell(prompt).replace("`", "'")  # a code span: the prompt's own markup stays as written
        out += [f"{role} prompt: `{shown}`", "", "| model | continuation |", "|---|---|"]
        out += [f"| {r['model']} | {_cell(r['text'])} |" for r in rows] + [""]
    return out

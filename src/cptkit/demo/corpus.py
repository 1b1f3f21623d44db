"""The demo's two corpora, both available offline on any machine.

- domain: Python's language reference (`pydoc_data.topics`, shipped with every Python), one file
  per topic;
- general: text the base model writes itself from neutral prompts before any training (seeded
  sampling, cached). Held-out perplexity on it measures drift from the model's own distribution,
  which is what forgetting looks like from the inside.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROMPTS = [
    "The history of the old harbour town begins",
    "Every morning, the fisherman",
    "The best way to cook rice is",
    "Scientists studying the deep ocean found",
    "When the train finally arrived at the station,",
    "The museum's new exhibition shows",
    "In a small village near the mountains,",
    "A good night's sleep matters because",
    "The football match last weekend",
    "My grandmother always said that",
    "The weather this spring has been",
    "Learning a new language as an adult",
    "The river that runs through the valley",
    "During the summer holidays, our family",
    "The doctor explained to her patient that",
    "The price of bread in the market",
    "Many birds fly south in autumn because",
    "The library in our town opened",
    "Planting a vegetable garden starts with",
    "The concert began with a quiet",
    "Our neighbour's dog",
    "The first thing visitors notice about the city is",
    "A healthy breakfast can include",
    "The mayor announced on Tuesday that",
]


def write_python_docs(folder: Path) -> int:
    """One .txt per topic of the language reference; returns the number of files."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(topics):
        path = folder / f"{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}.txt"
        if not path.is_file():
            path.write_text(topics[name].strip() + "\n", encoding="utf-8")
    return len(topics)


def _settings(model_dir: Path, samples: int, max_new_tokens: int, seed: int) -> dict[str, Any]:
    weights = model_dir / "model.safetensors"
    size = weights.stat().st_size if weights.is_file() else None
    return {
        "model": str(model_dir),
        "weights_bytes": size,
        "samples": samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }


def generate_general_text(
    model_dir: Path, folder: Path, samples: int, max_new_tokens: int, seed: int = 1234, batch_size: int = 64
) -> int:
    """`samples` continuations of the neutral prompts by the base model, one file each (cached).

    On a CPU, decoding reads every weight once per step whatever the batch, so one large batch is
    several times faster than a few small ones."""
    settings = _settings(model_dir, samples, max_new_tokens, seed)
    stamp = folder.parent / f"{folder.name}.settings.json"  # beside the corpus, not read as part of it
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return samples
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    torch.manual_seed(seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(samples)]
    texts = []
    log.info(
        "the base model writes %d general texts of up to %d tokens (cached after)", samples, max_new_tokens
    )
    for start in range(0, samples, batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=0.8,
                top_p=0.95,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.txt"):
        old.unlink()
    for i, text in enumerate(texts):
        (folder / f"sample_{i:04}.txt").write_text(text.strip() + "\n", encoding="utf-8")
    stamp.write_text(json.dumps(settings))
    return samples

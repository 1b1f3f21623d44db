"""The round-trip check: load the .gguf back with transformers' GGUF loader (model and tokenizer), run it
and the HF model on the same held-out text, and compare the logits and the token ids.

Tolerances are on the largest absolute logit difference relative to the largest absolute HF logit, so that
one bar fits a random tiny model (logits ~0.1) and a trained one (logits ~30). Measured on the tiny test
models (llama tied and untied, mistral, qwen2; hidden 64; 256 tokens): f16 <= 0.0011, bf16 <= 0.0090,
q8_0 <= 0.036 (llama.cpp itself: 0.0015, 0.0112, 0.040); the bars below leave 2-9x headroom. Top-1
agreement is reported beside them: f16 >= 99.6%, bf16 >= 98.0%, q8_0 >= 94.1% there (q8_0 flips near-ties
of a random model; a trained model's margins are wider)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RELATIVE_TOLERANCE = {"f16": 0.01, "bf16": 0.03, "q8_0": 0.08}

ENGLISH_PASSAGE = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers "
    "moved their animals to the hill above the village, where the old church stood. Nobody could remember "
    "a flood like it: the records in the parish book went back two hundred years, and none of them spoke "
    "of water reaching the mill. By noon the rain had stopped, and children gathered on the bridge to watch "
    "branches and barrels drift past. In the evening the mayor read a short notice: the school would stay "
    "closed for a week, the bakery would share its bread, and anyone whose house was damaged should come to "
    "the town hall, where volunteers would help them find a dry place to sleep. "
)


def heldout_text(dataset: str | Path | None, tokenizer, max_tokens: int) -> tuple[str, str]:
    """Text to compare on: the prepared dataset's held-out documents (decoded) when there is one, else a
    built-in English passage; and where it came from."""
    if dataset is not None and Path(dataset).exists():
        from cptkit.data.prepared import Prepared
        from cptkit.merge.compare import heldout_token_docs

        docs = heldout_token_docs(Prepared.load(dataset), documents_per_set=8, max_tokens=max_tokens)
        text = "\n\n".join(tokenizer.decode(d, skip_special_tokens=True) for d in docs)
        if text.strip():
            return text, f"held-out documents of {dataset}"
        log.warning("export verify: %s has no held-out documents; using the built-in passage", dataset)
    return ENGLISH_PASSAGE * 40, "built-in English passage"


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    diff = (other.float() - reference.float()).abs()
    scale = reference.float().abs().max().item() or 1.0
    return {
        "max_abs_logit_diff": diff.max().item(),
        "mean_abs_logit_diff": diff.mean().item(),
        "relative_max_diff": diff.max().item() / scale,
        "top1_agreement": (other.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def gguf_config(folder: Path, gguf_path: Path):
    """The config transformers' GGUF loader reads from the file, and what the check says of rope scaling.

    That loader reads no rope scaling for llama, mistral or qwen2 (neither `rope.scaling.*` nor the
    `rope_freqs` tensor of llama3 scaling), so a scaled model would load with plain rope and differ at every
    position past the scaled wavelengths. The source's scaling is put back (the theta stays the file's):
    the round trip then checks the tensors, and llama.cpp's check is the one that reads the file's scaling."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    source = AutoConfig.from_pretrained(folder)
    source_rope = dict(
        getattr(source, "rope_parameters", None) or getattr(source, "rope_scaling", None) or {}
    )
    kind = source_rope.get("rope_type") or source_rope.get("type") or "default"
    if kind == "default":
        return config, None
    rope = dict(getattr(config, "rope_parameters", None) or {})
    source_rope["rope_theta"] = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = source_rope
    else:  # transformers before rope_parameters
        config.rope_scaling = source_rope
    return config, (
        f"{kind} scaling taken from the source config (transformers' GGUF loader reads none); "
        "the llama.cpp check reads the file's"
    )


def verify_gguf(
    folder: Path, gguf_path: Path, type_name: str, dataset: str | Path | None, max_tokens: int
) -> tuple[dict[str, Any], str, list[int], torch.Tensor]:
    """Compare the GGUF file with the HF model in `folder` on the first `max_tokens` tokens of held-out
    text; returns the verify entry of export_report.json, and the text, its token ids and the HF logits
    (for llama.cpp's check)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    text, origin = heldout_text(dataset, hf_tok, max_tokens)
    ids = hf_tok(text).input_ids[:max_tokens]
    gguf_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_ids = gguf_tok(text).input_ids[:max_tokens]
    same_ids = gguf_ids == ids
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, gguf_ids, strict=False)) if a != b), None)
    reference = hf_logits(folder, ids)
    config, rope_note = gguf_config(folder, gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, config=config, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    del model
    stats = compare_logits(reference, logits)
    tolerance = RELATIVE_TOLERANCE[type_name]
    entry = {
        "tokens": len(ids),
        "text": origin,
        **stats,
        "tolerance": tolerance,
        "tolerance_kind": "max abs logit diff / max abs HF logit",
        "tokenizer_ids_equal": same_ids,
        "tokenizer_first_difference": first_diff,
        "rope_scaling": rope_note,
        "passed": same_ids and stats["relative_max_diff"] <= tolerance,
    }
    return entry, text, ids, reference

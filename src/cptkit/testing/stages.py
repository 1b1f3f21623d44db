"""Stage outputs for tests and benchmarks of the later stages: a prepared folder with given held-out sets
(made by the real prepare on a tiny corpus), a LoRA adapter with non-zero weights (and trained module
copies), and a train folder's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cptkit.paths import METRICS, RUN_META

TRAINING_SOURCE = "training"


def write_prepared(
    folder: str | Path, sets: dict[str, tuple[str, list[str]]], tokenizer, seq_length: int = 128
) -> Path:
    """A folder made by the real `cptkit prepare`, whose held-out sets are exactly `sets` (a source name ->
    (role, documents)): each is a held-out-only source (weight 0) of its documents in order, normalised
    as prepare normalises them, none filtered or deduplicated. One more source, `training`, made of the
    same documents, gives the training rows; it holds nothing out (an empty held-out set, which
    `Prepared.heldout` leaves out). The inputs and the tokenizer (saved from the in-memory `tokenizer`) go to `<folder>-inputs/`."""
    from cptkit.config.data import DataConfig, FilterConfig, SourceConfig
    from cptkit.data.prepare import prepare

    folder = Path(folder)
    inputs = folder.parent / f"{folder.name}-inputs"
    tokenizer.save_pretrained(str(inputs / "tokenizer"))
    sources = [
        SourceConfig(name=name, path=str(_jsonl(inputs / f"{name}.jsonl", texts)), weight=0, role=role)
        for name, (role, texts) in sets.items()
    ]
    every = [t for _, texts in sets.values() for t in texts]
    sources.append(
        SourceConfig(
            name=TRAINING_SOURCE, path=str(_jsonl(inputs / "training.jsonl", every)), heldout_fraction=0
        )
    )
    data = DataConfig(
        tokenizer=str(inputs / "tokenizer"),
        sources=sources,
        seq_length=seq_length,
        heldout_max_documents=None,
        dedup="none",
        filters=FilterConfig(min_chars=1, min_words=1, max_non_text_fraction=1.0),
        num_proc=1,
    )
    prepare(data, folder)
    return folder


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def make_lora_adapter(
    base_dir: str | Path,
    folder: str | Path,
    r: int = 4,
    alpha: float = 8,
    target_modules: Any = "all-linear",
    seed: int = 0,
    scale: float = 0.05,
    mode: str = "lora",
    **lora_kwargs: Any,
) -> Path:
    """A peft LoRA adapter on `base_dir` with random (non-zero) lora_B, so the merge changes the model.
    `mode` goes into run_meta.json like a train folder's (qlora makes merge compare NF4 bases)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, **lora_kwargs)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(folder))
    meta = {"mode": mode, "base_model": str(base_dir)}
    if mode == "qlora":
        meta["quantization"] = {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16",
        }
    (folder / RUN_META).write_text(json.dumps(meta))
    return folder


def train_module_copies(adapter_dir: str | Path, scale: float = 0.05, seed: int = 1) -> Path:
    """Move an adapter's full module copies (modules_to_save, saved equal to the base's weights) away from
    the base by random noise, as training would; returns the folder."""
    import torch
    from safetensors.torch import load_file, save_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    saved = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    # peft saves a module copy under the module's own name (lm_head.weight); LoRA factors and saved base
    # embeddings (base_layer) are not copies
    for key in [k for k in saved if ".lora_" not in k and not k.endswith(".base_layer.weight")]:
        saved[key] = saved[key] + scale * torch.randn(saved[key].shape, generator=gen)
    save_file(saved, path, metadata={"format": "pt"})
    return Path(adapter_dir)


def write_metrics(folder: str | Path, steps: int = 20, sets: dict[str, str] | None = None) -> Path:
    """metrics.jsonl (train lines every step, eval lines every 5) and run_meta.json as `cptkit train` writes."""
    import math

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = sets or {"domain": "domain", "general": "general"}
    lines = []
    for step in range(1, steps + 1):
        lines.append(
            {
                "type": "train",
                "step": step,
                "loss": 3.0 * math.exp(-step / 10) + 1,
                "learning_rate": 1e-4 * min(1.0, step / 5),
                "grad_norm": 1.0,
                "tokens_per_second": 1000.0 + step,
                "mfu": 0.3,
                "peak_memory_gb": 10.0,
                "trained_tokens": 512 * step,
            }
        )
        if step % 5 == 0:
            for name, role in sets.items():
                loss = 2.0 - 0.02 * step if role == "domain" else 1.5 + 0.005 * step
                lines.append(
                    {
                        "type": "eval",
                        "step": step,
                        "set": name,
                        "role": role,
                        "loss": loss,
                        "perplexity": math.exp(loss),
                        "tokens": 1000,
                    }
                )
    (folder / METRICS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / RUN_META).write_text(
        json.dumps(
            {
                "mode": "lora",
                "attention": "sdpa",
                "hardware": {"gpu": "test"},
                "final": {"train_loss": lines[-1].get("loss")},
            }
        )
    )
    return folder

"""Stage outputs made directly, for tests and benchmarks of the later stages: a prepared folder with
held-out sets, a LoRA adapter with non-zero weights, and a train folder's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cptkit.paths import METRICS, RUN_META


def write_prepared(
    folder: str | Path, sets: dict[str, tuple[str, list[str]]], tokenizer, seq_length: int = 128
) -> Path:
    """A folder shaped like `cptkit prepare`'s output: heldout/<source>/ (text, input_ids, num_bytes) and
    manifest.json (status complete). `sets` maps a source name to (role, documents)."""
    import datasets

    from cptkit.data.manifest import tokenizer_fingerprint

    folder = Path(folder)
    heldout, sources = {}, {}
    for name, (role, texts) in sets.items():
        ids = [list(tokenizer(t)["input_ids"]) + [tokenizer.eos_token_id] for t in texts]
        nbytes = [len(t.encode("utf-8")) for t in texts]
        datasets.Dataset.from_dict({"text": texts, "input_ids": ids, "num_bytes": nbytes}).save_to_disk(
            str(folder / "heldout" / name)
        )
        heldout[name] = {
            "dir": f"heldout/{name}",
            "role": role,
            "documents": len(texts),
            "tokens": sum(map(len, ids)),
            "bytes": sum(nbytes),
        }
        sources[name] = {
            "role": role,
            "weight": 1.0,
            "documents": len(texts) * 10,
            "characters": 10 * sum(map(len, texts)),
            "tokens": 10 * heldout[name]["tokens"],
            "drops": {"too_short": 1},
            "duplicates": 0,
            "heldout_documents": len(texts),
            "heldout_tokens": heldout[name]["tokens"],
            "train_tokens": 9 * heldout[name]["tokens"],
            "mixed_tokens": 9 * heldout[name]["tokens"],
            "sampling_factor": 1.0,
        }
    manifest = {
        "status": "complete",
        "format_version": 1,
        "seq_length": seq_length,
        "chunking": "packing",
        "train_dir": "train",
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "heldout": heldout,
        "sources": sources,
        "totals": {
            "rows": 10,
            "trained_tokens": sum(s["mixed_tokens"] for s in sources.values()),
            "padding_tokens": 0,
            "packing_efficiency": 0.97,
        },
        "inputs": [],
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    (folder / "train").mkdir(exist_ok=True)  # the rows' folder, for callers that write rows into it
    return folder


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

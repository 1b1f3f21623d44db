"""The `merge` and `eval` sections: a merged model, and the measurements of gain and forgetting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cptkit.config.fields import opt


@dataclass
class MergeConfig:
    """`cptkit merge`: base + LoRA adapter -> full model loadable by plain transformers."""

    adapter: str | None = opt(None, "adapter folder (default: train.output_dir)")
    base: str | None = opt(None, "base model (default: model.name_or_path)")
    output_dir: str | None = opt(None, "where the merged model goes (default: RUN_DIR/merged)")
    dtype: Literal["bfloat16", "float16", "float32"] = opt("bfloat16", "dtype of the written weights")
    qlora_base: Literal["auto", "bf16", "dequantized"] = opt(
        "auto",
        "QLoRA adapters: merge into the original base (bf16) or the NF4-dequantised base; auto: the one closer to the adapter",
    )
    max_shard_size: str = opt("5GB", "safetensors shard size")


@dataclass
class EvalModel:
    """One model to evaluate."""

    name: str = opt(help="label in the report, e.g. base, adapted, merged")
    path: str = opt(help="model folder or hub name")
    adapter: str | None = opt(None, "LoRA adapter folder to apply on top of path")


@dataclass
class EvalText:
    """An extra evaluation set: a text file or folder, read like a data source."""

    name: str = opt(help="set name")
    path: str = opt(help="text file or folder")
    role: Literal["domain", "general"] = opt("domain", "domain or general")
    text_field: str = opt("text", "field holding the text")


@dataclass
class EvalConfig:
    """`cptkit eval`: loss, perplexity and bits-per-byte of models on held-out sets."""

    models: list[EvalModel] = opt(
        factory=list, help="models to compare (default: base, the trained adapter or model, and the merged model if present)"
    )
    dataset: str | None = opt(None, "prepared dataset folder whose held-out sets are evaluated (default: data.output_dir)")
    extra_texts: list[EvalText] = opt(factory=list, help="more evaluation sets")
    output_dir: str | None = opt(None, "where results go (default: RUN_DIR/eval)")
    seq_length: int | None = opt(None, "tokens per evaluation row (default: data.seq_length)")
    batch_size: int = opt(8, "rows per forward")
    max_documents: int | None = opt(None, "evaluate at most this many documents per set")

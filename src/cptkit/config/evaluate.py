"""The `merge` and `eval` sections: a merged model, and the measurements of gain and forgetting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cptkit.config.fields import at_least, opt


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
    mode: Literal["auto", "lora", "qlora"] = opt(
        "auto", "how the adapter was trained; auto: from the train folder's run_meta.json / config.yaml"
    )
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "where B @ A and the NF4 round trip are computed")
    dataset: str | None = opt(
        None,
        "QLoRA: prepared dataset whose held-out documents compare the merges (default: train.dataset or data.output_dir)",
    )
    compare_documents: int = opt(4, "QLoRA: held-out documents per set used to compare the merges")
    compare_tokens: int = opt(4096, "QLoRA: tokens in all compared documents together")

    def check(self, path: str):
        return at_least(self, path, compare_documents=1, compare_tokens=2)


@dataclass
class EvalModel:
    """One model to evaluate."""

    name: str = opt(help="label in the report, e.g. base, adapted, merged")
    path: str = opt(help="model folder or hub name")
    adapter: str | None = opt(None, "LoRA adapter folder to apply on top of path")
    nf4_base: bool | None = opt(
        None,
        "apply the adapter on the NF4 round trip of path, as QLoRA trained it (default: when the adapter's run was qlora)",
    )


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
        factory=list,
        help="models to compare (default: base, the trained adapter or model, and the merged model if present)",
    )
    dataset: str | None = opt(
        None, "prepared dataset folder whose held-out sets are evaluated (default: data.output_dir)"
    )
    extra_texts: list[EvalText] = opt(factory=list, help="more evaluation sets")
    output_dir: str | None = opt(None, "where results go (default: RUN_DIR/eval)")
    seq_length: int | None = opt(None, "tokens per evaluation row (default: data.seq_length)")
    batch_size: int = opt(8, "rows per forward")
    max_documents: int | None = opt(None, "evaluate at most this many documents per set")
    device: Literal["auto", "cpu", "cuda"] = opt(
        "auto", "auto: the GPU if there is one (bfloat16), else the CPU (float32)"
    )

    def check(self, path: str):
        return at_least(self, path, batch_size=1, seq_length=2, max_documents=1)

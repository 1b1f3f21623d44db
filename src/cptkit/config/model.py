"""The `model` section: which base model, and how to load it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cptkit.config.fields import opt


@dataclass
class ModelConfig:
    """The base model every stage starts from."""

    name_or_path: str = opt(help="HF model: a local folder or a hub name")
    gguf_file: str | None = opt(
        None, "a .gguf file inside name_or_path to load through transformers' GGUF support"
    )
    trust_remote_code: bool = opt(False, "allow models with custom code")
    attention: Literal["auto", "varlen", "flex", "sdpa", "eager", "flash_attention_2"] = opt(
        "auto",
        "attention kernel; every choice keeps attention inside each packed document. auto: the fastest available",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = opt(
        "auto", "compute dtype. auto: bfloat16 on a GPU that supports it, float32 on CPU"
    )

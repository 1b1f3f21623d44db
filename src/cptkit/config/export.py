"""The `export` section: the final model out to the runtimes users deploy on (GGUF for llama.cpp)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cptkit.config.fields import opt

GGUF_TYPES = ("f16", "bf16", "q8_0")


@dataclass
class ExportConfig:
    """`cptkit export`: a full model (or an adapter, merged on the way) -> one GGUF file with the tokenizer
    (vocabulary, merges, special tokens, chat template) in its metadata, checked by loading it back."""

    to: Literal["gguf"] = opt("gguf", "the format: gguf (llama.cpp, ollama, LM Studio)")
    type: Literal["f16", "bf16", "q8_0"] = opt(
        "f16", "tensor type of the weight matrices: f16, bf16 or q8_0 (norms and biases stay f32)"
    )
    model: str | None = opt(
        None,
        "model folder to export (default: the last stage's model: grpo, else sft, else merged, else the "
        "fully trained CPT model); an adapter folder is merged into its base first",
    )
    output_dir: str | None = opt(None, "where the .gguf file goes (default: RUN_DIR/export)")
    verify: bool = opt(True, "load the file back with transformers' GGUF loader and compare logits")
    verify_tokens: int = opt(2048, "tokens of held-out text the check compares logits on")

    def check(self, path: str):
        problems = []
        if self.verify_tokens < 16:
            problems.append((f"{path}.verify_tokens", f"{self.verify_tokens} is too small (at least 16)"))
        if self.model is not None and not Path(self.model).exists():
            problems.append(
                (f"{path}.model", f"{self.model} does not exist (expected a model or adapter folder)")
            )
        return problems

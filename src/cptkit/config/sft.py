"""The `sft` section: supervised fine-tuning of the (merged) CPT model, loss on responses only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cptkit.config.fields import opt
from cptkit.config.train import TrainConfig


@dataclass
class SftConfig(TrainConfig):
    """`cptkit sft`: instruction data -> instruction-tuned model. Training options as in `train`."""

    data: str | None = opt(None, "instruction data: .jsonl/.json with alpaca fields or chat `messages`")
    model: str | None = opt(None, "model to tune (default: merge.output_dir, the merged CPT model)")
    format: Literal["auto", "alpaca", "messages"] = opt("auto", "record format; auto detects it per file")
    template: Literal["auto", "chat", "seed"] = opt(
        "auto", "chat: the tokenizer's chat template; seed: ###System/###Question/###Answer; auto: chat if the tokenizer has one"
    )
    system_prompt: str = opt("You are a helpful assistant.", "system prompt for records without one")
    seq_length: int = opt(1024, "tokens per packed row")
    packing: bool = opt(True, "pack examples into rows (attention stays inside each example)")
    heldout_fraction: float = opt(0.02, "share of examples held out for evaluation")

"""The `sft` section: supervised fine-tuning of the (merged) CPT model, loss on responses only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cptkit.config.fields import opt
from cptkit.config.train import TrainingRun


@dataclass(kw_only=True)  # a required field after the inherited defaults
class SftConfig(TrainingRun):
    """`cptkit sft`: instruction data -> instruction-tuned model. Training options as in `train`
    (not its dataset or eval_max_tokens: SFT reads its own data and evaluates every held-out example)."""

    data: str = opt(help="instruction data: .jsonl/.json with alpaca fields or chat `messages`")
    model: str | None = opt(None, "model to tune (default: merge.output_dir, the merged CPT model)")
    format: Literal["auto", "alpaca", "messages"] = opt("auto", "record format; auto detects it per file")
    template: Literal["auto", "chat", "seed"] = opt(
        "auto",
        "chat: the tokenizer's chat template; seed: ###System/###Question/###Answer; auto: chat if the tokenizer has one",
    )
    system_prompt: str = opt("You are a helpful assistant.", "system prompt for records without one")
    seq_length: int = opt(1024, "tokens per packed row")
    packing: bool = opt(True, "pack examples into rows (attention stays inside each example)")
    heldout_fraction: float = opt(0.02, "share of examples held out for evaluation")

    def check(self, path: str):
        problems = list(super().check(path))
        if not Path(self.data).is_file():
            problems.append(
                (
                    f"{path}.data",
                    f"{self.data} does not exist (expected a .jsonl or .json file of "
                    "alpaca {instruction, input, output} or chat {messages} records)",
                )
            )
        if self.seq_length < 8:
            problems.append((f"{path}.seq_length", f"{self.seq_length} is too small (at least 8)"))
        if not 0 <= self.heldout_fraction < 1:
            problems.append((f"{path}.heldout_fraction", f"{self.heldout_fraction} must be in [0, 1)"))
        return problems

"""The `merge` and `eval` sections: a merged model, and the measurements of gain and forgetting."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cptkit.config.fields import at_least, opt

SCALE_MEANING = "(0: the base, 1: the adapted model)"


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
    scale: float = opt(
        1.0,
        "interpolation between base (0) and adapted (1): LoRA merges the update times scale; full writes "
        "base + scale * (trained - base)",
    )

    def check(self, path: str):
        problems = at_least(self, path, compare_documents=1, compare_tokens=2)
        if not 0 <= self.scale <= 1:
            problems.append((f"{path}.scale", f"{self.scale}: must be in [0, 1] {SCALE_MEANING}"))
        return problems


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
class EvalTask:
    """A downstream task run by lm-evaluation-harness on every evaluated model, offline."""

    name: str = opt(help="lm-eval task name (a task of lm-eval, or one defined by a YAML file in include)")
    include: str | None = opt(
        None,
        "folder (or YAML file, whose folder is read) of local task definitions; their relative data "
        "paths are read from the task file's folder",
    )
    num_fewshot: int | None = opt(None, "few-shot examples per question (default: the task's own, else 0)")
    limit: int | None = opt(None, "score at most this many examples")
    during_training: bool = opt(
        False, "also run at each held-out evaluation during training (keep it small with limit)"
    )

    def check(self, path: str):
        problems = at_least(self, path, num_fewshot=0, limit=1)
        if not self.name.strip():
            problems.append((f"{path}.name", "empty: name the lm-eval task to run"))
        if self.include is not None and not Path(self.include).expanduser().exists():
            problems.append(
                (
                    f"{path}.include",
                    f"{self.include} does not exist (expected a folder of lm-eval task YAML files, or one "
                    "such file; examples/tasks has examples)",
                )
            )
        return problems


@dataclass
class ChatProbeConfig:
    """Retention of chat behaviour for instruction-tuned bases: the chat-templated loss of the answers of
    held-out instruction data, before and after."""

    path: str | None = opt(
        None,
        "JSONL of instruction examples (as `cptkit sft` reads them; the shipped neutral set is "
        "presets/chat_probe.jsonl); needs tokenizers with a chat template; none: off",
    )
    max_examples: int = opt(200, "examples scored (the first ones of the file)")

    def check(self, path: str):
        problems = at_least(self, path, max_examples=1)
        if self.path is not None and not Path(self.path).is_file():
            problems.append(
                (f"{path}.path", f"{self.path} is not a file (expected a .jsonl of instruction examples)")
            )
        return problems


@dataclass
class SamplesConfig:
    """A few greedy generations from each evaluated model, for domain and general prompts, shown in the
    report. Raw continuations for both kinds (no chat template, even for an instruction-tuned model):
    what continued pretraining changes is how the model continues text."""

    domain_prompts: list[str] = opt(
        factory=list, help="prompts from the domain (none: the first words of held-out documents)"
    )
    general_prompts: list[str] = opt(factory=list, help="general prompts (none: a shipped neutral set)")
    count: int = opt(0, "prompts of each kind; 0: off")
    max_new_tokens: int = opt(64, "tokens per generation (greedy)")

    def check(self, path: str):
        return at_least(self, path, count=0, max_new_tokens=1)


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
    tasks: list[EvalTask] = opt(factory=list, help="downstream lm-eval tasks (pip install 'cptkit[eval]')")
    interpolate: list[float] = opt(
        factory=list,
        help="scales between base (0) and adapted (1) scored without writing a model, e.g. [0.25, 0.5, 0.75, 1.0]",
    )
    bootstrap: int = opt(
        1000,
        "bootstrap resamples over documents for the 95% interval of each change against the base "
        "(0: no intervals, and no verdict beyond the direction)",
    )
    chat_probe: ChatProbeConfig = opt(factory=ChatProbeConfig, help="chat-behaviour retention probe")
    samples: SamplesConfig = opt(factory=SamplesConfig, help="sample generations in the report")

    def check(self, path: str):
        problems = at_least(self, path, batch_size=1, seq_length=2, max_documents=1)
        if self.bootstrap != 0 and not 100 <= self.bootstrap <= 100_000:
            problems.append(
                (
                    f"{path}.bootstrap",
                    f"{self.bootstrap}: use 0 (off) or 100 to 100000 resamples (1000 is usual)",
                )
            )
        outside = [s for s in self.interpolate if not 0 <= s <= 1]
        if outside:
            shown = ", ".join(str(s) for s in outside)
            problems.append(
                (f"{path}.interpolate", f"{shown}: every scale must be in [0, 1] {SCALE_MEANING}")
            )
        repeated = sorted({s for s in self.interpolate if self.interpolate.count(s) > 1})
        if repeated:
            problems.append(
                (
                    f"{path}.interpolate",
                    f"{', '.join(map(str, repeated))} listed more than once: list each scale once",
                )
            )
        return problems

"""The `data` section: what `cptkit prepare` reads and how it chunks, splits and mixes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cptkit.config.fields import at_least, opt
from cptkit.data.chunk import CHUNKERS, describe_chunkers

READABLE = "a folder of .txt/.md/.rst/.jsonl/.json/.parquet/.csv (optionally .gz/.zst), one such file, or a saved HF dataset"


@dataclass
class SelfReplayConfig:
    """Documents the base model writes itself before training (for `type: self_replay`): general text in
    the model's own distribution when its pretraining data is not available. Cached by model, prompts
    and settings."""

    model: str | None = opt(None, "model that writes the text (default: model.name_or_path)")
    prompts: str | None = opt(None, "text file of prompts, one a line (default: a shipped neutral set)")
    documents: int = opt(512, "documents to write")
    max_tokens: int | None = opt(None, "stop once this many tokens are written (none: documents decide)")
    max_new_tokens: int = opt(256, "tokens per document")
    temperature: float = opt(0.8, "sampling temperature")
    top_p: float = opt(0.95, "nucleus sampling")
    batch_size: int = opt(64, "prompts generated at once")
    seed: int = opt(1234, "sampling seed")
    engine: Literal["auto", "transformers", "vllm"] = opt(
        "auto", "auto: vLLM when installed and on a GPU, else transformers' generate"
    )

    def check(self, path: str):
        problems = at_least(self, path, documents=1, max_tokens=1, max_new_tokens=1, batch_size=1)
        if not self.temperature >= 0:
            problems.append((f"{path}.temperature", f"{self.temperature} must be 0 (greedy) or more"))
        if not 0 < self.top_p <= 1:
            problems.append((f"{path}.top_p", f"{self.top_p} must be in (0, 1]"))
        if self.prompts is not None:
            file = Path(self.prompts)
            if not file.is_file():
                problems.append((f"{path}.prompts", f"{self.prompts} is not a file (one prompt a line)"))
            elif not file.read_text(encoding="utf-8", errors="replace").strip():
                problems.append(
                    (f"{path}.prompts", f"{self.prompts} holds no prompt; write one prompt a line")
                )
        return problems


@dataclass
class HubConfig:
    """A Hugging Face dataset by name (for `type: hub`), read in streaming mode as `datasets.load_dataset(path,
    name, split=split, revision=revision, streaming=True)` reads it: nothing is downloaded whole first."""

    path: str = opt(
        help="dataset name on the hub (e.g. stanfordnlp/imdb) or a local folder in the hub layout"
    )
    name: str | None = opt(None, "the dataset's configuration (load_dataset's name; none: its default)")
    split: str = opt("train", "split to read")
    revision: str | None = opt(None, "branch, tag or commit (none: the default branch)")
    data_files: str | list[str] | None = opt(None, "load_dataset's data_files (none: the dataset's own)")

    def check(self, path: str):
        if not self.path:
            return [
                (
                    f"{path}.path",
                    "name the dataset, e.g. stanfordnlp/imdb, or a local folder in the hub layout",
                )
            ]
        problems = []
        if self.revision is not None and Path(self.path).is_dir():
            problems.append(
                (
                    f"{path}.revision",
                    f"{self.path} is a local folder, which has no revisions: remove revision (the content "
                    "of its data files is what prepare keys on)",
                )
            )
        if "[" in self.split:
            problems.append(
                (
                    f"{path}.split",
                    f"{self.split!r}: a streamed split cannot be sliced; name the split and set the "
                    "source's max_documents or max_tokens to take its first documents",
                )
            )
        return problems


@dataclass
class SourceConfig:
    """One named input corpus."""

    name: str = opt(help="short name of the source, used in the manifest and the held-out set's folder")
    path: str | None = opt(None, f"{READABLE} (type files)")
    type: Literal["files", "self_replay", "hub"] = opt(
        "files",
        "files: read path; self_replay: the base model writes the documents (see self_replay); hub: a "
        "Hugging Face dataset by name, streamed (see hub)",
    )
    hub: HubConfig | None = opt(None, "type hub: the dataset, configuration, split and revision")
    self_replay: SelfReplayConfig = opt(
        factory=SelfReplayConfig, help="type self_replay: how the text is written"
    )
    weight: float = opt(
        1.0,
        "share of trained tokens this source should have (weights are normalised); 0: held-out only "
        "(all its documents, up to data.heldout_max_documents, become its held-out set)",
    )
    role: Literal["domain", "general"] = opt(
        "domain",
        "domain: what the model should learn; general: what it should not forget (eval reports both)",
    )
    text_field: str = opt(
        "text", "field holding the text in .jsonl/.json/.parquet/.csv rows and saved datasets"
    )
    heldout_fraction: float | None = opt(None, "overrides data.heldout_fraction for this source")
    heldout_min_documents: int | None = opt(None, "overrides data.heldout_min_documents for this source")
    heldout_min_tokens: int | None = opt(None, "overrides data.heldout_min_tokens for this source")
    max_documents: int | None = opt(
        None, "take only the first this many documents (in reading order, after filters; none: all)"
    )
    max_tokens: int | None = opt(
        None,
        "take only the first documents whose tokens add up to at most this many (reading order, after "
        "filters, whole documents; none: all)",
    )

    def check(self, path: str):
        problems = at_least(self, path, max_documents=1, max_tokens=1)
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            problems.append((f"{path}.name", f"{self.name!r}: use letters, digits, '-' and '_' only"))
        if self.type == "self_replay" and self.path:
            problems.append(
                (
                    f"{path}.path",
                    "a self_replay source writes its own documents: remove path (or use type: files)",
                )
            )
        if self.type == "hub" and self.path:
            problems.append((f"{path}.path", "a hub source names its dataset in hub.path: remove path"))
        if self.type == "hub" and self.hub is None:
            problems.append((f"{path}.hub", "type hub needs hub: {path: <dataset name or local folder>}"))
        if self.type != "hub" and self.hub is not None:
            problems.append((f"{path}.type", "hub is set: use type: hub (or remove hub)"))
        if self.type == "files" and not self.path:
            problems.append((f"{path}.path", f"a source of type files needs a path ({READABLE})"))
        elif self.type == "files" and not Path(self.path).exists():
            problems.append((f"{path}.path", f"{self.path} does not exist (expected {READABLE})"))
        if self.weight < 0:
            problems.append(
                (f"{path}.weight", f"{self.weight} is negative; use 0 to keep a source for held-out only")
            )
        if self.heldout_fraction is not None and not 0 <= self.heldout_fraction < 1:
            problems.append((f"{path}.heldout_fraction", f"{self.heldout_fraction} must be in [0, 1)"))
        return problems + _floor_problems(self, path)


def _floor_problems(section, path: str) -> list[tuple[str, str]]:
    """A held-out floor is a count: 0 or more (none, for a source: the data-level value)."""
    return [
        (f"{path}.{key}", f"{value} is negative; use 0 for no floor")
        for key in ("heldout_min_documents", "heldout_min_tokens")
        if (value := getattr(section, key)) is not None and value < 0
    ]


@dataclass
class FilterConfig:
    """Document filters; every drop is counted by reason in the manifest."""

    min_chars: int = opt(20, "drop documents shorter than this many characters after normalisation")
    max_chars: int | None = opt(None, "drop documents longer than this many characters (none: keep all)")
    min_words: int = opt(3, "drop documents with fewer whitespace-separated words")
    max_non_text_fraction: float = opt(
        0.3,
        "drop documents whose share of characters that are neither letters, digits, punctuation nor space exceeds this",
    )

    def check(self, path: str):
        problems = at_least(self, path, min_chars=0, max_chars=1, min_words=0)
        if not 0 <= self.max_non_text_fraction <= 1:
            problems.append(
                (f"{path}.max_non_text_fraction", f"{self.max_non_text_fraction} must be in [0, 1]")
            )
        return problems


@dataclass
class ExecutorConfig:
    """What runs the per-shard tokenization tasks. `here` (the default) needs nothing: this process, on
    data.num_proc threads. `local`, `slurm` and `ray` run them through datatrove's executors (`pip install
    "cptkit[scale]"`; ray also needs `pip install ray`): processes on this machine, a Slurm job array, a
    Ray cluster. A shard done is never redone; the output is the same whoever made it."""

    type: Literal["here", "local", "slurm", "ray"] = opt(
        "here", "here: this process; local: worker processes; slurm: a job array; ray: a Ray cluster"
    )
    workers: int | None = opt(
        None,
        "tasks run at once (local: processes, default all cores; slurm: array tasks at once, default no cap)",
    )
    retries: int = opt(1, "times a failed shard is tried again before prepare stops and names it")
    local_tasks: int | None = opt(
        None,
        "local, one machine of several: how many of the tasks this machine runs (with local_rank_offset)",
    )
    local_rank_offset: int = opt(0, "local, one machine of several: the first task this machine runs")
    logging_dir: str | None = opt(
        None, "where the engine logs and marks tasks done (default: OUT/executor/<type>)"
    )
    options: dict[str, Any] = opt(
        factory=dict,
        help="passed to the datatrove executor as they are: slurm: partition, time, cpus_per_task, "
        "mem_per_cpu_gb, qos, sbatch_args, venv_path, ...; ray: cpus_per_task, mem_per_cpu_gb, ...",
    )

    def check(self, path: str):
        problems = at_least(self, path, workers=1, retries=0, local_tasks=1, local_rank_offset=0)
        if self.type != "local" and (self.local_tasks is not None or self.local_rank_offset):
            problems.append((f"{path}.local_tasks", "local_tasks and local_rank_offset are for type: local"))
        return problems


@dataclass
class VocabularyConfig:
    """Extend the base tokenizer for the domain (off unless `extend` > 0): the base tokenizer's BPE
    training is continued on the domain sources' text (its own normaliser, pre-tokenizer and merges),
    keeping the `extend` merges that save the most base tokens there, each at least `min_frequency`
    times; the new tokens get ids after every existing one (special tokens and original ids unchanged).
    The extended tokenizer is saved with the prepared dataset (`tokenizer/`, and `vocabulary.json`: each
    new token's base pieces, for train to initialise its rows from) and prepare tokenizes with it."""

    extend: int = opt(0, "new tokens to add (0: no extension)")
    min_frequency: int = opt(5, "a new token must replace its pieces at least this many times in the sample")
    sources: list[str] | None = opt(None, "the sources it learns from (default: every source of role domain)")
    sample_chars: int = opt(
        100_000_000, "characters read from those sources to learn from (their first documents, in order)"
    )

    def check(self, path: str):
        return at_least(self, path, extend=0, min_frequency=1, sample_chars=1000)


@dataclass
class DataConfig:
    """`cptkit prepare`: raw corpora -> tokenized, chunked, mixed, packed dataset + held-out sets."""

    tokenizer: str = opt(help="HF tokenizer: a local folder or a hub name")
    sources: list[SourceConfig] = opt(help="input corpora, each {name, path, weight, role, text_field}")
    output_dir: str | None = opt(None, "where the prepared dataset goes (default: RUN_DIR/data)")
    seq_length: int = opt(2048, "tokens per training row")
    # annotations are strings here, read when a config is loaded: every registered chunker is a choice
    chunking: Literal[tuple(CHUNKERS)] = opt(
        "packing", f"how documents are cut into training segments: {describe_chunkers()}"
    )
    chunk_chars: int = opt(512, "characters per chunk for chunking=chars (the seed's 512)")
    chunk_tokens: int | None = opt(
        None, "token budget per chunk for chunking=tokens/sentences (default: seq_length)"
    )
    heldout_fraction: float = opt(0.02, "share of each source's documents held out for evaluation")
    heldout_max_documents: int | None = opt(2000, "cap on held-out documents per source (none: no cap)")
    heldout_min_documents: int = opt(
        20,
        "floor: at least this many held-out documents per source, more than heldout_fraction gives where "
        "needed (never more than a fifth of a source that trains; capped by heldout_max_documents), so a "
        "before/after comparison carries a verdict; a floor not met is a warning and noted in the manifest",
    )
    heldout_min_tokens: int = opt(
        20_000,
        "floor: at least this many held-out tokens per source (documents added until reached), likewise",
    )
    mix: Literal["downsample", "upsample"] = opt(
        "downsample",
        "how weights are met: downsample keeps every token of the source that binds the ratio and drops whole "
        "segments of the others (nothing repeated); upsample keeps every token of every source and repeats "
        "whole segments of the others (nothing dropped)",
    )
    dedup: Literal["exact", "near", "none"] = opt(
        "exact",
        "exact: drop documents identical after normalisation (across all sources, first one kept); near: also "
        "drop documents whose word 5-grams overlap an earlier kept one's by near_dedup_threshold (MinHash LSH)",
    )
    near_dedup_threshold: float = opt(
        0.8, "Jaccard similarity of word 5-grams at which dedup: near drops a document"
    )
    filters: FilterConfig = opt(factory=FilterConfig, help="document filters")
    seed: int = opt(1234, "seed for the held-out split and the mix")
    num_proc: int | None = opt(None, "tokenizer threads (or processes) per task (default: all cores)")
    executor: ExecutorConfig = opt(
        factory=ExecutorConfig, help="what runs the tokenization tasks (see executor)"
    )
    pack_window: int = opt(
        1 << 20,
        "segments packed best-fit together; a corpus with more is shuffled, cut into windows of this many "
        "and packed window by window (memory stays bounded; see the manifest's packing_efficiency)",
    )
    vocabulary: VocabularyConfig = opt(
        factory=VocabularyConfig, help="extend the tokenizer with domain tokens (off by default)"
    )
    trust_remote_code: bool = opt(False, "allow tokenizers with custom code")
    prune_cache: bool = opt(
        False,
        "delete the store files (tokenized shards) of inputs, sources or settings this config no longer uses",
    )

    def check(self, path: str):
        problems = []
        if not self.sources:
            problems.append(
                (f"{path}.sources", "at least one source is needed, e.g. - {name: domain, path: corpus/}")
            )
        names = [s.name for s in self.sources]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append((f"{path}.sources", f"source name {dup!r} is used twice; names must be unique"))
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            problems.append(
                (f"{path}.sources", "all weights are 0: give at least one source a positive weight")
            )
        if self.seq_length < 8:
            problems.append((f"{path}.seq_length", f"{self.seq_length} is too small (at least 8)"))
        if not 0 <= self.heldout_fraction < 1:
            problems.append((f"{path}.heldout_fraction", f"{self.heldout_fraction} must be in [0, 1)"))
        problems += _floor_problems(self, path)
        if self.pack_window < 1024:
            problems.append((f"{path}.pack_window", f"{self.pack_window} is too small (at least 1024)"))
        if self.chunk_chars < 1:
            problems.append((f"{path}.chunk_chars", "must be positive"))
        if self.heldout_max_documents is not None and self.heldout_max_documents < 0:
            problems.append((f"{path}.heldout_max_documents", "must be 0 or more (none: no cap)"))
        if self.num_proc is not None and self.num_proc < 1:
            problems.append((f"{path}.num_proc", "must be at least 1 (none: all cores)"))
        if not 0 < self.near_dedup_threshold <= 1:
            problems.append(
                (f"{path}.near_dedup_threshold", f"{self.near_dedup_threshold} must be in (0, 1]")
            )
        if self.chunk_tokens is not None and not 1 <= self.chunk_tokens <= self.seq_length:
            problems.append((f"{path}.chunk_tokens", f"must be between 1 and seq_length ({self.seq_length})"))
        for i, name in enumerate(self.vocabulary.sources or []):
            if name not in names:
                problems.append(
                    (
                        f"{path}.vocabulary.sources[{i}]",
                        f"{name!r} is not a source (sources: {', '.join(names)})",
                    )
                )
        return problems

    def generator_problems(self, path: str, default_model: str | None):
        """A self_replay source needs a model to write its text: its own, or model.name_or_path."""
        return [
            (
                f"{path}.sources[{i}].self_replay.model",
                "not set, and no model.name_or_path to default to: name the model that writes the text",
            )
            for i, s in enumerate(self.sources)
            if s.type == "self_replay" and s.self_replay.model is None and not default_model
        ]

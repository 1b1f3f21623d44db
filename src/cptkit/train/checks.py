"""Everything `cptkit train` checks before it loads a model: each problem a clear message, all at once
where they do not depend on each other."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainingRun
from cptkit.data.manifest import tokenizer_fingerprint
from cptkit.data.prepared import Prepared
from cptkit.data.vocabulary_file import TOKENIZER_DIR, Vocabulary, read_vocabulary
from cptkit.errors import CptkitError
from cptkit.locks import is_main_process
from cptkit.model.kernels import check_kernels
from cptkit.paths import (
    CONFIG,
    EWC_FISHER,
    GRPO_PROMPTS,
    GRPO_SCORES,
    METRICS,
    REGULARIZE_DIR,
    RESULTS,
    RESULTS_MD,
    RUN_META,
    SFT_DATA,
)
from cptkit.train.budget import check_budget_sets
from cptkit.train.ewc import check_ewc
from cptkit.train.optional import check_optional_dependencies

log = logging.getLogger(__name__)


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def run_identity(
    train_cfg: TrainingRun, model_cfg: ModelConfig, data_hash: str, new_tokens: bool = False
) -> str:
    """What makes two runs the same run (and a checkpoint resumable): base, mode, adapter, data, and
    with added tokens (`new_tokens`) how their rows start and which rows train."""
    extra = {"new_tokens": asdict(train_cfg.new_tokens)} if new_tokens else {}
    key = {
        **extra,
        "base": model_cfg.name_or_path,
        "mode": train_cfg.mode,
        "data": data_hash,
        "lora": asdict(train_cfg.lora) if train_cfg.mode != "full" else None,
        "quantization": asdict(train_cfg.quantization) if train_cfg.mode == "qlora" else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def check_base_model(model_cfg: ModelConfig) -> None:
    path = model_cfg.name_or_path
    if Path(path).exists():
        if model_cfg.gguf_file is None and not (Path(path) / "config.json").is_file():
            raise CptkitError(
                f"model.name_or_path: {path} has no config.json; expected a Hugging Face model folder"
            )
        return
    if not _HUB_ID.match(path) or path.startswith((".", "/", "~")):
        raise CptkitError(
            f"model.name_or_path: {path} does not exist (expected a local model folder or a hub name like org/model)"
        )


def check_tokenizer(tokenizer: Any, prepared: Prepared) -> None:
    """The model's tokenizer must be the one the token store was made with (`Prepared.load` checked
    every store file against the index): the same ids must mean the same tokens."""
    made_with = prepared.store_fingerprint
    ours = tokenizer_fingerprint(tokenizer)
    if made_with != ours:
        name = prepared.tokenizer.get("name_or_path", "another tokenizer")
        raise CptkitError(
            f"{prepared.folder}: its token store was made with {name} (tokenizer fingerprint {made_with}), "
            f"but the model's tokenizer has fingerprint {ours}: the token ids would mean different things. "
            "Set data.tokenizer to the model and rerun `cptkit prepare`"
        )


def extended_tokenizer(base: Any, model_cfg: ModelConfig, prepared: Prepared, vocabulary: Vocabulary) -> Any:
    """The tokenizer a prepared folder with added tokens trains with (its `tokenizer/`), after checking
    that the model's own tokenizer (`base`) is the one it was extended from and that the model has a
    row for every base token (the new rows follow them)."""
    from transformers import AutoTokenizer

    from cptkit.model.load import load_model_config
    from cptkit.model.new_tokens import check_rows_cover_base

    ours = tokenizer_fingerprint(base)
    if ours != vocabulary.base_fingerprint:
        raise CptkitError(
            f"{prepared.folder}: its tokenizer was extended from {vocabulary.base_name} (fingerprint "
            f"{vocabulary.base_fingerprint}), but {model_cfg.name_or_path}'s tokenizer has fingerprint {ours}: "
            "the base ids would mean different things. Set data.tokenizer to the model and rerun `cptkit prepare`"
        )
    config = load_model_config(model_cfg)
    rows = getattr(config.get_text_config(), "vocab_size", None)
    if rows is not None:
        check_rows_cover_base(rows, len(base), f"model.name_or_path: {model_cfg.name_or_path}")
    folder = prepared.folder / TOKENIZER_DIR
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CptkitError(
            f"{folder}: cannot load the extended tokenizer ({e}); run `cptkit prepare --force`"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if len(tokenizer) != vocabulary.size:
        raise CptkitError(
            f"{folder}: {len(tokenizer)} tokens, but {prepared.folder / 'vocabulary.json'} says {vocabulary.size}; "
            "run `cptkit prepare --force`"
        )
    return tokenizer


def check_positions(model_cfg: ModelConfig, prepared: Prepared) -> None:
    from cptkit.model.load import load_model_config

    config = load_model_config(model_cfg)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    seq = prepared.seq_length
    if limit and seq > limit:
        raise CptkitError(
            f"data.seq_length: the dataset's rows hold {seq} tokens but {model_cfg.name_or_path} knows only {limit} "
            f"positions; prepare again with data.seq_length <= {limit}"
        )


def check_mode(train_cfg: TrainingRun, section: str = "train") -> None:
    """QLoRA's bitsandbytes loads here, and 8-bit needs a GPU; `section` names the config section."""
    if train_cfg.mode != "qlora":
        return
    try:
        import bitsandbytes  # noqa: F401
    except (ImportError, OSError, RuntimeError) as e:  # not installed, or its native library fails to load
        raise CptkitError(
            f"{section}.mode: qlora needs bitsandbytes ({e}); `pip install bitsandbytes`, or use mode lora"
        ) from None
    if train_cfg.quantization.bits == 8 and not torch.cuda.is_available():
        raise CptkitError(
            f"{section}.quantization.bits: 8-bit (LLM.int8) needs a CUDA GPU; use bits: 4 or mode lora"
        )


def check_output_dir(output_dir: Path, identity: str, train_cfg: TrainingRun, section: str = "train") -> bool:
    """An output folder may hold nothing, or this same run (to resume it), or, with
    `overwrite_output_dir`, anything else. Another cptkit run is then removed (`remove_run`), so nothing
    of it (a checkpoint to resume from, its metrics lines) mixes into this one; files that no cptkit run
    writes are left where they are (the folder may be a user's own) and written beside. Returns True when
    training must start from scratch because the folder held something else.

    Every rank reads the folder and reaches the same answer; only the first removes anything. (A rank
    that looks after the first one has emptied it finds nothing, or this run starting: no checkpoint.)"""
    try:
        if not output_dir.exists() or not any(output_dir.iterdir()):
            return False
        recorded = json.loads((output_dir / RUN_META).read_text()).get("identity")
    except FileNotFoundError:  # none there, or the first rank removing the other run as we look
        recorded = None
        if not output_dir.exists() or not any(output_dir.iterdir()):
            return False
    except ValueError:  # a run_meta.json half-written by a killed run: not this run's
        recorded = None
    if recorded == identity:
        return False
    if not train_cfg.overwrite_output_dir:
        if recorded is None:
            raise CptkitError(
                f"{section}.output_dir: {output_dir} already holds files that no cptkit train run wrote "
                f"({_listing(output_dir)}); choose another folder or set {section}.overwrite_output_dir: "
                "true (which trains beside them)"
            )
        raise CptkitError(
            f"{section}.output_dir: {output_dir} holds another run (other base model, mode, adapter or dataset); "
            f"choose another folder, or set {section}.overwrite_output_dir: true to delete it and train anew"
        )
    if recorded is None:
        log.warning("overwrite_output_dir: training into %s beside files no cptkit run wrote", output_dir)
    elif is_main_process():
        log.warning("overwrite_output_dir: removing the other run in %s", output_dir)
        remove_run(output_dir)
    return True


# what a training run (train or sft) writes into its folder: the Trainer's checkpoints and logs, the
# model or adapter and tokenizer as transformers and peft save them, cptkit's own records, and the
# evaluation of the SFT model (`sft/eval`) and EWC's Fisher (`regularize/`, see cptkit.paths)
RUN_OUTPUTS = (
    "checkpoint-*",
    "runs",
    "eval",
    REGULARIZE_DIR,
    RUN_META,
    METRICS,
    CONFIG,
    SFT_DATA,
    GRPO_PROMPTS,
    GRPO_SCORES,
    "grpo_before.json",
    "start",
    "*.safetensors",
    "*.safetensors.index.json",
    "training_args.bin",
    "pytorch_model*.bin",
    "adapter_config.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "README.md",
    "*.tmp",
)


def remove_run(output_dir: Path) -> None:
    """Remove what a cptkit training run wrote into `output_dir` (nothing unless it holds run_meta.json);
    any other file is left there, with a warning."""
    if not (output_dir / RUN_META).is_file():
        return
    kept = []
    for entry in sorted(output_dir.iterdir()):
        named = any(fnmatch.fnmatch(entry.name, pattern) for pattern in RUN_OUTPUTS)
        if not named or not _looks_written_by_a_run(entry):
            kept.append(entry.name)
        elif entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if kept:
        log.warning("%s: left %s there (not written by a cptkit run)", output_dir, ", ".join(kept))


def _looks_written_by_a_run(entry: Path) -> bool:
    """For the names a user might also give their own files: whether this one holds what a training run
    writes there (peft's model card, a model config, TensorBoard logs, the SFT model's evaluation, EWC's
    Fisher)."""
    try:
        if entry.name == "README.md":
            head = entry.read_text(encoding="utf-8", errors="replace")[:2000]
            return head.startswith("---") and ("library_name:" in head or "base_model:" in head)
        if entry.name == "config.json":
            return "model_type" in json.loads(entry.read_text(encoding="utf-8"))
        if entry.name == "runs":
            return entry.is_dir() and all("tfevents" in f.name for f in entry.rglob("*") if f.is_file())
        if entry.name == "eval":
            return entry.is_dir() and {f.name for f in entry.iterdir()} <= {RESULTS, RESULTS_MD, CONFIG}
        if entry.name == REGULARIZE_DIR:
            fisher = Path(EWC_FISHER).name
            return entry.is_dir() and {f.name for f in entry.iterdir()} <= {fisher, fisher + ".tmp"}
    except (OSError, ValueError):
        return False
    return True


def _listing(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class RunStart:
    """Where a training run starts: its identity, whether its folder is fresh, the checkpoint to resume."""

    identity: str
    fresh: bool
    resume_from: str | None


def check_training_run(
    run_cfg: TrainingRun, model_cfg: ModelConfig, data_hash: str, output_dir: Path, section: str
) -> RunStart:
    """The checks every training command (`sft`, `grpo`) makes before a model loads, in `section`'s
    words: optional dependencies, the mode, the kernels, and the output folder against this run's
    identity (`train`'s own `preflight` interleaves the same checks with those of its prepared data)."""
    check_optional_dependencies(run_cfg, model_cfg, section=section)
    check_mode(run_cfg, section=section)
    check_kernels(run_cfg, model_cfg, section=section)
    identity = run_identity(run_cfg, model_cfg, data_hash)
    fresh = check_output_dir(output_dir, identity, run_cfg, section=section)
    return RunStart(identity, fresh, None if fresh else resume_checkpoint(run_cfg, output_dir))


def preflight(
    train_cfg: TrainingRun, model_cfg: ModelConfig, dataset_dir: Path, output_dir: Path
) -> dict[str, Any]:
    """Run every check that needs no model weights. Returns the prepared dataset (`prepared`), its
    manifest and the manifest's hash, the run identity, the tokenizer (loaded once here, to be passed
    to the model loader: the prepared folder's extended one where data.vocabulary added tokens), the
    added tokens (`vocabulary`, or None) and the checkpoint to resume from."""
    from cptkit.model.load import load_tokenizer

    check_optional_dependencies(train_cfg, model_cfg)
    prepared = Prepared.load(dataset_dir)
    check_base_model(model_cfg)
    check_mode(train_cfg)
    check_kernels(train_cfg, model_cfg)
    try:
        tokenizer = load_tokenizer(model_cfg)
    except OSError as e:
        raise CptkitError(
            f"model.name_or_path: cannot load a tokenizer from {model_cfg.name_or_path}: {e}"
        ) from None
    vocabulary = read_vocabulary(prepared.folder)
    if vocabulary is not None:
        tokenizer = extended_tokenizer(tokenizer, model_cfg, prepared, vocabulary)
    check_tokenizer(tokenizer, prepared)
    check_positions(model_cfg, prepared)
    check_budget_sets(getattr(train_cfg, "forgetting_budget", None), prepared.heldout, prepared.folder)
    check_ewc(train_cfg, prepared)
    check_regularizers(train_cfg, model_cfg, prepared)
    identity = run_identity(train_cfg, model_cfg, prepared.manifest_hash, vocabulary is not None)
    fresh = check_output_dir(output_dir, identity, train_cfg)
    return {
        "prepared": prepared,
        "manifest": prepared.manifest,
        "manifest_hash": prepared.manifest_hash,
        "identity": identity,
        "tokenizer": tokenizer,
        "vocabulary": vocabulary,
        "resume_from": None if fresh else resume_checkpoint(train_cfg, output_dir),
    }


def check_regularizers(
    train_cfg: TrainingRun, model_cfg: ModelConfig, prepared: Prepared, gpu_memory: int | None = None
) -> None:
    """What `train.regularize` asks of the data, the mode and the GPU, before any model loads.

    kl_to_base on replay tokens needs a general source that trains and rows that record their source;
    it cannot run on sharded weights (FSDP, DeepSpeed ZeRO-3), nor on a lm_head that LoRA adapts; in
    full mode the frozen reference copy and the training must fit the GPU (`gpu_memory` in bytes,
    default: this process's GPU; no GPU, no check)."""
    from cptkit.model.load import _weights_sharded  # FSDP/ZeRO-3: each rank holds shards of the weights

    if getattr(train_cfg, "regularize", None) is None:
        return  # cptkit sft
    used = [n for n in ("kl_to_base", "l2_to_base", "ewc") if getattr(train_cfg.regularize, n).weight > 0]
    if (
        used and _weights_sharded()
    ):  # their base copies, Fisher and lm_head reads are per weight, not per shard
        raise CptkitError(
            f"train.regularize.{used[0]}: the weights are sharded (FSDP or DeepSpeed ZeRO-3), which "
            f"{' and '.join(used)} do not support; launch with DDP or DeepSpeed ZeRO-1/2, or set the weight to 0"
        )
    check_copies_fit(model_cfg, train_cfg, gpu_memory)
    kl = train_cfg.regularize.kl_to_base
    if kl.weight <= 0:
        return
    where = "train.regularize.kl_to_base"
    if kl.tokens == "replay":
        if not prepared.general_training_sources:
            raise CptkitError(
                f"{where}.tokens: replay, but {prepared.folder} has no general source that trains; add a general "
                "(replay) source with a weight to data.sources and prepare again, or set tokens: all"
            )
        if not prepared.has_source_ids:
            raise CptkitError(
                f"{where}.tokens: replay, but {prepared.folder} was prepared before rows recorded their source; "
                "run `cptkit prepare` again (or set tokens: all)"
            )
    targets = train_cfg.lora.target_modules
    if train_cfg.mode != "full" and "lm_head" in ([targets] if isinstance(targets, str) else targets):
        raise CptkitError(
            f"{where}: train.lora.target_modules adapts lm_head, which the divergence reads directly; "
            "leave lm_head out (train it with train.lora.train_embeddings) or set weight: 0"
        )


def check_copies_fit(model_cfg: ModelConfig, train_cfg: TrainingRun, gpu_memory: int | None = None) -> None:
    """The regularizers' copies must fit the GPU beside the training: refuse when they cannot fit
    `gpu_memory` bytes (default: this process's GPU; no GPU, no check). Counted from the model's config
    on the meta device, activations not included: in full mode kl_to_base's frozen reference, l2_to_base's
    and ewc's copies of the base (the model's dtype) and ewc's float32 Fisher, beside the training
    (weights, gradients and AdamW's two moments in the model's dtype); in lora/qlora mode ewc's float32
    Fisher of the adapted weights (about every linear weight), beside the base weights."""
    from cptkit.model.load import resolve_dtype

    if gpu_memory is None:
        if not torch.cuda.is_available():
            return
        gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    full = train_cfg.mode == "full"
    asked = {n for n in ("kl_to_base", "l2_to_base", "ewc") if getattr(train_cfg.regularize, n).weight > 0}
    if not asked or (not full and "ewc" not in asked):
        return
    params = count_parameters(model_cfg)
    width = resolve_dtype(model_cfg).itemsize
    copies = {}
    if full:
        copies = {n: params * width for n in ("kl_to_base", "l2_to_base", "ewc") if n in asked}
        if "ewc" in asked:
            copies["ewc"] += params * 4
        training = params * 4 * width
    else:
        copies["ewc"] = params * 4  # an upper bound: the Fisher covers the adapted linear weights
        training = params * (width if train_cfg.mode == "lora" else 1)
    if sum(copies.values()) + training > gpu_memory:
        gib = 2**30
        parts = ", ".join(f"{n} {size / gib:.1f} GiB" for n, size in copies.items())
        first = next(iter(copies))
        advice = (
            "use train.mode: lora (kl_to_base's base is the same network with the adapters off, no copy), "
            "fewer regularizers, or a smaller model"
            if full
            else "set train.regularize.ewc.weight: 0 (kl_to_base and l2_to_base need no copy in this mode), "
            "or a smaller model"
        )
        raise CptkitError(
            f"train.regularize.{first}: the regularizers' copies of {model_cfg.name_or_path} "
            f"({params / 1e9:.2f}B parameters: {parts}) and {training / gib:.1f} GiB of training need more than "
            f"the GPU's {gpu_memory / gib:.1f} GiB; {advice}"
        )


def count_parameters(model_cfg: ModelConfig) -> int:
    """The base model's parameter count, from its config on the meta device (no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from cptkit.model.load import load_model_config

    config = load_model_config(model_cfg)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def resume_checkpoint(train_cfg: TrainingRun, output_dir: Path) -> str | None:
    """The checkpoint to continue from: for `auto` the newest complete one (see
    `cptkit.train.checkpoints`; the newer ones that are not are logged with why), none for `never`, or
    the given path, which must be complete."""
    from cptkit.train.checkpoints import DIVERGED_MARKER, scan_checkpoints, why_incomplete

    if train_cfg.resume == "never":
        return None
    if train_cfg.resume == "auto":
        scan = scan_checkpoints(output_dir)
        for folder, reason in scan.skipped:
            log.warning("not resuming from %s: %s", folder, reason)
        return str(scan.newest) if scan.newest else None
    given = Path(train_cfg.resume)
    if not given.is_dir():
        raise CptkitError(
            f"train.resume: {train_cfg.resume} is not a checkpoint folder (use auto, never, or a path)"
        )
    reason = why_incomplete(given)
    if reason and not (given / DIVERGED_MARKER).exists():
        raise CptkitError(
            f"train.resume: {given} cannot be resumed: {reason}; give another checkpoint or auto"
        )
    if reason:
        log.warning("resuming from %s as train.resume says, although it was %s", given, reason)
    return train_cfg.resume

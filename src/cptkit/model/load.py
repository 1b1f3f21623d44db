"""Load the base model and tokenizer for training: full, LoRA or QLoRA, with the attention and loss
kernels that keep packed documents apart and 128k-vocabulary logits out of memory."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainConfig
from cptkit.data.vocabulary_file import Vocabulary
from cptkit.errors import CptkitError, load_refusals
from cptkit.model import attention, fast_lora, kernels, new_tokens
from cptkit.model.untrained_rows import check_untrained_rows
from cptkit.train import checkpointing
from cptkit.train.memory import RunShape

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    """A model ready for the Trainer, and what was chosen while loading it (for logs and run_meta)."""

    model: Any
    tokenizer: Any
    attention: str
    fused_cross_entropy: bool
    dtype: torch.dtype
    memory_plan: Any = None  # cptkit.train.memory.MemoryPlan, or None where no plan applies (CPU)
    kernels: dict[str, Any] = field(
        default_factory=dict
    )  # kernel -> on (rms_norm, swiglu, rope, compile, fast_lora)
    new_tokens: dict[str, Any] | None = None  # the rows added for data.vocabulary's tokens, or None
    untrained_rows: dict[str, Any] | None = None  # base rows that look untrained and occur in the data


def resolve_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """bf16 on a GPU that has it, fp32 on CPU (CPU bf16 matmuls are slow and the tests compare in fp32)."""
    if model_cfg.dtype != "auto":
        return _DTYPES[model_cfg.dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _refusals(model_cfg: ModelConfig, path: str | None = None, part: str = "") -> Any:
    """Loading errors of the model at `path` (default model.name_or_path) as one-line CptkitErrors."""
    where = f"model.name_or_path: {path or model_cfg.name_or_path}{part}"
    return load_refusals(where, "model.trust_remote_code")


def load_model_config(model_cfg: ModelConfig) -> Any:
    """The base model's transformers config (no weights), refusals as CptkitErrors."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
    with _refusals(model_cfg, part=" (its config)"):
        return AutoConfig.from_pretrained(
            model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The base model's tokenizer, with pad = eos when it has no pad token (as the seed does)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": model_cfg.gguf_file} if model_cfg.gguf_file else {}
    with _refusals(model_cfg, part=" (its tokenizer)"):
        tokenizer = AutoTokenizer.from_pretrained(
            model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code, **kwargs
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(train_cfg: TrainConfig) -> Any:
    """bitsandbytes settings for mode qlora (NF4, double quant, bf16 compute by default)."""
    from transformers import BitsAndBytesConfig

    q = train_cfg.quantization
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    storage = {"bnb_4bit_quant_storage": _DTYPES[q.compute_dtype]} if _sharded() else {}  # FSDP shards these
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype],
        **storage,
    )


def local_device() -> Any:
    """This process's device: the local rank's GPU under accelerate/torchrun, else cuda:0, else CPU."""
    if not torch.cuda.is_available():
        return None
    return int(os.environ.get("LOCAL_RANK", "0"))


def _sharded() -> bool:
    """True under accelerate with FSDP or DeepSpeed, which place the weights themselves (whether they
    also shard them: `_weights_sharded`)."""
    return (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    )


def _weights_sharded() -> bool:
    """True under FSDP or DeepSpeed ZeRO-3, which hold each weight as shards; ZeRO-1 and ZeRO-2 shard
    only optimizer states and gradients. An unknown DeepSpeed stage counts as sharded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return True
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return False
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and config and Path(config).is_file():
        try:
            stage = str(json.loads(Path(config).read_text()).get("zero_optimization", {}).get("stage"))
        except (OSError, ValueError, AttributeError):
            stage = None
    return stage not in ("0", "1", "2")


def use_fused_cross_entropy(train_cfg: TrainConfig) -> bool:
    """liger-kernel's fused linear cross-entropy: on GPU when installed (auto), or as asked."""
    if train_cfg.fused_cross_entropy == "off":
        return False
    if train_cfg.fused_cross_entropy == "auto" and _weights_sharded():
        # liger's kernel reads lm_head.weight directly, which FSDP2/ZeRO-3 hold as shards (DTensor)
        log.info("fused cross-entropy off: the lm_head is sharded under FSDP/DeepSpeed ZeRO-3")
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # ImportError, or triton missing on a CPU machine
        if train_cfg.fused_cross_entropy == "on":
            raise CptkitError(
                f"train.fused_cross_entropy: on, but liger-kernel cannot be used here ({e})"
            ) from None
        return False
    return torch.cuda.is_available() or train_cfg.fused_cross_entropy == "on"


def _recast_frozen(model: Any, dtype: torch.dtype) -> None:
    """prepare_model_for_kbit_training upcasts every non-quantised weight to fp32; for frozen ones
    (embeddings, lm_head, norms) that only makes the 128k-vocabulary projection run in fp32."""
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32 and dtype != torch.float32:
            param.data = param.data.to(dtype)


def _embedding_modules(model: Any) -> list[str]:
    """Names (last component) of the input embeddings and lm_head, for LoRA's modules_to_save."""
    names = []
    for target in (model.get_input_embeddings(), model.get_output_embeddings()):
        for name, module in model.named_modules():
            if module is target and target is not None:
                names.append(name.split(".")[-1])
    return sorted(set(names))


def lora_config(train_cfg: TrainConfig, model: Any, vocabulary: Vocabulary | None = None) -> Any:
    """peft LoraConfig from the `train.lora` section. With added tokens, new_tokens.train=all trains the
    embeddings and head in full (as lora.train_embeddings), new trains only their new rows (peft's
    trainable tokens, saved with the adapter)."""
    from peft import LoraConfig

    lc = train_cfg.lora
    whole = lc.train_embeddings or (vocabulary is not None and train_cfg.new_tokens.train == "all")
    tokens: dict[str, Any] = {}
    if vocabulary is not None and not whole and vocabulary.tokens:
        if "trainable_token_indices" not in LoraConfig.__dataclass_fields__:
            raise CptkitError(
                "train.new_tokens.train: new needs peft >= 0.15 (trainable_token_indices); upgrade peft "
                "or set train.new_tokens.train: all"
            )
        tokens["trainable_token_indices"] = new_tokens.trainable_token_indices(model, vocabulary)
    return LoraConfig(
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        use_rslora=lc.use_rslora,
        modules_to_save=_embedding_modules(model) if whole else None,
        bias="none",
        task_type="CAUSAL_LM",
        **tokens,
    )


def load_model_and_tokenizer(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    model_path: str | None = None,
    tokenizer: Any = None,
    run_shape: RunShape | None = None,
    vocabulary: Vocabulary | None = None,
    train_rows: Any = None,
    untrained_rows: str = "report",
) -> LoadedModel:
    """Load `model_path` (default model.name_or_path) for training in train.mode.

    Used by `cptkit train` and `cptkit sft`. `run_shape` (sequence length and micro-batch) is what the
    memory plan sizes activations for. `vocabulary` (the prepared folder's added tokens) grows the
    embeddings and head to the extended tokenizer and sets which of their rows train; with
    `train_rows`, base rows that look untrained yet occur in them are reported (or set to the trained
    rows' mean: `untrained_rows`). Returns the model with the memory plan, LoRA and the kernels
    applied as configured, use_cache off (a packed forward with a cache lets documents
    attend to each other), and what was chosen.
    """
    from transformers import AutoModelForCausalLM

    path = model_path or model_cfg.name_or_path
    if tokenizer is None:  # callers that checked a tokenizer already (train's preflight) pass it in
        tokenizer = load_tokenizer(model_cfg) if model_path is None else _tokenizer_at(model_cfg, path)
    on_gpu = torch.cuda.is_available()
    dtype = resolve_dtype(model_cfg)
    impl = attention.choose_attention(model_cfg.attention, on_gpu)
    if impl == attention.VARLEN:
        attention.register()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": impl,
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if model_cfg.gguf_file:
        kwargs["gguf_file"] = model_cfg.gguf_file
    if train_cfg.mode == "qlora":
        kwargs["quantization_config"] = quantization_config(train_cfg)
        kwargs["device_map"] = {"": local_device() if on_gpu else "cpu"}
    elif on_gpu and not _sharded():  # straight to the GPU, not through CPU memory
        kwargs["device_map"] = {"": local_device()}
    with _refusals(model_cfg, path):
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    base_size = vocabulary.base_size if vocabulary is not None else len(tokenizer)
    untrained = None
    if train_rows is not None:  # on the base rows, before they grow and before peft wraps them
        untrained = check_untrained_rows(model, tokenizer, train_rows, base_size, untrained_rows)
    if vocabulary is not None:  # before peft wraps the model; the embeddings are not quantised
        rows = new_tokens.add_new_token_rows(model, vocabulary, train_cfg.new_tokens, torch.initial_seed())
        if train_cfg.mode == "full" and train_cfg.new_tokens.train == "new":
            new_tokens.freeze_base_rows(model, vocabulary.base_size)
    applied: dict[
        str, Any
    ] = {}  # which kernels are on (fast_lora: layers and MLPs routed), for run_meta.json
    fused = kernels.apply_liger(model, train_cfg, use_fused_cross_entropy(train_cfg), record=applied)
    if train_cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        # checkpointing is the memory plan's (below), not peft's
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        _recast_frozen(model, dtype)
    if train_cfg.mode in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(train_cfg, model, vocabulary))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info(
            "LoRA: %s trainable of %s parameters (%.2f%%)",
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
        fast_lora.enable_fast_lora(model, train_cfg)
        applied["fast_lora"] = fast_lora.fast_lora_status(model)
    zero3 = _weights_sharded() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if zero3 and "fast_lora" in applied:
        # ZeRO-3 hooks every module once it wraps the model: the fused layers step aside for them
        applied["fast_lora"] = {"layers": 0, "mlps": 0}
    plan = checkpointing.apply_memory_plan(
        model,
        train_cfg,
        run_shape,
        fused_cross_entropy=fused,
        fast_lora=False if zero3 else None,
        fused_mlp=False if zero3 else None,
    )
    kernels.compile_blocks(model, train_cfg)
    log.info(
        "loaded %s: mode %s, dtype %s, attention %s, fused cross-entropy %s",
        path,
        train_cfg.mode,
        str(dtype).replace("torch.", ""),
        attention.describe(impl),
        "on" if fused else "off",
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        attention=impl,
        fused_cross_entropy=fused,
        dtype=dtype,
        memory_plan=plan,
        kernels={**applied, "compile": kernels.blocks_compiled(model)},
        new_tokens=rows if vocabulary is not None else None,
        untrained_rows=untrained,
    )


def _tokenizer_at(model_cfg: ModelConfig, path: str) -> Any:
    from dataclasses import replace

    return load_tokenizer(replace(model_cfg, name_or_path=path, gguf_file=None))

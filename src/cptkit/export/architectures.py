"""The model families the GGUF export knows: which llama.cpp architecture each maps to, the hyperparameters
llama.cpp reads from the metadata, and the tensors it derives (llama3 rope factors). Anything else is refused
before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cptkit.errors import CptkitError


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool  # llama.cpp's rope for llama/mistral wants q/k rows interleaved per head


ARCHITECTURES = {
    "llama": Architecture("llama", "LLAMA", permute_qk=True),
    "mistral": Architecture("mistral", "LLAMA", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": Architecture("qwen2", "QWEN2", permute_qk=False),
}


def architecture_of(config: dict[str, Any], where: str) -> Architecture:
    """The export's description of the model in `config` (its config.json), or a refusal naming what is
    supported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CptkitError(
            f"{where}: architecture {model_type!r} ({', '.join(config.get('architectures') or []) or '?'}) "
            f"cannot be exported to GGUF; supported: {', '.join(ARCHITECTURES)}"
        )
    quant = config.get("quantization_config")
    if quant:
        raise CptkitError(
            f"{where}: the model is still quantised ({quant.get('quant_method', '?')}, e.g. a QLoRA base); "
            "export a full-precision model: run `cptkit merge` first and export the merged folder"
        )
    rope_type = rope_settings(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise CptkitError(
            f"{where}: rope type {rope_type!r} (rope_parameters / rope_scaling) cannot be exported to GGUF; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    return ARCHITECTURES[model_type]


ROPE_TYPES = ("default", "linear", "llama3")  # the rope scalings llama.cpp reads back as HF computes them


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rope parameters whichever way the config spells them (transformers 5 `rope_parameters`,
    older `rope_theta` + `rope_scaling`)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    kind = params.get("rope_type") or params.get("type") or "default"
    return {**params, "rope_theta": float(theta), "rope_type": kind}


def hparams(config: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """The hyperparameters written to the GGUF metadata (`<arch>.<key>`), as a plain dict for the report
    and the tests."""
    rope = rope_settings(config)
    heads = config["num_attention_heads"]
    out = {
        "context_length": config.get("max_position_embeddings", 2048),
        "embedding_length": config["hidden_size"],
        "block_count": config["num_hidden_layers"],
        "feed_forward_length": config["intermediate_size"],
        "head_count": heads,
        "head_count_kv": config.get("num_key_value_heads") or heads,
        "rope_dimension_count": head_dim(config),
        "rope_freq_base": rope["rope_theta"],
        "layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        "vocab_size": vocab_size,
        "rope_type": rope["rope_type"],
    }
    if rope["rope_type"] == "linear":
        out["rope_scaling_factor"] = float(rope["factor"])
    return out


def add_hparams(writer, hp: dict[str, Any], file_type: int) -> None:
    """Write `hp` (from `hparams`) with the gguf writer's named setters."""
    import gguf

    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    writer.add_rope_dimension_count(hp["rope_dimension_count"])
    writer.add_rope_freq_base(hp["rope_freq_base"])
    writer.add_layer_norm_rms_eps(hp["layer_norm_rms_epsilon"])
    writer.add_vocab_size(hp["vocab_size"])
    if hp["embedding_length"] // hp["head_count"] != hp["rope_dimension_count"]:
        writer.add_key_length(hp["rope_dimension_count"])
        writer.add_value_length(hp["rope_dimension_count"])
    if "rope_scaling_factor" in hp:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp["rope_scaling_factor"])
    writer.add_file_type(file_type)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray | None:
    """The per-frequency factors llama.cpp reads from the `rope_freqs.weight` tensor for llama3-type rope
    scaling (it has no metadata key for them); None for other rope types."""
    rope = rope_settings(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * rope["rope_theta"] ** (i / dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows (half-split rotary) -> llama.cpp's (interleaved pairs), per head."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)

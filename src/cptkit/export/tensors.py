"""HF tensor names -> GGUF names and the type each is written in: 2-D weight matrices in the chosen type
(f16, bf16 or q8_0), norms, biases and other 1-D tensors in f32. A matrix q8_0 cannot hold (rows not a
multiple of its block of 32) is written in f16 and counted. Tensors are planned from the safetensors
headers and converted one at a time, so the export holds one tensor in memory, not the model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cptkit.errors import CptkitError
from cptkit.export.architectures import Architecture, permute_qk
from cptkit.merge.checkpoint import Checkpoint

GGUF_TYPES = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # export.type -> gguf.GGMLQuantizationType
FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}  # -> gguf.LlamaFileType
ROTARY_BUFFERS = ("rotary_emb.inv_freq",)  # recomputed by every runtime, never exported


@dataclass
class TensorPlan:
    hf_key: str | None  # None for a tensor the export derives (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]  # numpy order, as in the HF checkpoint
    qtype: str  # GGMLQuantizationType member name
    permute_heads: int | None = None  # q/k rows permuted for llama.cpp's rope with this many heads
    data: np.ndarray | None = None  # a derived tensor's values

    @property
    def nbytes(self) -> int:
        import gguf

        qtype = gguf.GGMLQuantizationType[self.qtype]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n = int(np.prod(self.shape)) if self.shape else 1
        return n // block * type_size


@dataclass
class TensorsPlan:
    tensors: list[TensorPlan]
    skipped: Counter  # reason -> count: nothing left out goes unreported
    kept_f16: list[str]  # matrices q8_0 cannot hold, written in f16


def plan_tensors(
    checkpoint: Checkpoint, config: dict[str, Any], arch: Architecture, type_name: str
) -> TensorsPlan:
    """Every tensor of `checkpoint` with its GGUF name and type; an unknown name is an error (a tensor
    dropped silently would give a file that loads but computes something else)."""
    import gguf

    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], layers)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = bool(config.get("tie_word_embeddings", False))
    plans, skipped, kept_f16 = [], Counter(), []
    for key, info in checkpoint.tensors.items():
        if key.endswith(ROTARY_BUFFERS):
            skipped["rotary buffer"] += 1
            continue
        if tied and key == "lm_head.weight":
            skipped["tied output head (llama.cpp reuses token_embd)"] += 1
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CptkitError(
                f"{checkpoint.folder}: tensor {key} {list(info.shape)} has no GGUF name for {arch.model_type}; "
                "the model has parts llama.cpp's architecture does not"
            )
        qtype = _tensor_type(info.shape, type_name)
        if type_name == "q8_0" and len(info.shape) == 2 and qtype != "Q8_0":
            kept_f16.append(key)
        permute = None
        if arch.permute_qk and key.endswith("self_attn.q_proj.weight"):
            permute = heads
        elif arch.permute_qk and key.endswith("self_attn.k_proj.weight"):
            permute = kv_heads
        plans.append(TensorPlan(key, name, info.shape, qtype, permute))
    return TensorsPlan(plans, skipped, kept_f16)


def rope_freqs_plan(factors: np.ndarray) -> TensorPlan:
    import gguf

    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return TensorPlan(None, name, tuple(factors.shape), "F32", data=factors)


def _tensor_type(shape: tuple[int, ...], type_name: str) -> str:
    if len(shape) != 2:
        return "F32"
    if type_name == "q8_0" and shape[-1] % 32:
        return "F16"
    return GGUF_TYPES[type_name]


def convert(plan: TensorPlan, tensor: torch.Tensor | None) -> np.ndarray:
    """The bytes (or f32/f16 values) GGUF stores for one tensor."""
    import gguf

    if plan.data is not None:
        return plan.data
    values = tensor.to(torch.float32).numpy()
    if plan.permute_heads:
        values = permute_qk(values, plan.permute_heads)
    if plan.qtype == "F32":
        return np.ascontiguousarray(values)
    if plan.qtype == "F16":
        return np.ascontiguousarray(values.astype(np.float16))
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[plan.qtype])

"""Model FLOPs utilisation, counted from the model's shape (never HF's `total_flos`).

Per trained token, with N the non-embedding matmul parameters (lm_head included):
    full:        6 N + 12 L H Q T
    LoRA/QLoRA:  4 N_frozen + 6 N_lora + 12 L H Q T
(frozen weights need forward and the gradient of their input, not of themselves: 4 instead of 6).
L layers, H heads, Q head dim, T sequence length. The attention term is reported without the causal
halving (the PaLM convention), so the numbers compare with published MFU figures; `causal=True`
halves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cptkit.model.shape import ModelShape

# Dense bf16 tensor-core peaks in TFLOP/s (no sparsity), by a substring of the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "A6000": 155.0,
    "A10": 125.0,
    "L4": 121.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(device_name: str | None = None) -> float | None:
    """Peak bf16 TFLOP/s of the current (or named) CUDA device; None when unknown or on CPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _is_lora(name: str) -> bool:
    return "lora_" in name


def count_matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(frozen, trainable) parameters of the matmuls a token goes through: every Linear (4-bit ones
    counted at their full shape) except embeddings, LoRA matrices counted as trainable."""
    frozen = trainable = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) or "embed" in name.split(".")[-1]:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None:
            continue
        n = module.in_features * module.out_features
        if _is_lora(name) or weight.requires_grad:
            trainable += n
        else:
            frozen += n
    return frozen, trainable


def flops_per_token(model: torch.nn.Module, seq_length: int, causal: bool = False) -> float:
    """Training FLOPs per token for `model` at sequence length `seq_length` (see module docstring)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    frozen, trainable = count_matmul_params(model)
    return _training_flops(frozen, trainable, layers * heads * head_dim, seq_length, causal)


def flops_per_token_of_shape(
    shape: ModelShape,
    seq_length: int,
    mode: str,
    lora_r: int = 0,
    lora_targets: list[str] | str = (),
    train_embeddings: bool = False,
    causal: bool = False,
) -> float:
    """`flops_per_token` of the model `shape` describes (no model needed), trained in `mode` (full, lora,
    qlora) with LoRA of rank `lora_r` on `lora_targets`: the same count of the same matmuls."""
    blocks = shape.layers * shape.block_linear_params
    head = shape.vocab * shape.hidden  # lm_head is a matmul even when its weight is the embeddings'
    if mode == "full":
        frozen, trainable = 0, blocks + head
    else:
        lora = shape.lora_params(lora_r, lora_targets)
        frozen, trainable = blocks + head * (not train_embeddings), lora + head * train_embeddings
    return _training_flops(frozen, trainable, shape.layers * shape.heads * shape.head_dim, seq_length, causal)


def _training_flops(
    frozen: int, trainable: int, attention_width: int, seq_length: int, causal: bool
) -> float:
    """4 per frozen and 6 per trained matmul parameter, 12 L H Q T for attention (module docstring)."""
    attention = 12 * attention_width * seq_length * (0.5 if causal else 1.0)
    return 4 * frozen + 6 * trainable + attention


def mfu(
    tokens_per_second: float, flops_token: float, num_devices: int = 1, peak: float | None = None
) -> float | None:
    """Achieved FLOP/s over the peak of all devices; None when the peak is unknown (CPU)."""
    peak = peak if peak is not None else peak_tflops()
    if not peak:
        return None
    return tokens_per_second * flops_token / (peak * 1e12 * num_devices)

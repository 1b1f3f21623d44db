"""The NF4 round trip of a weight: what a QLoRA adapter saw of its base during training.

bitsandbytes' Linear4bit stores each weight in NF4 (blocks of 64, absmax constants themselves
quantised when double quant is on) and dequantises it to the compute dtype before every matmul, so
`dequantize_4bit(quantize_4bit(W))` in the compute dtype is exactly the weight the adapter trained against.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # bitsandbytes' Params4bit default, the one transformers' QLoRA loading uses


def nf4_available(device: torch.device | str) -> str | None:
    """None if bitsandbytes can quantise to 4 bits on `device`, else the reason it cannot."""
    try:
        import bitsandbytes.functional as F

        w = torch.randn(8, 64, device=device, dtype=torch.bfloat16)
        q, state = F.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
        F.dequantize_4bit(q, state)
    # not installed, no native library (OSError; AttributeError from a bitsandbytes whose library did not
    # load), no kernel for this device (RuntimeError, NotImplementedError), a device it refuses (ValueError)
    except (ImportError, OSError, AttributeError, RuntimeError, ValueError) as e:
        return f"bitsandbytes cannot quantise to NF4 on {device}: {type(e).__name__}: {e}"
    return None


def nf4_settings(quant: dict[str, Any]) -> dict[str, Any]:
    """The round trip's settings ({quant_type, double_quant, dtype}) from a run's `quantization` record
    (run_meta.json or the train section), with the defaults `cptkit train` uses for QLoRA."""
    return {
        "quant_type": quant.get("quant_type", "nf4"),
        "double_quant": bool(quant.get("double_quant", True)),
        "dtype": getattr(torch, str(quant.get("compute_dtype", "bfloat16"))),
    }


def nf4_roundtrip(
    weight: torch.Tensor,
    quant_type: str = "nf4",
    double_quant: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The weight as the 4-bit base presents it to the matmul: quantised, then dequantised to `dtype`."""
    import bitsandbytes.functional as F

    w = weight.to(dtype).contiguous()
    q, state = F.quantize_4bit(
        w, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=double_quant
    )
    return F.dequantize_4bit(q, state).to(dtype).reshape(weight.shape)


def is_quantized_key(key: str, shape: tuple[int, ...], skip: set[str] = frozenset()) -> bool:
    """Whether transformers' 4-bit loading quantises this tensor: Linear weights, but not embeddings,
    the output head (kept in high precision) or modules trained in full (modules_to_save)."""
    if len(shape) != 2 or not key.endswith(".weight") or key in skip:
        return False
    module = key[: -len(".weight")]
    return "embed" not in module and module.split(".")[-1] not in {
        "lm_head",
        "embed_out",
        "output",
        "wte",
        "wpe",
    }

"""Loading a model to evaluate: a model folder, or a LoRA adapter on its base (optionally the NF4 base a
QLoRA adapter was trained against), with a clear error for folders that hold no model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cptkit.errors import CptkitError, Refused, load_refusals

log = logging.getLogger(__name__)

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
_TRUST = "model.trust_remote_code"  # what eval passes as trust_remote_code


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise CptkitError("device cuda asked for, but no CUDA GPU is visible; use device: cpu or auto")
    return torch.device(requested)


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bfloat16 on a GPU, float32 on CPU (CPU bf16 matmuls are slow and imprecise), unless asked."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_model_folder(path: str | Path) -> None:
    """A local path must be a model folder with weights; hub names are left to transformers."""
    folder = Path(path)
    if not folder.exists():
        if str(path).startswith((".", "/", "~")) or folder.suffix:
            raise CptkitError(f"{path}: no such model folder")
        return
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise CptkitError(
            f"{folder}: a LoRA adapter, not a model: give it as `adapter:` with its base as `path:`"
        )
    if not (folder / "config.json").is_file():
        raise CptkitError(f"{folder}: not a model folder (no config.json)")
    if not any(any(folder.glob(p)) for p in _WEIGHTS):
        raise CptkitError(
            f"{folder}: model folder without weights (no *.safetensors or pytorch_model*.bin); "
            "the download or the merge did not finish"
        )


def load_model(
    path: str | Path,
    device: torch.device,
    dtype: torch.dtype,
    adapter: str | Path | None = None,
    nf4: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM in eval mode on `device`; with `adapter`, the LoRA applied unmerged on top.

    `nf4` ({quant_type, double_quant, dtype}) replaces the base's Linear weights with their NF4 round trip
    first: the base exactly as a QLoRA adapter saw it (bitsandbytes dequantises before each matmul).
    A model that needs its own code loads only with `trust_remote_code` (model.trust_remote_code).
    """
    from transformers import AutoModelForCausalLM

    check_model_folder(path)
    # straight onto the GPU: an 8B model never needs a CPU copy
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    with load_refusals(f"{path}: the model", _TRUST):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code, **placement
        )
    model.to(device)
    if nf4 is not None:
        _round_trip_base(model, nf4)
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise CptkitError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
        _grow_vocabulary(model, adapter)
        try:
            with load_refusals(f"{adapter}: the adapter", None):
                model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as e:
            raise CptkitError(f"{adapter}: this adapter does not fit the model {path}: {e}") from None
    model.eval()
    return model


def _grow_vocabulary(model, adapter: str | Path) -> None:
    """Resize the embeddings (and head) to the rows of an adapter trained with an extended vocabulary, so
    that peft loads the resized matrices it saved; a base with as many rows is left as it is."""
    from cptkit.merge.rows import adapter_embedding_rows

    rows = adapter_embedding_rows(adapter)
    if rows is not None and rows > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)


@torch.no_grad()
def _round_trip_base(model, nf4: dict[str, Any]) -> None:
    from cptkit.merge.nf4 import is_quantized_key, nf4_roundtrip

    for name, param in model.named_parameters():
        if is_quantized_key(name, tuple(param.shape)):
            param.copy_(nf4_roundtrip(param, nf4["quant_type"], nf4["double_quant"], nf4["dtype"]))


def load_tokenizer(path: str | Path, fallback: str | Path | None = None, trust_remote_code: bool = False):
    """The tokenizer saved with a model (or adapter) folder, else the fallback's; one that needs its own
    code is refused (with the setting that allows it) unless `trust_remote_code`."""
    from transformers import AutoTokenizer

    for source in (path, fallback):
        if source is None:
            continue
        p = Path(source)
        if p.exists() and not any(
            (p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        ):
            continue
        try:
            with load_refusals(f"{source}: the tokenizer", _TRUST):
                return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
        except Refused:
            raise
        except (CptkitError, ValueError) as e:
            log.debug("no tokenizer in %s: %s", source, e)
    raise CptkitError(f"{path}: no tokenizer found (nor in {fallback})")

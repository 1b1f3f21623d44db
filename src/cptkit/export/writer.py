"""One model folder -> one GGUF file. The header (metadata and tensor table) is written from the safetensors
headers first; then each tensor is read, converted and appended in turn, so peak memory is about one tensor,
not the model. The file is written beside its final name and renamed at the end: no half-written .gguf."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cptkit.export.architectures import add_hparams, architecture_of, hparams, llama3_rope_factors
from cptkit.export.tensors import FILE_TYPES, TensorPlan, convert, plan_tensors, rope_freqs_plan
from cptkit.export.tokenizer import tokenizer_meta
from cptkit.merge.checkpoint import TensorReader, read_checkpoint

log = logging.getLogger(__name__)


def write_gguf(folder: Path, out_path: Path, type_name: str, name: str | None = None) -> dict[str, Any]:
    """Export the full model in `folder` to `out_path` with weight matrices in `type_name`; returns what the
    report records (architecture, tensors, tokenizer summary, bytes, seconds)."""
    import gguf

    start = time.perf_counter()
    checkpoint = read_checkpoint(folder)
    config = checkpoint.config()
    arch = architecture_of(config, str(folder / "config.json"))
    vocab_size = _vocab_size(checkpoint, config)
    hp = hparams(config, vocab_size)
    tokenizer = tokenizer_meta(folder, vocab_size)
    plan = plan_tensors(checkpoint, config, arch, type_name)
    factors = llama3_rope_factors(config)
    tensors = plan.tensors + ([rope_freqs_plan(factors)] if factors is not None else [])

    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]])
    try:
        writer.add_name(name or folder.name)
        add_hparams(writer, hp, int(gguf.LlamaFileType[FILE_TYPES[type_name]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokenizer.add_to(writer)
        for t in tensors:
            _add_info(writer, t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with TensorReader(checkpoint) as reader:
            for t in tensors:
                writer.write_tensor_data(convert(t, reader.read(t.hf_key) if t.hf_key else None))
    finally:
        writer.close()
    os.replace(partial, out_path)
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.qtype.lower()] = counts.get(t.qtype.lower(), 0) + 1
    return {
        "source": str(folder),
        "architecture": arch.model_type,
        "gguf_architecture": gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_arch]],
        "type": type_name,
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 3),
        "tensors": len(tensors),
        "tensor_types": counts,
        "skipped": dict(plan.skipped),
        "kept_f16": plan.kept_f16,
        "vocab_size": vocab_size,
        "hparams": hp,
        "tokenizer": tokenizer.summary(),
    }


def _add_info(writer, t: TensorPlan) -> None:
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[t.qtype]
    if t.qtype in ("F32", "F16"):
        dtype = np.float32 if t.qtype == "F32" else np.float16
        writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(dtype), t.nbytes)
    else:  # quantised (and bf16) tensors travel as bytes
        byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qtype)
        writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)


def _vocab_size(checkpoint, config: dict[str, Any]) -> int:
    """The embedding's rows (what the GGUF's token list must cover), else config.vocab_size."""
    info = checkpoint.tensors.get("model.embed_tokens.weight")
    return info.shape[0] if info is not None else config["vocab_size"]

"""The streaming merge: base tensors are read one at a time, W += scale * B @ A applied, and each result
written straight into its output shard, so an 8B merge holds a few tensors in memory, never a whole model
(nor a whole shard).

One pass can write several variants (for QLoRA: into the original base and into its NF4 round trip),
reading each base tensor and computing each LoRA delta once.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cptkit.errors import CptkitError
from cptkit.merge.adapter import TOKENIZER_FILES, LoraAdapter
from cptkit.merge.checkpoint import FLOAT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, read_header, read_tensor
from cptkit.merge.nf4 import is_quantized_key, nf4_roundtrip
from cptkit.merge.scale import interpolated
from cptkit.merge.write import ShardWriter, TensorSpec, plan_shards

log = logging.getLogger(__name__)

_CONFIG_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
)


@dataclass
class Variant:
    """One merged model to write: into the base as stored, or into its NF4 round trip (`quant` settings)."""

    name: str
    folder: Path
    quant: dict[str, Any] | None = None


def check_adapter_fits(base: Checkpoint, adapter: LoraAdapter) -> None:
    """Refuse an adapter trained on another model: architecture, module names and shapes must all match."""
    problems = []
    base_cfg = base.config()
    trained_on = adapter.base_name
    if trained_on and (Path(trained_on) / "config.json").is_file():
        other = json.loads((Path(trained_on) / "config.json").read_text(encoding="utf-8"))
        problems += [
            f"{k}: adapter's base has {other[k]}, this base {base_cfg.get(k)}"
            for k in _CONFIG_KEYS
            if k in other and other[k] != base_cfg.get(k)
        ]
    cls = (adapter.config.get("auto_mapping") or {}).get("base_model_class")
    if cls and base_cfg.get("architectures") and cls not in base_cfg["architectures"]:
        problems.append(
            f"architecture: adapter trained on {cls}, base is {', '.join(base_cfg['architectures'])}"
        )
    for key, module in adapter.modules.items():
        info = base.tensors.get(key)
        if info is None:
            problems.append(f"module {module.name}: not in the base (no tensor {key})")
        elif tuple(info.shape) != tuple(module.delta_shape()):
            problems.append(
                f"module {module.name}: base weight {list(info.shape)}, adapter update {list(module.delta_shape())}"
            )
    for key, tensor in adapter.replacements.items():
        info = base.tensors.get(key)
        if info is not None and tuple(info.shape) != tuple(tensor.shape):
            problems.append(f"{key}: base {list(info.shape)}, adapter's trained copy {list(tensor.shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CptkitError(
            f"{adapter.folder}: this adapter does not belong to the base {base.folder}: {shown}"
        )


def output_specs(base: Checkpoint, adapter: LoraAdapter, dtype: torch.dtype) -> list[TensorSpec]:
    """Every output tensor's name, dtype and shape, in the order they are written."""
    out = SAFETENSORS_DTYPES[dtype]
    specs = []
    for key, info in base.tensors.items():
        t = adapter.replacements.get(key)
        shape = tuple(t.shape) if t is not None else tuple(info.shape)
        specs.append(TensorSpec(key, out if info.dtype in FLOAT_DTYPES else info.dtype, shape))
    specs += [
        TensorSpec(k, out, tuple(t.shape)) for k, t in adapter.replacements.items() if k not in base.tensors
    ]
    return specs


def merge_stream(
    base: Checkpoint,
    adapter: LoraAdapter,
    variants: list[Variant],
    dtype: torch.dtype,
    max_shard_bytes: int,
    device: torch.device,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Write every variant's weights into its folder; returns counts and the NF4 round-trip error of the base.
    `scale` (merge.scale) multiplies each LoRA update, and moves each trained copy of a module
    (modules_to_save) that part of the way from the base's weight."""
    from tqdm.auto import tqdm

    specs = output_specs(base, adapter, dtype)
    shards = plan_shards(specs, max_shard_bytes)
    writers = [ShardWriter(v.folder, shards) for v in variants]
    skip = set(adapter.replacements)
    err = {"squared_error": 0.0, "squared_norm": 0.0, "tensors": 0}
    merged = 0
    bar = tqdm(total=len(specs), desc="merge", unit="tensor", disable=None)
    try:
        for file in base.files():
            _, data_start = read_header(file)
            with open(file, "rb") as f:
                for info in [t for t in base.tensors.values() if t.file == file]:
                    tensor = read_tensor(info, f, data_start)
                    outputs = _merge_one(info.key, tensor, adapter, variants, dtype, device, skip, err, scale)
                    merged += info.key in adapter.modules
                    for writer, out in zip(writers, outputs, strict=True):
                        writer.add(info.key, out)
                    del tensor, outputs
                    bar.update()
        for key, t in adapter.replacements.items():
            if key not in base.tensors:
                untied = interpolated(_tied_base_weight(base, key), t, scale) if scale != 1 else t
                for writer in writers:
                    writer.add(key, untied.to(dtype))
                bar.update()
    finally:
        bar.close()
        for writer in writers:
            writer.close()
    if merged != len(adapter.modules):
        raise CptkitError(
            f"{base.folder}: {len(adapter.modules) - merged} adapted modules were not found while merging"
        )
    for writer in writers:
        writer.finish()
    rel = (err["squared_error"] / err["squared_norm"]) ** 0.5 if err["squared_norm"] else None
    return {
        "merged_modules": merged,
        "replaced_tensors": len(adapter.replacements),
        "nf4_relative_error": rel,
        "nf4_quantized_tensors": err["tensors"],
        "output_bytes": sum(s.nbytes for s in specs),
    }


def _merge_one(key, tensor, adapter, variants, dtype, device, skip, err, scale) -> list[torch.Tensor]:
    if key in adapter.replacements:
        return [interpolated(tensor, adapter.replacements[key], scale).to(dtype)] * len(variants)
    if not tensor.is_floating_point():
        return [tensor] * len(variants)
    module = adapter.modules.get(key)
    delta = module.delta(device, scale) if module is not None else None
    outputs = []
    for variant in variants:
        if variant.quant is not None and is_quantized_key(key, tuple(tensor.shape), skip):
            w = nf4_roundtrip(
                tensor.to(device),
                variant.quant["quant_type"],
                variant.quant["double_quant"],
                variant.quant["dtype"],
            ).float()
            original = tensor.to(device, torch.float32)
            err["squared_error"] += float((w - original).pow(2).sum())
            err["squared_norm"] += float(original.pow(2).sum())
            err["tensors"] += 1
        elif delta is None:  # untouched (embeddings, norms, ...): only the dtype changes, no float32 copy
            outputs.append(tensor.to(dtype))
            continue
        else:
            w = tensor.to(device, torch.float32, copy=True)  # a copy: the next variant needs the original
        if delta is not None:
            w += delta
        outputs.append(w.to(dtype).cpu())
    return outputs


_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _tied_base_weight(base: Checkpoint, key: str) -> torch.Tensor:
    """The base's value of a trained tensor it does not store: the input embeddings, for an output head
    tied to them (the only such tensor a base model lacks)."""
    found = [k for k in base.tensors if k.endswith(_INPUT_EMBEDDINGS)]
    if len(found) != 1:
        raise CptkitError(
            f"{base.folder}: the adapter trained {key}, which the base does not store and which is not "
            "tied to one input embedding; merge.scale other than 1 cannot tell what it started from"
        )
    info = base.tensors[found[0]]
    _, data_start = read_header(info.file)
    with open(info.file, "rb") as f:
        return read_tensor(info, f, data_start)


def write_model_files(folder: Path, base: Checkpoint, adapter: LoraAdapter, dtype: torch.dtype) -> str:
    """config.json (dtype updated), generation_config.json, and the tokenizer; returns the tokenizer's source."""
    untie = any(k.startswith("lm_head") for k in adapter.replacements)  # the trained head is written apart
    write_config_files(folder, base, dtype, untie=untie)
    return copy_tokenizer(folder, [adapter.folder, base.folder])


def write_config_files(folder: Path, model: Checkpoint, dtype: torch.dtype, untie: bool = False) -> None:
    """`model`'s config.json with the written dtype (and untied embeddings when `untie`), and its
    generation_config.json (made from the config when it has none)."""
    config = model.config()
    name = str(dtype).replace("torch.", "")
    for k in ("dtype", "torch_dtype"):
        if k in config:
            config[k] = name
    config.setdefault("dtype", name)
    if untie and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    gen = model.folder / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, folder / gen.name)
    else:
        from transformers import GenerationConfig, PretrainedConfig

        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(folder)


def copy_tokenizer(folder: Path, sources: list[Path]) -> str:
    """The tokenizer files of the first of `sources` that holds a tokenizer (else of the last one) copied
    into `folder`; returns the folder they came from."""
    for source in sources:
        files = [source / n for n in TOKENIZER_FILES if (source / n).is_file()]
        if any(f.name in ("tokenizer.json", "tokenizer.model", "vocab.json") for f in files):
            break
    for f in files:
        shutil.copy2(f, folder / f.name)
    return str(source)

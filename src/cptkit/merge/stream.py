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
from cptkit.merge.rows import grows_rows, interpolated_rows, is_input_embedding, with_rows
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
        shape = start_shape(base, adapter, key)
        if shape is None:
            problems.append(f"module {module.name}: not in the base (no tensor {key})")
        elif shape != tuple(module.delta_shape()):
            problems.append(
                f"module {module.name}: base weight {list(shape)}, adapter update {list(module.delta_shape())}"
            )
    for key, tensor in adapter.replacements.items():
        shape = start_shape(base, adapter, key)
        if shape is not None and shape != tuple(tensor.shape) and not grows_rows(shape, tuple(tensor.shape)):
            problems.append(f"{key}: base {list(shape)}, adapter's trained copy {list(tensor.shape)}")
    for key, rows in adapter.token_rows.items():
        shape = start_shape(base, adapter, key) or start_shape(base, adapter, _input_embedding_key(base))
        if shape is None or max(rows.indices) >= shape[0] or rows.values.shape[1:] != shape[1:]:
            problems.append(
                f"{key}: trained token rows up to id {max(rows.indices)} of width {list(rows.values.shape[1:])}, "
                f"but the matrix they go into is {list(shape or [])}"
            )
    for key, tensor in adapter.base_copies.items():
        info = base.tensors.get(key)
        if (
            info is not None
            and tuple(info.shape) != tuple(tensor.shape)
            and not grows_rows(info.shape, tensor.shape)
        ):
            problems.append(f"{key}: base {list(info.shape)}, the adapter's copy of it {list(tensor.shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CptkitError(
            f"{adapter.folder}: this adapter does not belong to the base {base.folder}: {shown}"
        )


def start_shape(base: Checkpoint, adapter: LoraAdapter, key: str) -> tuple[int, ...] | None:
    """The shape of the tensor the merge starts `key` from: the base's, or the adapter's copy of it where
    training grew its rows (an extended vocabulary); None when neither has it."""
    copy = adapter.base_copies.get(key)
    info = base.tensors.get(key)
    if info is None:
        return tuple(copy.shape) if copy is not None else None
    if copy is not None and grows_rows(tuple(info.shape), tuple(copy.shape)):
        return tuple(copy.shape)
    return tuple(info.shape)


def keep_head_tied(base: Checkpoint, adapter: LoraAdapter) -> None:
    """Drop what the adapter holds for an output head that the base ties to its input embedding and that
    training kept tied (no trained copy of its own; trained rows, if any, the embedding's): the merged model
    then ties it too instead of storing a second matrix."""
    embedding = _input_embedding_key(base)
    for key in [k for k in {*adapter.token_rows, *adapter.base_copies} if k not in base.tensors]:
        if key in adapter.replacements or key in adapter.modules or embedding is None:
            continue
        rows, embedding_rows = adapter.token_rows.get(key), adapter.token_rows.get(embedding)
        if rows is None or (embedding_rows is not None and rows.same_as(embedding_rows)):
            adapter.token_rows.pop(key, None)
            adapter.base_copies.pop(key, None)


def extra_keys(base: Checkpoint, adapter: LoraAdapter) -> list[str]:
    """Trained tensors the base does not store (an output head the base ties): written after the base's."""
    return [k for k in dict.fromkeys([*adapter.replacements, *adapter.token_rows]) if k not in base.tensors]


def _input_embedding_key(base: Checkpoint) -> str | None:
    found = [k for k in base.tensors if is_input_embedding(k)]
    return found[0] if len(found) == 1 else None


def output_specs(base: Checkpoint, adapter: LoraAdapter, dtype: torch.dtype) -> list[TensorSpec]:
    """Every output tensor's name, dtype and shape, in the order they are written."""
    out = SAFETENSORS_DTYPES[dtype]
    specs = []
    for key, info in base.tensors.items():
        t = adapter.replacements.get(key)
        shape = tuple(t.shape) if t is not None else start_shape(base, adapter, key)
        specs.append(TensorSpec(key, out if info.dtype in FLOAT_DTYPES else info.dtype, shape))
    for key in extra_keys(base, adapter):  # a head the base ties: shaped like the (grown) input embedding
        t = adapter.replacements.get(key)
        shape = start_shape(base, adapter, key) or start_shape(
            base, adapter, _input_embedding_key(base) or ""
        )
        specs.append(TensorSpec(key, out, tuple(t.shape) if t is not None else shape))
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
                    tensor = _start_tensor(adapter, info.key, read_tensor(info, f, data_start))
                    outputs = _merge_one(info.key, tensor, adapter, variants, dtype, device, skip, err, scale)
                    merged += info.key in adapter.modules
                    for writer, out in zip(writers, outputs, strict=True):
                        writer.add(info.key, out)
                    del tensor, outputs
                    bar.update()
        for key in extra_keys(base, adapter):
            t, rows = adapter.replacements.get(key), adapter.token_rows.get(key)
            if t is not None:
                untied = interpolated_rows(_extra_start(base, adapter, key), t, scale) if scale != 1 else t
            else:
                untied = with_rows(_extra_start(base, adapter, key), rows, scale)
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
        "trained_token_rows": {k: len(r.indices) for k, r in adapter.token_rows.items()},
        "nf4_relative_error": rel,
        "nf4_quantized_tensors": err["tensors"],
        "output_bytes": sum(s.nbytes for s in specs),
    }


def _merge_one(key, tensor, adapter, variants, dtype, device, skip, err, scale) -> list[torch.Tensor]:
    if key in adapter.replacements:
        return [interpolated_rows(tensor, adapter.replacements[key], scale).to(dtype)] * len(variants)
    if key in adapter.token_rows:
        return [with_rows(tensor, adapter.token_rows[key], scale).to(dtype)] * len(variants)
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


def _start_tensor(adapter: LoraAdapter, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The base tensor, or the adapter's copy of it where training grew its rows (new vocabulary rows as
    training initialised them)."""
    copy = adapter.base_copies.get(key)
    if copy is not None and grows_rows(tuple(tensor.shape), tuple(copy.shape)):
        return copy.to(tensor.dtype)
    return tensor


def _extra_start(base: Checkpoint, adapter: LoraAdapter, key: str) -> torch.Tensor:
    """What a trained tensor the base does not store started from: the adapter's copy of it, else the
    input embedding (as grown in training) for an output head tied to it."""
    if key in adapter.base_copies:
        return adapter.base_copies[key]
    embedding = _input_embedding_key(base)
    if embedding is None:
        raise CptkitError(
            f"{base.folder}: the adapter trained {key}, which the base does not store and which is not "
            "tied to one input embedding; there is no value to merge it into"
        )
    info = base.tensors[embedding]
    _, data_start = read_header(info.file)
    with open(info.file, "rb") as f:
        return _start_tensor(adapter, embedding, read_tensor(info, f, data_start))


def write_model_files(folder: Path, base: Checkpoint, adapter: LoraAdapter, dtype: torch.dtype) -> str:
    """config.json (dtype updated), generation_config.json, and the tokenizer; returns the tokenizer's source."""
    # a trained head of its own: written apart from the embedding (or stored by the base beside it)
    untie = bool(extra_keys(base, adapter)) or any(k.startswith("lm_head") for k in adapter.replacements)
    write_config_files(folder, base, dtype, untie=untie, vocab_size=output_vocab_size(base, adapter))
    return copy_tokenizer(folder, [adapter.folder, base.folder])


def output_vocab_size(base: Checkpoint, adapter: LoraAdapter) -> int | None:
    """Rows of the merged input embedding (more than the base's when training extended the vocabulary)."""
    embedding = _input_embedding_key(base)
    if embedding is None:
        return None
    t = adapter.replacements.get(embedding)
    return int(t.shape[0]) if t is not None else start_shape(base, adapter, embedding)[0]


def write_config_files(
    folder: Path, model: Checkpoint, dtype: torch.dtype, untie: bool = False, vocab_size: int | None = None
) -> None:
    """`model`'s config.json with the written dtype (and untied embeddings when `untie`, the merged
    vocabulary's size when given), and its generation_config.json (made from the config when it has none)."""
    config = model.config()
    if vocab_size is not None:
        _set_vocab_size(config, vocab_size)
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


def _set_vocab_size(config: dict, size: int) -> None:
    """vocab_size where the config keeps it: at the top, or in the text part of a multimodal config."""
    if "vocab_size" in config or "text_config" not in config:
        config["vocab_size"] = size
    else:
        config["text_config"]["vocab_size"] = size


def tokenizer_folder(sources: list[Path]) -> Path:
    """The first of `sources` that holds a tokenizer (else the last one): where the merged model's comes from."""
    for source in sources:
        if any((source / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return source
    return sources[-1]


def copy_tokenizer(folder: Path, sources: list[Path]) -> str:
    """The tokenizer files of the first of `sources` that holds a tokenizer (else of the last one) copied
    into `folder`; returns the folder they came from."""
    source = tokenizer_folder(sources)
    for f in [source / n for n in TOKENIZER_FILES if (source / n).is_file()]:
        shutil.copy2(f, folder / f.name)
    return str(source)

"""A fully fine-tuned model moved back toward its base: base + scale * (trained - base), written like the
LoRA merge (shard by shard, loadable by plain transformers) for `cptkit merge` at merge.scale < 1.

Both checkpoints are streamed one tensor at a time, so the merge holds two tensors in memory, never a
model. The same walk (`interpolated_tensors`) sets the weights of each point of eval's interpolation sweep.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cptkit.errors import CptkitError
from cptkit.merge.checkpoint import FLOAT_DTYPES, SAFETENSORS_DTYPES, Checkpoint, TensorReader
from cptkit.merge.rows import grows_rows, interpolated_rows
from cptkit.merge.stream import copy_tokenizer, write_config_files
from cptkit.merge.write import ShardWriter, TensorSpec, check_disk_space, plan_shards


def is_full_model(folder: str | Path) -> bool:
    """A model folder (config.json) that is not a LoRA adapter: what full fine-tuning leaves."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def check_same_model(base: Checkpoint, trained: Checkpoint) -> None:
    """Refuse a trained model that is not the base fine-tuned: the same tensor names and shapes, except
    embedding and head rows that training added (an extended vocabulary)."""
    problems = [f"{k}: only in the trained model" for k in trained.tensors if k not in base.tensors]
    problems += [f"{k}: only in the base" for k in base.tensors if k not in trained.tensors]
    problems += [
        f"{k}: base {list(base.tensors[k].shape)}, trained {list(t.shape)}"
        for k, t in trained.tensors.items()
        if k in base.tensors
        and tuple(base.tensors[k].shape) != tuple(t.shape)
        and not grows_rows(tuple(base.tensors[k].shape), tuple(t.shape))
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CptkitError(
            f"{trained.folder}: not a fine-tuned copy of the base {base.folder}, so there is nothing to "
            f"interpolate between them: {shown}"
        )


def interpolated_tensors(
    base: Checkpoint, trained: Checkpoint, scale: float
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, base + scale * (trained - base)) for every tensor of `trained`, in its file order; rows the
    base lacks (an extended vocabulary) are the trained ones."""
    with TensorReader(base) as base_tensors, TensorReader(trained) as trained_tensors:
        for key in trained.tensors:
            trained_value = trained_tensors.read(key)
            base_value = base_tensors.read(key) if scale != 1 else trained_value
            yield key, interpolated_rows(base_value, trained_value, scale)


def write_interpolated(
    base: Checkpoint,
    trained: Checkpoint,
    folder: Path,
    scale: float,
    dtype: torch.dtype,
    max_shard_bytes: int,
) -> dict[str, Any]:
    """The weights, config, generation config and tokenizer of base + scale * (trained - base) in
    `folder`; returns the counts for the merge report."""
    out = SAFETENSORS_DTYPES[dtype]
    specs = [
        TensorSpec(k, out if t.dtype in FLOAT_DTYPES else t.dtype, tuple(t.shape))
        for k, t in trained.tensors.items()
    ]
    check_disk_space(folder, sum(s.nbytes for s in specs))
    writer = ShardWriter(folder, plan_shards(specs, max_shard_bytes))
    try:
        for key, tensor in interpolated_tensors(base, trained, scale):
            writer.add(key, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    finally:
        writer.close()
    writer.finish()
    write_config_files(folder, trained, dtype)
    return {
        "tokenizer_from": copy_tokenizer(folder, [trained.folder, base.folder]),
        "interpolated_tensors": len(specs),
        "output_bytes": sum(s.nbytes for s in specs),
    }

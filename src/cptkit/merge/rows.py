"""Embedding and output-head rows that an adapter changes outside LoRA's B @ A: a vocabulary grown in
training (the adapter saves the resized matrices it started from, the base has fewer rows), and trained
token rows (peft's `trainable_token_indices`: only the selected rows' values are saved).

The merge of such a tensor starts from the adapter's resized copy of the base matrix (the new rows as
training initialised them) where the base's own tensor is smaller, then writes the trained rows into it.
The tokenizer the merged model ships with must not name more ids than its embedding has rows.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from cptkit.errors import CptkitError
from cptkit.merge.scale import interpolated

log = logging.getLogger(__name__)

INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass
class TokenRows:
    """Trained values of some rows of one matrix (peft trainable tokens): row `indices[i]` is `values[i]`."""

    indices: list[int]
    values: torch.Tensor

    def same_as(self, other: TokenRows) -> bool:
        return self.indices == other.indices and torch.equal(self.values, other.values)


def token_indices(config: dict, module: str) -> list[int] | None:
    """The rows peft trained for `module` (a dotted name) by the adapter config's
    `trainable_token_indices`: a list means the input embedding; a dict maps a module name (its last parts)
    to a list. None when the config names no rows for this module."""
    spec = config.get("trainable_token_indices")
    if not spec:
        return None
    if isinstance(spec, list):
        return list(spec) if f"{module}.weight".endswith(INPUT_EMBEDDINGS) else None
    for name, indices in spec.items():
        if module == name or module.endswith(f".{name}"):
            return list(indices)
    return None


def is_input_embedding(key: str) -> bool:
    return key.endswith(INPUT_EMBEDDINGS)


def with_rows(start: torch.Tensor, rows: TokenRows, scale: float = 1.0) -> torch.Tensor:
    """`start` (float32 copy) with the trained rows written in; `scale` < 1 moves each row only that part
    of the way from its start value."""
    out = start.to(torch.float32, copy=True)
    index = torch.tensor(rows.indices, dtype=torch.long)
    out[index] = interpolated(out[index], rows.values.to(torch.float32), scale).to(torch.float32)
    return out


def interpolated_rows(base: torch.Tensor, trained: torch.Tensor, scale: float) -> torch.Tensor:
    """base + scale * (trained - base) for a trained matrix that may have more rows than the base (a grown
    vocabulary): the base's rows are interpolated, the new rows, which the base has no value for, are kept
    as trained."""
    if scale == 1 or tuple(base.shape) == tuple(trained.shape):
        return interpolated(base, trained, scale)
    rows = base.shape[0]
    top = interpolated(base, trained[:rows], scale).to(torch.float32)
    return torch.cat([top, trained[rows:].to(torch.float32)])


def grows_rows(base_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """A matrix of `shape` is the base's of `base_shape` with rows added (an extended vocabulary)."""
    return len(base_shape) == len(shape) == 2 and shape[1] == base_shape[1] and shape[0] > base_shape[0]


def tokenizer_size(folder: Path) -> int | None:
    """How many ids the tokenizer in `folder` can produce (its highest id + 1), read from tokenizer.json;
    None when the folder has no tokenizer.json (a slow tokenizer: not checked)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = (data.get("model") or {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
    ids += [t["id"] for t in data.get("added_tokens") or []]
    return max(ids) + 1 if ids else None


def check_tokenizer_fits(tokenizer_dir: Path, rows: int | None, where: Path) -> None:
    """Refuse, before any work, a merge whose tokenizer names ids the merged embedding has no row for."""
    size = tokenizer_size(tokenizer_dir)
    if size is None or rows is None or size <= rows:
        return
    raise CptkitError(
        f"{where}: the tokenizer in {tokenizer_dir} has {size} tokens but the trained input embedding has "
        f"only {rows} rows, so ids {rows}..{size - 1} would have no embedding. The adapter was trained "
        "without the extended vocabulary: train again on the prepared dataset whose tokenizer this is "
        "(train resizes the embeddings to it), or put the tokenizer the adapter was trained with beside it"
    )


def adapter_embedding_rows(adapter_dir: str | Path) -> int | None:
    """Rows of the input embedding an adapter was trained with, read from its weights file's header
    (no tensor loaded): more than its base's when training extended the vocabulary (peft then saves the
    resized embedding); None when the adapter holds no embedding matrix."""
    from cptkit.merge.checkpoint import read_header

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    header, _ = read_header(path)
    rows = [
        v["shape"][0]
        for k, v in header.items()
        if k != "__metadata__"
        and len(v["shape"]) == 2
        and any(f".{e[:-7]}." in k for e in INPUT_EMBEDDINGS)
        and not re.search(r"lora_|trainable_tokens_delta", k)
    ]
    return max(rows) if rows else None

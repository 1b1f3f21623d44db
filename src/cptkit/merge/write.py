"""Writing a model folder safely: shards planned up front, room checked first, a temp folder renamed last.

A reader never finds a half-written model under the final name: everything goes into a hidden
`.<name>.partial` folder beside it, which is removed on failure and renamed into place on success.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (GB = 10^9 as in transformers, GiB = 2^30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not m:
        raise CptkitError(f"merge.max_shard_size: {text!r} is not a size like 5GB or 500MB")
    return int(float(m[1]) * _UNITS[m[2] or "B"])


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Receives tensors in plan order and writes each shard as soon as it is complete."""

    def __init__(self, folder: Path, shards: list[list[str]]):
        self.folder = folder
        self.names = shard_names(len(shards))
        self.shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
        self.remaining = [set(keys) for keys in shards]
        self.buffer: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        i = self.shard_of[key]
        self.buffer[key] = tensor.contiguous()
        self.remaining[i].discard(key)
        if not self.remaining[i]:
            self._flush(i)

    def _flush(self, i: int) -> None:
        from safetensors.torch import save_file

        name = self.names[i]
        save_file(self.buffer, str(self.folder / name), metadata={"format": "pt"})
        for key, t in self.buffer.items():
            self.weight_map[key] = name
            self.total_size += t.numel() * t.element_size()
        self.buffer = {}

    def finish(self) -> None:
        missing = [k for rem in self.remaining for k in rem]
        if missing:
            raise RuntimeError(f"shard plan not complete: {missing[:3]}")
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_disk_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start a write that cannot finish: the free space must hold the output plus 5%."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes * 1.05:
        raise CptkitError(
            f"{folder}: not enough disk space: the merged model needs about {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free on {probe}; free some space or set merge.output_dir elsewhere"
        )


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final`, on any failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)

"""Writing a model folder safely: shards planned and streamed, room checked first, a temp folder renamed last.

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
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from cptkit.disk import FreeSpace, check_free_space, free_bytes, reporting_disk_full
from cptkit.errors import CptkitError
from cptkit.locks import folder_lock
from cptkit.merge.checkpoint import DTYPE_BYTES, SAFETENSORS_DTYPES
from cptkit.paths import MERGE_REPORT

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


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@dataclass
class TensorSpec:
    """What will be written for one tensor: known before any data, so a shard's header comes first."""

    key: str
    dtype: str  # safetensors name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


class ShardWriter:
    """Writes safetensors shards tensor by tensor as they arrive, in plan order, holding none in memory.

    Each shard's header (names, dtypes, shapes, offsets) is written when its first tensor arrives;
    each tensor's bytes follow as soon as it is computed.
    """

    def __init__(self, folder: Path, shards: list[list[TensorSpec]]):
        self.folder = folder
        self.shards = shards
        self.names = shard_names(len(shards))
        self.position = [(i, j) for i, shard in enumerate(shards) for j in range(len(shard))]
        self.next = 0
        self.file: BinaryIO | None = None
        self.weight_map = {spec.key: self.names[i] for i, shard in enumerate(shards) for spec in shard}
        self.total_size = sum(spec.nbytes for shard in shards for spec in shard)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        i, j = self.position[self.next]
        spec = self.shards[i][j]
        if (
            key != spec.key
            or SAFETENSORS_DTYPES[tensor.dtype] != spec.dtype
            or tuple(tensor.shape) != spec.shape
        ):
            raise RuntimeError(f"shard plan mismatch at {key}: expected {spec}")
        if j == 0:
            self.file = open(self.folder / self.names[i], "wb")  # noqa: SIM115 - closed after the shard's last tensor
            self.file.write(_header(self.shards[i]))
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.next += 1
        if j == len(self.shards[i]) - 1:
            self.file.close()
            self.file = None

    def finish(self) -> None:
        if self.next != len(self.position):
            raise RuntimeError(f"shard plan not complete: {len(self.position) - self.next} tensors missing")
        if len(self.names) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items())),
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _header(specs: list[TensorSpec]) -> bytes:
    """The safetensors header: 8-byte little-endian length, then JSON padded with spaces to 8 bytes."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.key] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def check_disk_space(folder: Path, needed_bytes: int, free_space: FreeSpace = free_bytes) -> None:
    """Refuse to start a merge that cannot finish: the free space must hold the output plus 5%."""
    check_free_space(
        folder,
        needed_bytes,
        "the merged model",
        "free some space or set merge.output_dir elsewhere",
        free_space,
    )


@contextlib.contextmanager
def atomic_folder(final: Path, command: str = "cptkit merge", marker: str = MERGE_REPORT) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final`, on any failure it is removed.

    `final` is locked meanwhile (see `cptkit.locks`; `command` names the holder), so a second writer
    refuses rather than removing this one's temp folder; a full disk is a one-line error. An existing
    `final` is replaced only when it is what this writer wrote before (it holds `marker`)."""
    final = Path(final)
    _check_replaceable(final, marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(final, command), reporting_disk_full(final, "free some space or write it elsewhere"):
        tmp = final.parent / f".{final.name}.partial"
        if tmp.exists():  # left by a run that was killed: nobody else writes it while we hold the lock
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


def _check_replaceable(final: Path, marker: str) -> None:
    """Never replace (and so delete) a folder of files that no cptkit run wrote."""
    if not final.is_dir() or (final / marker).is_file():
        return
    found = sorted(p.name for p in final.iterdir())
    if found:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise CptkitError(
            f"{final} holds files that cptkit did not write ({shown}; no {marker}); choose another "
            "output folder, or move them away"
        )


def promote(chosen: Path, root: Path) -> None:
    """Move the kept variant's files from its subfolder to `root` and drop the other variants' subfolders."""
    if chosen == root:
        return
    for f in chosen.iterdir():
        shutil.move(str(f), root / f.name)
    for sub in [p for p in root.iterdir() if p.is_dir()]:
        shutil.rmtree(sub)

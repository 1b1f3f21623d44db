"""A model folder's safetensors weights, listed without loading them, and read back one tensor at a time.

Tensors are read with plain file reads at the offsets the safetensors header gives, not through a
memory map: a mapped 5 GB shard counts fully in the process's resident memory once read, while a read
tensor is freed as soon as it is written out.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from cptkit.errors import CptkitError

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "BF16", "F16"}
TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class TensorInfo:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors name: BF16, F32, ...
    start: int = 0  # byte offsets of the data in the file
    end: int = 0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Checkpoint:
    """The weights of a model folder, in file order (so each file is opened once when streaming)."""

    folder: Path
    tensors: dict[str, TensorInfo]

    def files(self) -> list[Path]:
        return list(dict.fromkeys(t.file for t in self.tensors.values()))

    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text(encoding="utf-8"))


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the file offset where its data begins."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def read_tensor(info: TensorInfo, f: BinaryIO, data_start: int) -> torch.Tensor:
    """One tensor read from an open file into fresh memory (no map, no extra copy)."""
    buf = torch.empty(info.end - info.start, dtype=torch.uint8)
    f.seek(data_start + info.start)
    if buf.numel() and f.readinto(memoryview(buf.numpy())) != buf.numel():
        raise CptkitError(f"{info.file}: truncated while reading {info.key}; the file is damaged")
    return buf.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def resolve_model_folder(name_or_path: str) -> Path:
    """A local model folder for `name_or_path`; a hub name is fetched through the HF cache if it can be."""
    path = Path(name_or_path)
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
            )
        )
    # no hub client (ImportError); offline, unknown repo, no access (OSError); not a valid repo id (ValueError)
    except (ImportError, OSError, ValueError) as e:
        raise CptkitError(
            f"{name_or_path}: not a local folder, and it could not be fetched from the hub ({e}); "
            "download it first (`hf download NAME --local-dir DIR`) and point to DIR"
        ) from None


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """List a model folder's safetensors tensors; say plainly when the folder holds no usable weights."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CptkitError(f"{folder}: not a model folder (no config.json)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (found {', '.join(other[:3])}: convert to safetensors first)" if other else ""
        raise CptkitError(f"{folder}: model folder without weights: no *.safetensors{hint}")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CptkitError(
                f"{folder}: weight file {name} named in the index is missing; the download is incomplete"
            )
        try:
            header, _ = read_header(path)
        except (struct.error, ValueError) as e:
            raise CptkitError(f"{path}: not a readable safetensors file ({e})") from None
        entries = sorted(
            ((k, v) for k, v in header.items() if k != "__metadata__"),
            key=lambda kv: kv[1]["data_offsets"][0],
        )
        for key, v in entries:
            tensors[key] = TensorInfo(key, path, tuple(v["shape"]), v["dtype"], *v["data_offsets"])
    return Checkpoint(folder, tensors)


class TensorReader:
    """Tensors of a checkpoint read by name, in any order, each file opened once (a context manager):
    for walking one checkpoint while taking the same tensors from another."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._open: dict[Path, tuple[BinaryIO, int]] = {}

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        for f, _ in self._open.values():
            f.close()
        self._open.clear()

    def read(self, key: str) -> torch.Tensor:
        info = self.checkpoint.tensors[key]
        if info.file not in self._open:
            _, data_start = read_header(info.file)
            self._open[info.file] = (open(info.file, "rb"), data_start)  # noqa: SIM115 - closed in __exit__
        f, data_start = self._open[info.file]
        return read_tensor(info, f, data_start)

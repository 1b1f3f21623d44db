"""A model folder's safetensors weights, listed without loading them (names, shapes, dtypes, files)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class TensorInfo:
    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors name: BF16, F32, ...

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
    except Exception as e:  # offline, unknown repo, no access: all the same to the user
        raise CptkitError(
            f"{name_or_path}: not a local folder, and it could not be fetched from the hub ({e}); "
            "download it first (`hf download NAME --local-dir DIR`) and point to DIR"
        ) from None


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """List a model folder's safetensors tensors; say plainly when the folder holds no usable weights."""
    from safetensors import safe_open

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
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                tensors[key] = TensorInfo(key, path, tuple(sl.get_shape()), sl.get_dtype())
    return Checkpoint(folder, tensors)

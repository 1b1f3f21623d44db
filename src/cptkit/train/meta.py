"""run_meta.json: what made a training run, and what it measured."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from cptkit.outputs import now, versions, write_json
from cptkit.paths import RUN_META


def hardware() -> dict[str, Any]:
    """The machine a run trained on: GPUs (name, memory, count), or the CPU."""
    info: dict[str, Any] = {"machine": platform.machine(), "processor": platform.processor() or None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpus_per_node=torch.cuda.device_count(),
            cuda=torch.version.cuda,
        )
    return info


def write_run_meta(output_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into run_meta.json (created with versions and hardware on first write)."""
    path = Path(output_dir) / RUN_META
    meta = json.loads(path.read_text()) if path.is_file() else {"created": now()}
    meta.update(versions=versions(), hardware=hardware(), updated=now(), **fields)
    write_json(path, meta)
    return meta

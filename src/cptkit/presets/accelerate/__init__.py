"""accelerate configs shipped with cptkit: DeepSpeed ZeRO-1 (the seed's), ZeRO-2, ZeRO-3, FSDP2, DDP.

`python -m cptkit.presets.accelerate` lists them; `python -m cptkit.presets.accelerate zero1` prints
one path, for `accelerate launch --config_file $(...) -m cptkit train run.yaml`. The DeepSpeed JSON
files (`ds_zero1.json` ...) are the same settings for `train.hf.deepspeed`.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent
PRESETS = {
    "zero1": "DeepSpeed ZeRO-1: optimizer states sharded (the seed's ds.json)",
    "zero2": "DeepSpeed ZeRO-2: optimizer states and gradients sharded",
    "zero3": "DeepSpeed ZeRO-3: weights too; for full training of models that do not fit one GPU",
    "fsdp2": "PyTorch FSDP2, per decoder layer; no DeepSpeed needed",
    "ddp": "plain data parallel; fastest when the model fits on each GPU",
}


def path(name: str) -> Path:
    """The accelerate config file of a preset (`zero1`, ..., or `ds_zero1.json` for the JSON)."""
    if name.endswith(".json"):
        found = FOLDER / name
    else:
        found = FOLDER / f"{name}.yaml"
    if not found.is_file():
        from cptkit.errors import CptkitError

        raise CptkitError(f"no accelerate preset {name!r}; known: {', '.join(PRESETS)}")
    return found

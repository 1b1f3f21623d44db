"""Shipped configs: the demo, the seed-compatible preset, recommended presets, accelerate launch configs.

A preset is named by its file name without `.yaml` (e.g. `seed-llama3-8b-qlora`) wherever a config
path is expected; `python -m cptkit.presets` lists them and `python -m cptkit.presets NAME` prints
the file's path (for `accelerate launch --config_file`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cptkit.errors import CptkitError


def folder() -> Path:
    """The presets folder inside the installed package."""
    return Path(str(resources.files("cptkit") / "presets"))


def names() -> list[str]:
    """Names of the run presets (top-level YAML files), sorted."""
    return sorted(p.stem for p in folder().glob("*.yaml"))


def path(name: str) -> Path:
    """The file of a preset: a run preset by name (`demo`) or any shipped file (`accelerate/zero1.yaml`)."""
    base = folder()
    for candidate in (base / name, base / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(names())
    raise CptkitError(f"no preset named {name!r}; shipped presets: {shipped} (and accelerate/*.yaml)")


def resolve(config: str) -> str:
    """A config argument as a file path: an existing file as is, else a shipped preset's path."""
    if Path(config).is_file():
        return config
    try:
        return str(path(config))
    except CptkitError:
        return config  # let the config loader report the missing file in its own words

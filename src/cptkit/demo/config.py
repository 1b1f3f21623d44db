"""The demo's config: the shipped `demo` (or `demo-gpu`) preset with the paths the demo built."""

from __future__ import annotations

from pathlib import Path

from cptkit import presets
from cptkit.config import Config, build_config
from cptkit.config.load import read_yaml

# How much general text the base model writes for each size of demo.
GENERAL_TEXT = {"cpu": {"samples": 48, "max_new_tokens": 160}, "gpu": {"samples": 512, "max_new_tokens": 256}}


def demo_config(
    run_dir: Path,
    model_dir: Path,
    corpora: dict[str, Path],
    gpu: bool = False,
    general_name: str | None = None,
) -> Config:
    """The preset, pointed at `model_dir`, the corpora (role -> folder) and `run_dir`; `general_name`
    renames the general source (the fallback's general text is not SmolLM2's).

    eval compares the base and the merged model only: the adapter on the base is the same function
    as the merged model, and a third pass over the held-out sets would cost a CPU a minute."""
    name = "demo-gpu" if gpu else "demo"
    data, lines = read_yaml(presets.path(name))
    data["run_dir"] = str(run_dir)
    data["model"]["name_or_path"] = data["data"]["tokenizer"] = str(model_dir)
    for source in data["data"]["sources"]:
        source["path"] = str(corpora[source["role"]])
        if source["role"] == "general" and general_name:
            source["name"] = general_name
    data.setdefault("eval", {})["models"] = [
        {"name": "base", "path": str(model_dir)},
        {"name": "merged", "path": str(run_dir / "merged")},
    ]
    return build_config(Config, data, lines, source=f"preset {name}")

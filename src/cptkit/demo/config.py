"""The demo's config: the shipped `demo` (or `demo-gpu`) preset with the paths the demo built."""

from __future__ import annotations

from pathlib import Path

from cptkit import presets
from cptkit.config import Config, build_config
from cptkit.config.load import read_yaml

CHAT_PROBE = "chat_probe.jsonl"  # cptkit's neutral instruction set, for an instruction-tuned base


def demo_config(
    run_dir: Path,
    model_dir: Path,
    corpora: dict[str, Path],
    gpu: bool = False,
    general_name: str | None = None,
    chat: bool = False,
) -> Config:
    """The preset, pointed at `model_dir`, the corpora (role -> folder) and `run_dir`. A role without a
    corpus keeps the preset's source (the general text the base model writes itself); one with a corpus
    reads it instead, renamed `general_name` for the general role (the fallback's general text is not
    SmolLM2's). `chat` (an instruction-tuned base) turns on the chat-retention probe.

    eval compares the base and the merged model only: the adapter on the base is the same function
    as the merged model, and a third pass over the held-out sets would cost a CPU a minute."""
    name = "demo-gpu" if gpu else "demo"
    data, lines = read_yaml(presets.path(name))
    data["run_dir"] = str(run_dir)
    data["model"]["name_or_path"] = data["data"]["tokenizer"] = str(model_dir)
    for source in data["data"]["sources"]:
        if source["role"] not in corpora:
            continue
        for key in ("type", "self_replay"):
            source.pop(key, None)
        source["path"] = str(corpora[source["role"]])
        if source["role"] == "general" and general_name:
            source["name"] = general_name
    if chat:
        data.setdefault("eval", {})["chat_probe"] = {"path": str(presets.path(CHAT_PROBE))}
    data.setdefault("eval", {})["models"] = [
        {"name": "base", "path": str(model_dir)},
        {"name": "merged", "path": str(run_dir / "merged")},
    ]
    return build_config(Config, data, lines, source=f"preset {name}")

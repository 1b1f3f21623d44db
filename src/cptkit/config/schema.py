"""The whole config file: one optional section per stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cptkit.config.data import DataConfig
from cptkit.config.evaluate import EvalConfig, MergeConfig
from cptkit.config.fields import opt
from cptkit.config.model import ModelConfig
from cptkit.config.sft import SftConfig
from cptkit.config.train import TrainConfig

STAGES = ("prepare", "train", "merge", "eval", "report", "sft")


@dataclass
class Config:
    """A cptkit run. Each command reads the sections it needs; `cptkit run` runs every stage configured."""

    run_dir: str | None = opt(
        None, "folder for every stage's output; a stage's output_dir overrides its part"
    )
    seed: int = opt(1234, "global seed for training")
    data: DataConfig | None = opt(None, "cptkit prepare")
    model: ModelConfig | None = opt(None, "the base model")
    train: TrainConfig | None = opt(None, "cptkit train")
    merge: MergeConfig | None = opt(None, "cptkit merge")
    eval: EvalConfig | None = opt(None, "cptkit eval")
    sft: SftConfig | None = opt(None, "cptkit sft")

    def check(self, path: str):
        problems = []
        for name, section in (
            ("data", self.data),
            ("train", self.train),
            ("merge", self.merge),
            ("eval", self.eval),
            ("sft", self.sft),
        ):
            if section is not None and getattr(section, "output_dir", None) is None and self.run_dir is None:
                problems.append(
                    (f"{name}.output_dir", "not set, and no run_dir to put it under: set one of them")
                )
        return problems

    # Where each stage writes, resolved once here so every command agrees.
    def stage_dir(self, stage: str) -> Path:
        own = {
            "prepare": self.data,
            "train": self.train,
            "merge": self.merge,
            "eval": self.eval,
            "sft": self.sft,
        }
        section = own.get(stage)
        explicit = getattr(section, "output_dir", None) if section is not None else None
        if explicit:
            return Path(explicit)
        default = {
            "prepare": "data",
            "train": "train",
            "merge": "merged",
            "eval": "eval",
            "report": "report",
            "sft": "sft",
        }
        if self.run_dir is None:
            from cptkit.errors import CptkitError

            raise CptkitError(f"{stage}: no output folder: set run_dir or the section's output_dir")
        return Path(self.run_dir) / default[stage]

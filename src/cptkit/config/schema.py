"""The whole config file: one optional section per stage."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cptkit.config.data import DataConfig
from cptkit.config.evaluate import EvalConfig, MergeConfig
from cptkit.config.export import ExportConfig
from cptkit.config.fields import opt
from cptkit.config.forgetting import forgetting_problems
from cptkit.config.grpo import GrpoConfig
from cptkit.config.model import ModelConfig
from cptkit.config.sft import SftConfig
from cptkit.config.train import TrainConfig


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
    grpo: GrpoConfig | None = opt(None, "cptkit grpo")
    export: ExportConfig | None = opt(None, "cptkit export")

    # blocks cptkit writes into each output's config.yaml for readers of the folder (the resolved
    # `paths:`); loading such a config.yaml back skips them, so it runs as the original did
    WRITTEN_KEYS: ClassVar[tuple[str, ...]] = ("paths",)

    def check(self, path: str):
        problems = []
        for name, section in (
            ("data", self.data),
            ("train", self.train),
            ("merge", self.merge),
            ("eval", self.eval),
            ("sft", self.sft),
            ("grpo", self.grpo),
            ("export", self.export),
        ):
            if section is not None and getattr(section, "output_dir", None) is None and self.run_dir is None:
                problems.append(
                    (f"{name}.output_dir", "not set, and no run_dir to put it under: set one of them")
                )
        if self.data is not None:
            problems += self.data.generator_problems("data", self.model.name_or_path if self.model else None)
        if self.data is not None and self.train is not None and self.train.dataset is None:
            problems += forgetting_problems(self.train, self.data)  # the rows train reads come from data
        return problems

    def stage_dir(self, stage: str) -> Path:
        """The output folder of `stage`, as `cptkit.paths.resolve` works it out."""
        from cptkit.paths import resolve

        return resolve(self).folder(stage)

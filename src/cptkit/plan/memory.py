"""The memory plan of a config on one GPU, without the model: its shape read on the meta device (from
the model's config.json only) and the memory part's planner (`cptkit.train.memory`), with the kernels a
GPU run would use (`expected_setup`): liger's fused loss, RMSNorm and SwiGLU unless turned off, the
fused LoRA path when lora.dropout is 0."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.model import ModelConfig
from cptkit.errors import CptkitError
from cptkit.model.shape import ModelShape, shape_from_config
from cptkit.plan.gpus import Gpu
from cptkit.plan.warnings import PlanWarning
from cptkit.train.memory import (
    MemoryPlan,
    MemorySetup,
    RunShape,
    expected_setup,
    parse_budget,
    plan_memory,
)


@dataclass(frozen=True)
class GpuMemory:
    """The plan on one GPU: what `auto` picks, and (when the config forces checkpointing) the forced one,
    which is what the run will use."""

    gpu: Gpu
    auto: MemoryPlan
    forced: MemoryPlan | None

    @property
    def used(self) -> MemoryPlan:
        """The plan the run gets: the forced one where the config forces, else auto's."""
        return self.forced or self.auto

    def warnings(self) -> list[PlanWarning]:
        out = []
        if not self.used.fits:
            over = (self.used.estimate.total - self.used.budget_bytes) / 2**30
            how = "train.gradient_checkpointing" if self.forced else "train.memory_budget"
            todo = (
                "set train.gradient_checkpointing: auto"
                if self.forced and self.auto.fits
                else "lower train.hf.per_device_train_batch_size (raise gradient_accumulation_steps), "
                "shorten data.seq_length, or use mode: qlora"
            )
            out.append(
                PlanWarning(
                    f"on {self.gpu.name} the predicted peak is {over:.1f} GiB over the budget: it will not fit",
                    how,
                    todo,
                )
            )
        elif self.forced and self.auto.relative_time < self.forced.relative_time - 1e-9:
            out.append(
                PlanWarning(
                    f"on {self.gpu.name} the forced {self.forced.checkpointing!r} checkpointing is "
                    f"x{self.forced.relative_time / self.auto.relative_time:.2f} slower than auto's "
                    f"{self.auto.checkpointing!r}, which fits",
                    "train.gradient_checkpointing",
                    "set it to auto",
                )
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "gpu": self.gpu.to_json(),
            "auto": self.auto.to_json(),
            "forced": self.forced.to_json() if self.forced else None,
            "fits": self.used.fits,
        }


def model_shape(model: ModelConfig, model_config: str | Path | None = None) -> ModelShape:
    """The shape of the config's model from its config.json (`model_config`: a config.json or a folder
    holding one, for a hub model not on disk); never weights, never the network."""
    from transformers import AutoConfig

    source = str(model_config) if model_config is not None else model.name_or_path
    try:
        config = AutoConfig.from_pretrained(
            source,
            local_files_only=True,
            trust_remote_code=model.trust_remote_code,
            **({"gguf_file": model.gguf_file} if model.gguf_file and model_config is None else {}),
        )
    except (OSError, ValueError) as e:
        if model_config is not None:
            raise CptkitError(f"--model-config {model_config}: not a model config.json ({e})") from None
        raise CptkitError(
            f"model.name_or_path: {model.name_or_path} is not on disk (cptkit plan reads no weights and "
            "goes to no network): pass --model-config PATH (the model's config.json), or download it "
            f"first (`huggingface-cli download {model.name_or_path} config.json`)"
        ) from None
    return shape_from_config(config)


def setup_for(cfg: Config, seq_length: int, micro_batch: int, shards: int = 1) -> MemorySetup:
    """The memory setup of a GPU run of `cfg.train` (`expected_setup`: the kernels it will run where
    liger-kernel is installed, unless the config turns them off), its weights split over `shards`
    processes (FSDP, ZeRO-3)."""
    return expected_setup(
        cfg.train,
        RunShape(seq_length, micro_batch),
        # auto turns liger's fused loss off where the lm_head is sharded (model/load.py)
        fused_cross_entropy=cfg.train.fused_cross_entropy == "on"
        or (cfg.train.fused_cross_entropy == "auto" and shards == 1),
        dtype_bytes=4 if cfg.model.dtype == "float32" else 2,
        shards=shards,
    )


def plan_on(gpu: Gpu, shape: ModelShape, setup: MemorySetup, budget: str | None, forced: Any) -> GpuMemory:
    """Auto's plan on `gpu` and, for a config that forces checkpointing (true/false), the forced one."""
    budget_bytes = parse_budget(budget, gpu.memory_bytes)
    auto = plan_memory(shape, setup, budget_bytes)
    return GpuMemory(
        gpu, auto, plan_memory(shape, setup, budget_bytes, forced=forced) if forced != "auto" else None
    )

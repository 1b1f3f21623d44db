"""TRL's GRPOTrainer as cptkit builds it: trl.GRPOConfig from cptkit's defaults under the user's `grpo.hf`
(the fields the grpo section owns set from it), the batch checked against TRL's rule that every generation
batch holds whole groups of completions, the policy loaded as `train` loads it (full, LoRA, QLoRA), cptkit's
schedule, and the callbacks `cptkit.train.fit.fit` reads (metrics.jsonl with TRL's names, checkpoint markers,
the NaN guard)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from cptkit.config.grpo import GrpoConfig
from cptkit.errors import CptkitError
from cptkit.paths import METRICS
from cptkit.train.arguments import hf_problems, hf_settings, report_to
from cptkit.train.callbacks import HeldoutEvalCallback, MetricsWriter
from cptkit.train.checkpoints import CheckpointCallback
from cptkit.train.guard import DivergenceGuard
from cptkit.train.schedules import make_scheduler

log = logging.getLogger(__name__)

TRL_HINT = 'pip install trl (or pip install "cptkit[grpo]")'

# trl.GRPOConfig fields the grpo section sets -> the grpo key to use instead (beside train's OWNED_BY:
# output_dir, report_to, gradient_checkpointing, the schedule's type and warmup, eval_steps)
GRPO_OWNED_BY = {
    "num_generations": "num_generations",
    "beta": "beta",
    "max_completion_length": "max_completion_length",
    "temperature": "temperature",
    "top_p": "top_p",
    "use_vllm": "generation",
    "vllm_mode": "generation",
    "vllm_gpu_memory_utilization": "vllm_gpu_memory_utilization",
    "reward_weights": "rewards[].weight",
    "warmup_steps": "schedule.warmup",
    "lr_scheduler_kwargs": "schedule",
    "activation_checkpointing": "gradient_checkpointing",
}

# cptkit's GRPO defaults under `grpo.hf`, beside train's (`hf_settings`): a step is one group of
# completions per prompt and costs a generation, so every step is logged and checkpoints come sooner
GRPO_DEFAULTS = {"logging_steps": 1, "save_steps": 100, "num_train_epochs": 1}
LEARNING_RATES = {"full": 1e-6, "lora": 1e-5, "qlora": 1e-5}


def require_trl() -> Any:
    """The trl module, or a CptkitError saying what to install."""
    try:
        import trl
    except ImportError as e:
        raise CptkitError(f"grpo needs trl ({e}); {TRL_HINT}") from None
    return trl


def owned_problems(grpo_cfg: GrpoConfig, path: str) -> list[tuple[str, str]]:
    """`grpo.hf` keys the grpo section sets itself, each with the key to use."""
    return [
        (f"{path}.hf.{key}", f"set by cptkit; use {path}.{GRPO_OWNED_BY[key]} instead")
        for key in grpo_cfg.hf
        if key in GRPO_OWNED_BY
    ]


def grpo_hf_problems(grpo_cfg: GrpoConfig, path: str) -> list[tuple[str, str]]:
    """Every problem of `grpo.hf` at config-check time: keys owned by the section, fields trl.GRPOConfig
    does not have, wrong types or ranges, what GRPOConfig itself refuses, and a batch that breaks TRL's
    divisibility rule (on one process; `grpo_arguments` checks again with the real number)."""
    try:
        trl = require_trl()
    except CptkitError as e:
        return [(path, str(e))]
    problems = owned_problems(grpo_cfg, path)
    settings = grpo_settings(grpo_cfg, on_gpu=False, dtype=torch.float32)
    batch = batch_problems(grpo_cfg, settings, path, num_processes=1)
    found = hf_problems(grpo_cfg, path, trl.GRPOConfig, settings=settings, owned=GRPO_OWNED_BY)
    if batch:  # GRPOConfig's own message says the same without the YAML path
        found = [(where, what) for where, what in found if "divisible by num_generations" not in what]
    return problems + found + batch


def grpo_settings(grpo_cfg: GrpoConfig, on_gpu: bool, dtype: torch.dtype, use_vllm: bool = False) -> dict:
    """The trl.GRPOConfig keyword arguments: train's defaults, cptkit's GRPO defaults, `grpo.hf` on top,
    then the fields the grpo section owns."""
    user = grpo_cfg.hf
    settings = hf_settings(grpo_cfg, on_gpu, dtype)
    for key, value in {**GRPO_DEFAULTS, "learning_rate": LEARNING_RATES[grpo_cfg.mode]}.items():
        if key not in user:
            settings[key] = value
    if "per_device_train_batch_size" not in user:
        # one prompt's group of completions per micro-batch: always divisible, whatever the group size
        settings["per_device_train_batch_size"] = grpo_cfg.num_generations
    if "per_device_eval_batch_size" not in user:
        settings["per_device_eval_batch_size"] = settings["per_device_train_batch_size"]
    settings.update(
        num_generations=grpo_cfg.num_generations,
        beta=grpo_cfg.beta,
        max_completion_length=grpo_cfg.max_completion_length,
        temperature=grpo_cfg.temperature,
        top_p=grpo_cfg.top_p,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=grpo_cfg.vllm_gpu_memory_utilization,
        reward_weights=[float(r.weight) for r in grpo_cfg.rewards],
        # the schedule is cptkit's (`CptGrpoTrainer.create_scheduler`): HF's named one stays constant
        lr_scheduler_type="constant",
    )
    # the memory plan (cptkit.train.checkpointing, applied while loading) recomputes the blocks it chose;
    # the Trainer's own switch (on by default in GRPOConfig) would recompute all of them on top.
    # transformers >= 5.2x names it activation_checkpointing and warns about the old name.
    settings[_checkpointing_field()] = False
    return settings


def _checkpointing_field() -> str:
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def batch_problems(
    grpo_cfg: GrpoConfig, settings: dict[str, Any], path: str, num_processes: int
) -> list[tuple[str, str]]:
    """TRL's rule: each generation batch (per_device_train_batch_size x processes x steps_per_generation,
    or generation_batch_size) holds whole groups of num_generations completions."""
    per_device = settings["per_device_train_batch_size"]
    if not isinstance(per_device, int) or per_device < 1:
        return []  # reported by the type and range checks
    given = settings.get("generation_batch_size")
    steps = settings.get("steps_per_generation") or settings.get("gradient_accumulation_steps", 1)
    if given is not None and settings.get("steps_per_generation") is not None:
        return []  # GRPOConfig refuses both at once, with its own message
    if not isinstance(steps, int) or steps < 1 or (given is not None and not isinstance(given, int)):
        return []
    size = given if given is not None else per_device * num_processes * steps
    groups = grpo_cfg.num_generations
    if size % groups == 0:
        return []
    if given is not None:
        how, key = f"generation_batch_size {given}", f"{path}.hf.generation_batch_size"
    else:
        step_key = (
            "steps_per_generation" if settings.get("steps_per_generation") else "gradient_accumulation_steps"
        )
        how = f"per_device_train_batch_size {per_device} x {num_processes} process(es) x {step_key} {steps}"
        key = (
            f"{path}.hf.per_device_train_batch_size"
            if "per_device_train_batch_size" in grpo_cfg.hf
            else (f"{path}.num_generations")
        )
    return [
        (
            key,
            f"the generation batch ({how} = {size}) must be a multiple of {path}.num_generations ({groups}): "
            "each prompt's completions are compared within their group; set per_device_train_batch_size to a "
            f"multiple of {groups} (or leave it unset: one group per micro-batch), or change num_generations",
        )
    ]


def grpo_arguments(
    grpo_cfg: GrpoConfig, output_dir: str | Path, on_gpu: bool, dtype: torch.dtype, seed: int = 1234
) -> Any:
    """trl.GRPOConfig for this run (generation through vLLM where `grpo.generation` picks it)."""
    from cptkit.generate import pick_engine

    trl = require_trl()
    use_vllm = on_gpu and pick_engine(grpo_cfg.generation, "grpo.generation") == "vllm"
    settings = grpo_settings(grpo_cfg, on_gpu, dtype, use_vllm=use_vllm)
    problems = owned_problems(grpo_cfg, "grpo") + batch_problems(
        grpo_cfg, settings, "grpo", num_processes=_num_processes()
    )
    if problems:
        raise CptkitError("; ".join(f"{where}: {what}" for where, what in problems))
    try:
        return trl.GRPOConfig(
            output_dir=str(output_dir), seed=seed, report_to=report_to(grpo_cfg), **settings
        )
    except (ValueError, TypeError) as e:
        raise CptkitError(f"grpo.hf: trl.GRPOConfig refused the settings: {e}") from None


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


class GrpoMetrics(TrainerCallback):
    """Each training log (TRL's names: loss, reward, rewards/<name>/mean, kl, completions/mean_length, ...)
    as one metrics.jsonl line with its step; `fit` reads `trained_tokens` (TRL's num_tokens: prompt and
    completion tokens seen) and `last` for the run summary."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer
        self.trained_tokens = 0
        self.last: dict[str, Any] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        self.trained_tokens = int(logs.get("num_tokens", self.trained_tokens))
        if torch.cuda.is_available():
            logs["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.last = {"peak_memory_gb": logs.get("peak_memory_gb")}
        self.writer.write({"type": "train", "step": state.global_step, **logs})

    def restore(self, checkpoint: str | Path) -> None:
        """Nothing to restore: TRL keeps its token count in the checkpoint's trainer state."""


def _trainer_class(trl: Any) -> type:
    class CptGrpoTrainer(trl.GRPOTrainer):
        """GRPOTrainer with cptkit's learning-rate schedule (cosine, WSD, linear, constant with
        min_lr_ratio and re-warming, as train and sft), which HF's named schedulers do not all offer."""

        def __init__(self, *args: Any, schedule: Any, settings: dict[str, Any], **kwargs: Any):
            self.schedule = schedule
            self.settings = settings  # `fit` checks a resumed checkpoint's batch against these
            super().__init__(*args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None):
            if self.lr_scheduler is None:
                self.lr_scheduler = make_scheduler(
                    optimizer or self.optimizer, self.schedule, num_training_steps
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return CptGrpoTrainer


def policy_run(grpo_cfg: GrpoConfig) -> GrpoConfig:
    """The grpo section as the model loader reads it, with the kernels that cannot serve generation off:
    the fused cross-entropy (GRPO computes its own per-token log-probabilities, never a labelled loss),
    fast LoRA (its fused autograd assumes a training forward; generation runs the same layers under
    no_grad with a growing cache) and regional compilation (every generated length is a new shape, so
    it would recompile each step). liger's RMSNorm/SwiGLU/RoPE stay as configured: they serve both."""
    asked = [
        f"grpo.{k}: on"
        for k in ("kernels.fast_lora", "kernels.compile", "fused_cross_entropy")
        if _on(grpo_cfg, k)
    ]
    if asked:
        log.warning(
            "%s: off for GRPO, whose completions are generated with the policy itself", ", ".join(asked)
        )
    kernels = dataclasses.replace(grpo_cfg.kernels, fast_lora="off", compile="off")
    return dataclasses.replace(grpo_cfg, fused_cross_entropy="off", kernels=kernels)


def _on(cfg: Any, dotted: str) -> bool:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value == "on"


def ready_tokenizer(tokenizer: Any) -> Any:
    """Left padding (each completion follows its prompt directly) and a pad token (eos where none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_grpo_trainer(
    grpo_cfg: GrpoConfig,
    loaded: Any,
    train_dataset: Any,
    reward_funcs: Sequence[Callable[..., list[float | None]]],
    weights: Sequence[float] | None,
    output_dir: str | Path,
    seed: int = 1234,
) -> tuple[Any, dict[str, Any]]:
    """A GRPOTrainer for `loaded` (from `load_model_and_tokenizer(.., policy_run(grpo_cfg))`) on
    `train_dataset` (rows with `prompt`, rendered text, and the columns the rewards read), with the rewards
    combined by `weights` (default: the rewards' weights in the config).

    Returns the trainer and the callbacks `fit` reads by name ("throughput": metrics.jsonl, "guard",
    "heldout": none here, the held-out prompts are scored before and after, "checkpoints")."""
    from cptkit.train.build import optimization_settings

    trl = require_trl()
    args = grpo_arguments(grpo_cfg, output_dir, torch.cuda.is_available(), loaded.dtype, seed)
    if weights is not None:
        args.reward_weights = [float(w) for w in weights]
    if len(args.reward_weights) != len(reward_funcs):
        raise CptkitError(
            f"grpo.rewards: {len(reward_funcs)} reward function(s) but {len(args.reward_weights)} weight(s)"
        )
    settings = optimization_settings(args, grpo_cfg)
    # cptkit applies save_total_limit itself, after marking a checkpoint complete (as train does)
    save_total_limit, args.save_total_limit = args.save_total_limit, None
    # generation needs the cache the training loader turned off (packed rows must not share one)
    loaded.model.config.use_cache = True
    writer = MetricsWriter(Path(output_dir) / METRICS, enabled=args.process_index == 0)
    # NaN/inf losses and gradients still stop the run; the collapse, zero-gradient and spike rules are
    # about a language-model loss: GRPO's loss sits near 0 and its gradient is 0 whenever a group's
    # completions all earn the same reward
    guard = DivergenceGuard(dataclasses.replace(grpo_cfg.guard, enabled=False))
    callbacks = {
        "throughput": GrpoMetrics(writer),
        "guard": guard,
        "heldout": HeldoutEvalCallback([], 0, 1, 0, writer),
        "checkpoints": CheckpointCallback(settings, save_total_limit, keep=[guard.keep]),
    }
    trainer = _trainer_class(trl)(
        model=loaded.model,
        reward_funcs=list(reward_funcs),
        args=args,
        train_dataset=train_dataset,
        processing_class=ready_tokenizer(loaded.tokenizer),
        callbacks=list(callbacks.values()),
        schedule=grpo_cfg.schedule,
        settings=settings,
    )
    return trainer, callbacks

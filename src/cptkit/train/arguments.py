"""transformers.TrainingArguments as cptkit builds them (its defaults under the user's `train.hf`), and the
checks of `train.hf` that run while the config is validated, before any model or tokenizer loads.

TrainingArguments checks some combinations of its fields, but not their types or ranges: a string
learning rate, a batch size of 0 or a negative save_steps pass it and fail much later in torch or the
DataLoader. So the fields are checked here against the dataclass's annotations and ranges first, and
then TrainingArguments itself is built, without choosing a device (see `_ArgumentsWithoutDevice`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Collection
from functools import cached_property
from pathlib import Path
from typing import Any, get_type_hints

import torch
from transformers import TrainingArguments

from cptkit.config.load import check_value, nearest_hint
from cptkit.config.train import OWNED_BY, TrainingRun
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)


def hf_settings(train_cfg: TrainingRun, on_gpu: bool, dtype: torch.dtype) -> dict[str, Any]:
    """cptkit's TrainingArguments defaults, then `train.hf` on top."""
    defaults: dict[str, Any] = {
        "learning_rate": 2e-5,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "logging_steps": 10,
        "save_steps": 500,
        "save_total_limit": 3,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        # mixed precision follows the model's dtype unless train.hf picks one (then only that one is on)
        "bf16": on_gpu and dtype == torch.bfloat16 and not train_cfg.hf.get("fp16"),
        "fp16": on_gpu and dtype == torch.float16 and not train_cfg.hf.get("bf16"),
        "dataloader_num_workers": 0,  # the collator runs in-process, where it counts tokens
        "dataloader_pin_memory": on_gpu,
        "remove_unused_columns": False,
        "logging_nan_inf_filter": False,  # a NaN loss must show, not be averaged away
        "ddp_find_unused_parameters": False,
        "eval_strategy": "no",  # held-out evaluation runs in HeldoutEvalCallback
        "save_strategy": "steps",
        "use_cpu": not on_gpu,
    }
    hf = {**defaults, **train_cfg.hf}
    hf.setdefault("per_device_eval_batch_size", hf["per_device_train_batch_size"])
    return hf


def report_to(train_cfg: TrainingRun) -> list[str] | str:
    return [r for r in train_cfg.report_to if r != "none"] or "none"


def training_arguments(
    train_cfg: TrainingRun, output_dir: str | Path, dtype: torch.dtype, seed: int
) -> TrainingArguments:
    """cptkit's defaults, then `train.hf` on top (checked when the config was loaded)."""
    hf = hf_settings(train_cfg, torch.cuda.is_available(), dtype)
    unknown = sorted(set(hf) - set(_fields()))
    if unknown:
        raise CptkitError(f"train.hf: unknown TrainingArguments field(s) {', '.join(unknown)}")
    args = TrainingArguments(output_dir=str(output_dir), seed=seed, report_to=report_to(train_cfg), **hf)
    if args.n_gpu > 1:
        # One process seeing several GPUs: HF would fall back to nn.DataParallel, which is slower than one
        # GPU with these kernels and breaks per-batch state. Train on one; scale out with accelerate launch.
        log.warning(
            "%d GPUs visible to one process: training on one. To use all of them: accelerate launch "
            "--config_file $(python -m cptkit.presets.accelerate ddp) --num_processes %d -m cptkit train CONFIG",
            args.n_gpu,
            args.n_gpu,
        )
        args._n_gpu = 1
    return args


# what TrainingArguments accepts but cannot use: (test, what the value must be)
_RANGES: dict[str, tuple[Any, str]] = {
    "learning_rate": (lambda v: v > 0, "must be a positive number, e.g. 2e-5"),
    "per_device_train_batch_size": (lambda v: v >= 1, "must be a positive integer"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "must be a positive integer"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "must be at least 1"),
    "num_train_epochs": (lambda v: v > 0, "must be positive (or set max_steps)"),
    "max_steps": (
        lambda v: v == -1 or v >= 0,
        "must be a positive integer, or -1 (or 0) to use num_train_epochs",
    ),
    "save_steps": (lambda v: v > 0, "must be positive (a number of steps, or a fraction of the run below 1)"),
    "logging_steps": (
        lambda v: v > 0,
        "must be positive (a number of steps, or a fraction of the run below 1)",
    ),
    "save_total_limit": (
        lambda v: v is None or v >= 0,
        "must not be negative (null or 0: keep every checkpoint)",
    ),
    "warmup_steps": (lambda v: v >= 0, "must be 0 or more"),
    "weight_decay": (lambda v: v >= 0, "must be 0 or more"),
    "max_grad_norm": (lambda v: v >= 0, "must be 0 or more (0: no clipping)"),
    "dataloader_num_workers": (lambda v: v >= 0, "must be 0 or more"),
    "adam_epsilon": (lambda v: v > 0, "must be positive"),
}
_SCALARS = (int, float, bool, str)


def hf_problems(
    train_cfg: TrainingRun,
    path: str,
    arguments: type = TrainingArguments,
    settings: dict[str, Any] | None = None,
    owned: Collection[str] = (),
) -> list[tuple[str, str]]:
    """Every problem of `<path>.hf`: unknown fields, wrong types, values out of range, and what
    `arguments` (TrainingArguments, or a subclass such as trl.GRPOConfig) itself refuses, each with its
    YAML path. `settings`: what the run builds `arguments` from (default: train's `hf_settings`);
    `owned`: keys besides OWNED_BY that the section's own check refuses."""
    fields = _fields(arguments)
    label = _label(arguments)
    problems: list[tuple[str, str]] = []
    owned = {*OWNED_BY, *owned}
    for key, value in train_cfg.hf.items():
        sub = f"{path}.hf.{key}"
        if key in owned:
            continue  # reported by the section's check, with the key to use instead
        if key not in fields:
            problems.append((sub, f"not a {label} field{nearest_hint(key, list(fields))}"))
            continue
        typed = _type_problems(fields[key], value, sub)
        problems += typed
        rule = _RANGES.get(key)
        if not typed and rule is not None and value is not None and not rule[0](value):
            problems.append((sub, f"{value!r} {rule[1]}"))
        if key == "deepspeed" and isinstance(value, str) and not value.lstrip().startswith("{"):
            if not Path(value).is_file():
                problems.append((sub, f"{value} does not exist (expected a DeepSpeed JSON config file)"))
    if problems:  # TrainingArguments' own checks assume the types are right
        return problems
    if settings is None:
        settings = hf_settings(train_cfg, on_gpu=False, dtype=torch.float32)
    settings = dict(settings)
    # checked above, or settings of the machine that trains (tf32 needs an Ampere GPU there, not here)
    for left_to_training in ("deepspeed", "tf32", "use_cpu", "output_dir", "report_to", *OWNED_BY):
        settings.pop(left_to_training, None)
    try:
        _without_device(arguments)(output_dir="unused", report_to="none", use_cpu=True, **settings)
    except (ValueError, TypeError, NotImplementedError) as e:
        problems.append((_field_named(str(e), train_cfg.hf, f"{path}.hf"), f"{label}: {e}"))
    return problems


def _label(arguments: type) -> str:
    """How messages name the arguments class: transformers.TrainingArguments, trl.GRPOConfig."""
    return f"{arguments.__module__.split('.')[0]}.{arguments.__name__}"


class _ArgumentsWithoutDevice(TrainingArguments):
    """TrainingArguments whose own checks run without choosing a device. Its `__post_init__` otherwise sets
    up accelerate's process-wide state (and under `accelerate launch` a process group) for the device asked;
    done while validating, that state would stay for the real run, on the wrong device."""

    @cached_property
    def _setup_devices(self) -> torch.device:
        self._n_gpu = 0
        return torch.device("cpu")


@functools.cache
def _without_device(arguments: type) -> type:
    """`arguments` with `_ArgumentsWithoutDevice`'s device choice (a subclass of both)."""
    if arguments is TrainingArguments:
        return _ArgumentsWithoutDevice
    # one process: the subclass's own checks (GRPOConfig's batch rule) read world_size, which asks the
    # distributed state that is never set up here
    one_process = {"world_size": property(lambda self: 1)}
    return type(f"_{arguments.__name__}WithoutDevice", (_ArgumentsWithoutDevice, arguments), one_process)


@functools.cache
def _fields(arguments: type = TrainingArguments) -> dict[str, Any]:
    """The init fields of `arguments` (TrainingArguments or a subclass) and their annotations."""
    hints = get_type_hints(arguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(arguments) if f.init}


def _is_simple(tp: Any) -> bool:
    """int, float, bool, str or an optional one: what the annotation alone can check (composite fields
    such as fsdp or deepspeed accept more than they are annotated with)."""
    options = [a for a in getattr(tp, "__args__", (tp,)) if a is not type(None)]
    return len(options) == 1 and options[0] in _SCALARS


def _type_problems(tp: Any, value: Any, path: str) -> list[tuple[str, str]]:
    if not _is_simple(tp):
        return []
    options = getattr(tp, "__args__", (tp,))
    if isinstance(value, str) and (int in options or float in options):
        # the config reader turns 2e-5 into a number; text would reach the optimizer or the DataLoader
        expected = "a number" if float in options else "an integer"
        quoted = " (remove the quotes)" if _is_number(value) else ""
        return [(path, f"expected {expected}, got the string {value!r}{quoted}")]
    return check_value(tp, value, path)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _field_named(message: str, hf: dict[str, Any], where: str) -> str:
    """The YAML path of the `train.hf` field a TrainingArguments message names, else the section."""
    lowered = message.lower()
    named = [key for key in hf if key.lower() in lowered]
    return f"{where}.{min(named, key=lambda key: lowered.index(key.lower()))}" if named else where

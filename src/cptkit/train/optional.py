"""The optional packages a config needs (bitsandbytes, deepspeed, liger-kernel, flash-attn, the trackers,
lm-eval for eval.tasks), checked before any model loads so that a missing one is a message with the extra
to install, not a traceback after minutes of loading."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainingRun
from cptkit.errors import CptkitError

# optional package -> (import name, how to install it)
OPTIONAL_PACKAGES = {
    "bitsandbytes": ("bitsandbytes", 'pip install "cptkit[qlora]"'),
    "deepspeed": ("deepspeed", 'pip install "cptkit[gpu]"'),
    "liger-kernel": ("liger_kernel", 'pip install "cptkit[gpu]"'),
    "flash-attn": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "wandb": ("wandb", 'pip install "cptkit[wandb]"'),
    "mlflow": ("mlflow", 'pip install "cptkit[mlflow]"'),
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "lm-eval": ("lm_eval", 'pip install "cptkit[eval]"'),
}


def optional_needs(
    train_cfg: TrainingRun, model_cfg: ModelConfig | None, section: str = "train"
) -> dict[str, str]:
    """The optional packages a config needs, each with the setting that needs it."""
    needs = {}
    if train_cfg.mode == "qlora":
        needs["bitsandbytes"] = f"{section}.mode: qlora"
    if train_cfg.hf.get("deepspeed"):
        needs["deepspeed"] = f"{section}.hf.deepspeed"
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        needs["deepspeed"] = "the accelerate config (DeepSpeed)"
    if train_cfg.fused_cross_entropy == "on":  # auto uses it only where it is installed
        needs["liger-kernel"] = f"{section}.fused_cross_entropy: on"
    for kernel in ("rms_norm", "swiglu", "rope"):  # liger's; auto uses each only where it applies
        if getattr(train_cfg.kernels, kernel) == "on":
            needs.setdefault("liger-kernel", f"{section}.kernels.{kernel}: on")
    if model_cfg is not None and model_cfg.attention == "flash_attention_2":
        needs["flash-attn"] = "model.attention: flash_attention_2"
    for tracker in ("wandb", "mlflow", "tensorboard"):
        if tracker in train_cfg.report_to:
            needs[tracker] = f"{section}.report_to: [{tracker}]"
    return needs


def is_installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (some are slow or touch the GPU)."""
    return importlib.util.find_spec(module) is not None


def check_optional_dependencies(
    train_cfg: TrainingRun,
    model_cfg: ModelConfig | None,
    section: str = "train",
    installed: Callable[[str], bool] = is_installed,
) -> None:
    """Every optional package the config needs is installed, before any model loads; all that are
    missing in one message, each with what needs it and how to install it. `installed(module)` says
    whether a module is there (the machine's packages, unless a caller asks about another machine)."""
    needs = optional_needs(train_cfg, model_cfg, section)
    missing = [f"{needs[p]} needs {install_hint(p)}" for p in missing_packages(list(needs), installed)]
    if missing:
        raise CptkitError("missing optional package(s): " + "; ".join(missing))


def refusals_for_missing_packages(cfg: Any, installed: Callable[[str], bool] = is_installed) -> list[str]:
    """What `cptkit train`, `cptkit sft` and the downstream tasks of `cptkit eval` of config `cfg` would
    refuse on this machine (or where `installed(module)` says) for want of an optional package (one
    message per section; none when all are installed)."""
    notes = []
    for section, run in (("train", cfg.train), ("sft", cfg.sft)):
        if run is None:
            continue
        try:
            check_optional_dependencies(run, cfg.model, section, installed)
        except CptkitError as e:
            notes.append(str(e))
    if cfg.eval is not None and cfg.eval.tasks and missing_packages(["lm-eval"], installed):
        notes.append(f"eval.tasks needs {install_hint('lm-eval')}, which is not installed")
    if getattr(cfg, "data", None) is not None:  # prepare's engine (datatrove, ray)
        from cptkit.data.executors import require_engine

        try:
            require_engine(cfg.data.executor)
        except CptkitError as e:
            notes.append(str(e))
    return notes


def missing_packages(packages: list[str], installed: Callable[[str], bool] = is_installed) -> list[str]:
    """Those of `packages` (names of OPTIONAL_PACKAGES) that are not installed."""
    unknown = [p for p in packages if p not in OPTIONAL_PACKAGES]
    if unknown:
        raise ValueError(f"not an optional package of cptkit: {', '.join(unknown)}")
    return [p for p in packages if not installed(OPTIONAL_PACKAGES[p][0])]


def install_hint(package: str) -> str:
    return f"{package} ({OPTIONAL_PACKAGES[package][1]})"


def main(argv: list[str]) -> int:
    """`python -m cptkit.train.optional PACKAGE...`: exit 1, naming what to install, if one is missing
    (for launch scripts, before `accelerate launch` fails on it)."""
    missing = missing_packages(argv)
    if missing:
        print(f"missing optional package(s): {'; '.join(map(install_hint, missing))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""`cptkit plan CONFIG.yaml [overrides] [--gpu NAME]`: what a run will do, before it runs: tokens per
source and in the mix, optimizer steps and tokens seen, the memory plan on a named GPU and on the one
present, the predicted tokens/s and wall time from the shipped calibration table, and the warnings
worth reading first. No weights are loaded and nothing is fetched: seconds on a CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cptkit.commands import load_for
from cptkit.config import Config
from cptkit.errors import CptkitError
from cptkit.model.flops import flops_per_token_of_shape
from cptkit.plan.calibration import Calibration
from cptkit.plan.estimate import SAMPLE_BYTES
from cptkit.plan.gpus import CATALOG, gpu_named, present_gpu
from cptkit.plan.memory import model_shape, plan_on, setup_for
from cptkit.plan.render import GpuTarget, PlanReport, render
from cptkit.plan.speed import predict_speed
from cptkit.plan.steps import plan_steps
from cptkit.plan.tokens import data_tokens
from cptkit.plan.warnings import plan_warnings

DEFAULT_GPU = "h200"  # planned for when none is named and none is present: the calibration table's GPU


def main(args) -> int:
    if args.gpu:
        gpu_named(args.gpu)  # an unknown name is refused before any work
    if args.num_gpus < 1 or not args.sample_mb > 0:
        raise CptkitError("--num-gpus must be at least 1 and --sample-mb above 0")
    cfg = load_for(args, "model", "train")
    report = run(
        cfg,
        gpu_name=args.gpu,
        model_config=args.model_config,
        world_size=args.num_gpus,
        sample_bytes=int(args.sample_mb * 1e6),
    )
    sys.stdout.write(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return 0


def run(
    cfg: Config,
    gpu_name: str | None = None,
    model_config: str | None = None,
    world_size: int = 1,
    sample_bytes: int = SAMPLE_BYTES,
) -> PlanReport:
    """The plan of `cfg` on the GPU named (and the one present); see the module docstring."""
    train, notes = cfg.train, []
    gpus = [gpu_named(gpu_name)] if gpu_name else []
    if (present := present_gpu()) is not None:
        gpus.append(present)
    if not gpus:
        gpus.append(CATALOG[DEFAULT_GPU])
        notes.append(
            f"no --gpu named and no GPU here: planned for {DEFAULT_GPU} (the calibration table's GPU)"
        )
    shape = model_shape(cfg.model, model_config)
    data = data_tokens(cfg, sample_bytes)
    steps = plan_steps(train, data, world_size)
    flops = flops_per_token_of_shape(
        shape,
        data.seq_length,
        train.mode,
        train.lora.r,
        train.lora.target_modules,
        train.lora.train_embeddings,
    )
    setup = setup_for(cfg, data.seq_length, steps.micro_batch)
    calibration = Calibration.load()
    targets = []
    for gpu in gpus:
        memory = plan_on(gpu, shape, setup, train.memory_budget, train.gradient_checkpointing)
        speed = predict_speed(
            calibration,
            gpu,
            memory.used,
            train.mode,
            shape.total_params(),
            train.lora.dropout,
            flops,
            steps.total_tokens,
            world_size,
        )
        targets.append(GpuTarget(memory, speed))
    warnings = plan_warnings(cfg, data, steps) + [w for t in targets for w in t.memory.warnings()]
    return PlanReport(train.mode, shape, flops, data, steps, targets, warnings, notes)

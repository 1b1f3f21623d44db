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
from cptkit.plan.calibration import Calibration
from cptkit.plan.estimate import SAMPLE_BYTES
from cptkit.plan.gpus import gpu_named, gpus_to_plan
from cptkit.plan.memory import model_shape, plan_on, setup_for
from cptkit.plan.render import GpuTarget, PlanReport, render
from cptkit.plan.speed import predict_speed, run_flops_per_token
from cptkit.plan.steps import plan_steps
from cptkit.plan.tokens import data_tokens
from cptkit.plan.warnings import plan_warnings


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
        sharded=args.sharded,
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
    sharded: bool = False,
) -> PlanReport:
    """The plan of `cfg` on the GPU named (and the one present), trained on `world_size` of them (each
    weight split over all of them when `sharded`); see the module docstring."""
    train = cfg.train
    gpus, notes = gpus_to_plan(gpu_name)
    shape = model_shape(cfg.model, model_config)
    data = data_tokens(cfg, sample_bytes)
    steps = plan_steps(train, data, world_size)
    flops = run_flops_per_token(train, shape, data.seq_length)
    setup = setup_for(cfg, data.seq_length, steps.micro_batch, shards=world_size if sharded else 1)
    calibration = Calibration.load()
    targets = []
    for gpu in gpus:
        memory = plan_on(gpu, shape, setup, train.memory_budget, train.gradient_checkpointing)
        speed = predict_speed(
            calibration, gpu, memory.used, train, shape, flops, steps.total_tokens, world_size
        )
        targets.append(GpuTarget(memory, speed))
    warnings = plan_warnings(cfg, data, steps) + [w for t in targets for w in t.memory.warnings()]
    return PlanReport(train.mode, shape, flops, data, steps, targets, warnings, notes)

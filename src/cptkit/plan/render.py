"""`cptkit plan`'s report: what it found, as text for the terminal and as JSON for `--json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cptkit.model.shape import ModelShape
from cptkit.plan.memory import GpuMemory
from cptkit.plan.speed import SpeedPrediction
from cptkit.plan.steps import StepPlan
from cptkit.plan.tokens import DataTokens
from cptkit.plan.warnings import PlanWarning


@dataclass(frozen=True)
class GpuTarget:
    """One GPU the run was planned for: its memory plan and the predicted speed."""

    memory: GpuMemory
    speed: SpeedPrediction

    def to_json(self) -> dict[str, Any]:
        return self.memory.to_json() | {"speed": self.speed.to_json()}


@dataclass(frozen=True)
class PlanReport:
    """Everything `cptkit plan` worked out for a config."""

    mode: str
    shape: ModelShape
    flops_per_token: float
    data: DataTokens
    steps: StepPlan
    targets: list[GpuTarget]
    warnings: list[PlanWarning]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {
                "mode": self.mode,
                "params": self.shape.total_params(),
                "layers": self.shape.layers,
                "hidden": self.shape.hidden,
                "flops_per_token": self.flops_per_token,
            },
            "data": self.data.to_json(),
            "steps": self.steps.to_json(),
            "gpus": [t.to_json() for t in self.targets],
            "warnings": [w.to_json() for w in self.warnings],
            "notes": self.notes,
        }


def render(report: PlanReport) -> str:
    """The report as the terminal shows it."""
    lines = [*_data_lines(report.data), "", *_step_lines(report.steps), ""]
    lines.append(
        f"Model: {report.shape.total_params() / 1e9:.2f}B parameters, {report.shape.layers} blocks, {report.mode}; "
        f"{report.flops_per_token / 1e9:.1f} GFLOP a token"
    )
    for target in report.targets:
        lines += ["", *_gpu_lines(target)]
    lines += ["", f"Warnings ({len(report.warnings)}):" if report.warnings else "Warnings: none"]
    lines += [f"  - {w}" for w in report.warnings]
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def _data_lines(data: DataTokens) -> list[str]:
    lines = [f"Data ({data.origin}):"]
    width = max(len(n) for n in data.sources) if data.sources else 6
    lines.append(
        f"  {'source':<{width}}  role     documents        tokens   held out   in the mix  share  factor"
    )
    for name, s in data.sources.items():
        lines.append(
            f"  {name:<{width}}  {s.role:<7} {s.documents:>10,} {s.tokens:>13,} {s.heldout_tokens:>10,} "
            f"{s.mixed_tokens:>12,} {data.share(name):>6.1%}  {s.sampling_factor:.2f}"
        )
    lines.append(
        f"  training rows: {data.rows:,} of {data.seq_length} tokens, {data.trained_tokens:,} tokens, "
        f"packing efficiency {data.packing_efficiency:.1%}"
    )
    return lines + [f"  note: {n}" for n in data.notes]


def _step_lines(steps: StepPlan) -> list[str]:
    how = "train.hf.max_steps" if steps.from_max_steps else "epochs x rows / rows per step"
    passes = ", ".join(f"{n} {e:.2f}" for n, e in steps.source_epochs.items())
    return [
        f"Steps: {steps.optimizer_steps:,} optimizer steps ({how}); {steps.rows_per_step} rows a step "
        f"({steps.micro_batch} a micro-batch x {steps.accumulation} accumulated x {steps.world_size} GPU(s)), "
        f"{steps.tokens_per_step:,} tokens a step, warmup {steps.warmup_steps:,}",
        f"  tokens seen: {steps.total_tokens:,} ({steps.epochs:.2f} epochs over the rows; passes over each "
        f"source: {passes or 'none'})",
    ]


def _gpu_lines(target: GpuTarget) -> list[str]:
    memory, speed = target.memory, target.speed
    gpu, used = memory.gpu, memory.used
    parts = ", ".join(
        f"{k} {v / 2**30:.1f}" for k, v in used.estimate.to_json().items() if k != "total" and v
    )
    lines = [
        f"GPU {gpu.name} ({gpu.label}, {gpu.memory_gib:.0f} GiB, {gpu.peak_bf16_tflops:g} bf16 TFLOP/s):",
        f"  {used.describe()}",
        f"  parts (GiB): {parts}",
    ]
    if memory.forced is not None:
        verdict = "fits" if memory.forced.fits else "does NOT fit"
        lines.append(
            f"  the config forces checkpointing {memory.forced.checkpointing}: {verdict}; auto would take:"
        )
        lines.append(f"    {memory.auto.describe()}")
    if speed.tokens_per_second is None:
        lines.append(f"  speed: {speed.how}")
    else:
        lines.append(
            f"  predicted: {speed.tokens_per_second:,.0f} tokens/s (MFU {speed.mfu:.1%}), {speed.hours:.2f} hours "
            "for the run"
        )
        lines.append(f"    from {speed.how}")
    return lines

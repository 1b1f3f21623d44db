"""What is worth reading before a run starts: each warning one line, saying what, where (its YAML
path) and what to do. The thresholds come from the seed's CPT practice (its section 5.3: a learning
rate of 2e-5 to 5e-5, 1 to 3 epochs, general text mixed in at about 30%) and from cptkit's fast paths."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cptkit.config import Config
from cptkit.plan.steps import StepPlan
from cptkit.plan.tokens import DataTokens

SEED_LR_RANGE = (2e-5, 5e-5)  # the seed's CPT learning rates (section 5.3): higher ones risk forgetting
MIN_REPLAY_SHARE = 0.01  # general (replay) share of the trained tokens below which forgetting goes unchecked
MIN_DOMAIN_SHARE = 0.10  # domain share below which the run mostly replays what the model knows
MAX_SOURCE_EPOCHS = 3.0  # the seed's most epochs over domain text before it overfits


@dataclass(frozen=True)
class PlanWarning:
    """One thing to look at: what, where in the config, what to do."""

    what: str
    where: str
    todo: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; {self.todo}"

    def to_json(self) -> dict:
        return asdict(self)


def plan_warnings(cfg: Config, data: DataTokens, steps: StepPlan) -> list[PlanWarning]:
    """The warnings of the data, the schedule and the adapter (the memory plan's come with it)."""
    return [
        *_mix_warnings(data),
        *_epoch_warnings(data, steps),
        *_schedule_warnings(cfg, steps),
        *_adapter_warnings(cfg),
    ]


def _mix_warnings(data: DataTokens) -> list[PlanWarning]:
    general = sum(data.share(n) for n, s in data.sources.items() if s.role == "general")
    domain = sum(data.share(n) for n, s in data.sources.items() if s.role == "domain")
    out = []
    if general < MIN_REPLAY_SHARE:
        what = (
            "no general (replay) text trains"
            if general == 0
            else f"general (replay) text is {general:.2%} of the mix"
        )
        out.append(
            PlanWarning(
                f"{what}: nothing holds back forgetting",
                "data.sources",
                "add a source with role: general at about 0.3 of the weight (the seed's 70/30 mix)",
            )
        )
    if data.trained_tokens and domain < MIN_DOMAIN_SHARE:
        out.append(
            PlanWarning(
                f"domain text is only {domain:.1%} of the mix: the run mostly replays what the model knows",
                "data.sources[*].weight",
                "raise the domain sources' weight (the seed mixes 70% domain)",
            )
        )
    return out


def _epoch_warnings(data: DataTokens, steps: StepPlan) -> list[PlanWarning]:
    out = []
    if steps.from_max_steps and steps.epochs > 1.001:
        out.append(
            PlanWarning(
                f"{steps.optimizer_steps:,} steps take {steps.epochs:.1f} epochs over {data.rows:,} training rows: "
                "the run repeats its data",
                "train.hf.max_steps",
                f"lower it to {_one_epoch_steps(data, steps):,} for one epoch, or add data",
            )
        )
    for index, (name, passes) in enumerate(steps.source_epochs.items()):
        if passes > MAX_SOURCE_EPOCHS and data.sources[name].role == "domain":
            out.append(
                PlanWarning(
                    f"source {name} is trained {passes:.1f} times over (above the seed's 1-3 epochs): it may be "
                    "memorised rather than learned",
                    f"data.sources[{index}].weight",
                    "lower its weight or the epochs (train.hf.num_train_epochs / max_steps), or add text",
                )
            )
    return out


def _one_epoch_steps(data: DataTokens, steps: StepPlan) -> int:
    return max(round(data.rows / steps.rows_per_step), 1)


def _schedule_warnings(cfg: Config, steps: StepPlan) -> list[PlanWarning]:
    from cptkit.train.arguments import hf_settings

    out = []
    lr = float(hf_settings(cfg.train, on_gpu=False, dtype=None)["learning_rate"])
    low, high = SEED_LR_RANGE
    if lr > high:
        out.append(
            PlanWarning(
                f"learning rate {lr:g} is above the seed's CPT range ({low:g} to {high:g}, its section 5.3), "
                "where forgetting grows",
                "train.hf.learning_rate",
                f"lower it to {high:g} or less, or watch the general held-out loss (train.forgetting_budget)",
            )
        )
    if steps.optimizer_steps and steps.warmup_steps >= steps.optimizer_steps:
        out.append(
            PlanWarning(
                f"the warmup ({steps.warmup_steps:,} steps) is as long as the run ({steps.optimizer_steps:,}): "
                "the learning rate never reaches its peak",
                "train.schedule.warmup",
                "use a fraction below 1 (e.g. 0.05) or fewer steps than the run",
            )
        )
    if steps.optimizer_steps == 0:
        out.append(
            PlanWarning("the run takes no optimizer step", "train.hf", "add data, or set max_steps or epochs")
        )
    return out


def _adapter_warnings(cfg: Config) -> list[PlanWarning]:
    train = cfg.train
    if train.mode in ("lora", "qlora") and train.lora.dropout > 0:
        return [
            PlanWarning(
                f"lora.dropout {train.lora.dropout:g} turns off the fused LoRA path (it needs 0): slower and "
                "more memory",
                "train.lora.dropout",
                "set it to 0 unless the dropout is wanted",
            )
        ]
    return []

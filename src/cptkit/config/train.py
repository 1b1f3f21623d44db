"""The `train` section: continued pretraining with full, LoRA or QLoRA training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cptkit.config.fields import opt
from cptkit.config.forgetting import RegularizeConfig


@dataclass
class LoraConfig:
    """LoRA adapter shape (used by mode lora and qlora)."""

    r: int = opt(16, "rank")
    alpha: float = opt(32, "scaling numerator (the update is scaled by alpha / r)")
    dropout: float = opt(
        0.0,
        "dropout on the adapter input; 0 (the default) takes the fused fast path (train.kernels.fast_lora), "
        "above 0 peft's own path (the seed used 0.05)",
    )
    target_modules: list[str] | str = opt(
        "all-linear", "module names to adapt, or all-linear (the seed used [q_proj, v_proj])"
    )
    train_embeddings: bool = opt(False, "also train the input embeddings and lm_head in full")
    embedding_lr: float | None = opt(
        None, "learning rate for embeddings/lm_head when trained (default: the main lr)"
    )
    use_rslora: bool = opt(False, "rank-stabilised scaling alpha / sqrt(r)")

    def check(self, path: str):
        problems = []
        if self.r < 1:
            problems.append((f"{path}.r", f"{self.r}: rank must be at least 1"))
        if not 0 <= self.dropout < 1:
            problems.append((f"{path}.dropout", f"{self.dropout} must be in [0, 1)"))
        if self.alpha <= 0:
            problems.append((f"{path}.alpha", f"{self.alpha} must be positive"))
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            problems.append((f"{path}.embedding_lr", f"{self.embedding_lr} must be a positive learning rate"))
        return problems


@dataclass
class NewTokensConfig:
    """The rows of the tokens data.vocabulary added (input embeddings and output head, tied or not)."""

    init: Literal["mean", "mean_noise"] = opt(
        "mean", "each new row the mean of the rows of its base pieces; mean_noise adds gaussian noise"
    )
    noise: float = opt(0.02, "mean_noise: the noise's std, as a fraction of the base rows' std")
    train: Literal["new", "all"] = opt(
        "new",
        "new: only the new rows train (LoRA/QLoRA: peft's trainable tokens, saved with the adapter); all: "
        "the whole input embeddings and head (LoRA/QLoRA: as lora.train_embeddings)",
    )

    def check(self, path: str):
        if self.noise < 0:
            return [(f"{path}.noise", f"{self.noise} must be 0 or more")]
        return []


@dataclass
class QuantizationConfig:
    """Base-model quantisation for mode qlora (bitsandbytes)."""

    bits: Literal[4, 8] = opt(4, "4: NF4/FP4; 8: LLM.int8")
    quant_type: Literal["nf4", "fp4"] = opt("nf4", "4-bit data type")
    double_quant: bool = opt(True, "quantise the quantisation constants too")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = opt(
        "bfloat16", "dtype of the dequantised matmuls"
    )


@dataclass
class ScheduleConfig:
    """Learning-rate schedule."""

    type: Literal["cosine", "wsd", "linear", "constant"] = opt(
        "cosine", "cosine decay, or warmup-stable-decay (wsd), linear decay, constant"
    )
    warmup: float = opt(0.1, "warmup: a fraction of the steps if below 1, else a number of steps")
    decay: float = opt(0.2, "wsd only: the final fraction of steps that decays to min_lr_ratio")
    min_lr_ratio: float = opt(0.0, "learning rate at the end, as a fraction of the peak")
    rewarm_from_step: int | None = opt(
        None, "restart warmup at this step (re-warming a resumed or extended run)"
    )

    def check(self, path: str):
        problems = []
        if self.warmup < 0:
            problems.append((f"{path}.warmup", "must be >= 0"))
        if not 0 <= self.decay <= 1:
            problems.append((f"{path}.decay", "must be in [0, 1]"))
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append((f"{path}.min_lr_ratio", "must be in [0, 1]"))
        if self.rewarm_from_step is not None and self.rewarm_from_step < 0:
            problems.append((f"{path}.rewarm_from_step", "must be 0 or more"))
        return problems


@dataclass
class KernelsConfig:
    """The fast paths around the model's own modules. auto: on where they apply and pay (measured in
    bench/README.md "speed"); on: required, refused where they cannot apply; off: the stock module."""

    fast_lora: Literal["auto", "on", "off"] = opt(
        "auto",
        "cptkit's fused LoRA autograd (base matmul and low-rank update from one read of x, hand-written "
        "backward, no input copies; bf16 and 4-bit bases); needs lora.dropout 0",
    )
    rms_norm: Literal["auto", "on", "off"] = opt("auto", "liger-kernel's fused RMSNorm (GPU)")
    swiglu: Literal["auto", "on", "off"] = opt("auto", "liger-kernel's fused SwiGLU MLP (GPU)")
    rope: Literal["auto", "on", "off"] = opt("auto", "liger-kernel's fused rotary embedding (GPU)")
    compile: Literal["auto", "on", "off"] = opt(
        "auto", "regional torch.compile of each decoder block (GPU); auto: where bench/ measured it to pay"
    )


@dataclass
class GuardConfig:
    """Stops a run whose loss diverged without becoming NaN (a collapse to uniform guessing, gradients
    that vanished, a spike), before more checkpoints of a broken model are written. A NaN/inf loss or
    grad norm always stops a run."""

    enabled: bool = opt(True, "watch for collapse, zero gradients and loss spikes (NaN/inf always stop)")
    patience: int = opt(
        5, "logged steps in a row of a collapsed loss or a zero grad norm before the run is stopped"
    )
    uniform_margin: float = opt(
        0.05, "a loss within this many nats of ln(vocabulary size), or above, is a collapsed model"
    )
    spike_factor: float = opt(
        3.0,
        "stop when `patience` logged losses in a row are more than this many times (and a nat above) the "
        "median of the `window` ones before",
    )
    window: int = opt(20, "logged losses in the running median; the spike rule waits until it is full")

    def check(self, path: str):
        problems = []
        if self.patience < 1:
            problems.append((f"{path}.patience", f"{self.patience}: must be at least 1"))
        if self.uniform_margin < 0:
            problems.append((f"{path}.uniform_margin", f"{self.uniform_margin}: must be >= 0"))
        if not self.spike_factor > 1:
            problems.append((f"{path}.spike_factor", f"{self.spike_factor}: must be above 1"))
        if self.window < 1:
            problems.append((f"{path}.window", f"{self.window}: must be at least 1"))
        return problems


@dataclass
class TrainingRun:
    """What every cptkit training run reads (`train` and `sft`): the mode, the adapter, the schedule,
    where it writes and resumes, and what goes to transformers.TrainingArguments."""

    mode: Literal["full", "lora", "qlora"] = opt(
        "lora", "full fine-tuning, LoRA, or QLoRA (4-bit base + LoRA)"
    )
    output_dir: str | None = opt(
        None, "where checkpoints and the final model go (default: RUN_DIR/train, RUN_DIR/sft for sft)"
    )
    lora: LoraConfig = opt(factory=LoraConfig, help="LoRA adapter shape")
    quantization: QuantizationConfig = opt(factory=QuantizationConfig, help="QLoRA quantisation")
    schedule: ScheduleConfig = opt(factory=ScheduleConfig, help="learning-rate schedule")
    embedding_lr: float | None = opt(
        None,
        "learning rate for the input embeddings and lm_head when they train (always in full mode; with "
        "lora.train_embeddings, where lora.embedding_lr takes precedence); default: the main lr",
    )
    new_tokens: NewTokensConfig = opt(
        factory=NewTokensConfig, help="rows of the tokens data.vocabulary added: initialisation, training"
    )
    untrained_rows: Literal["report", "mean"] = opt(
        "report",
        "base embedding rows that look untrained (near zero, or all alike) yet occur in the training data: "
        "report them (a warning and the run's records), or also set them to the mean of the trained rows",
    )
    gradient_checkpointing: bool | Literal["auto"] = opt(
        "auto",
        "auto: the memory plan picks the fastest way that fits train.memory_budget (no recompute, recompute "
        "of some blocks, of all, or all with their inputs offloaded to CPU memory); true: recompute every "
        "block; false: none",
    )
    memory_budget: str | None = opt(
        None,
        "GPU memory the plan may use: a size (24GiB, 80GB, 20000MiB) or a fraction of the GPU's (0.8); "
        "default: the GPU's memory less a margin (cptkit.train.memory.DEFAULT_MARGIN)",
    )
    kernels: KernelsConfig = opt(factory=KernelsConfig, help="fused kernels and compilation")
    fused_cross_entropy: Literal["auto", "on", "off"] = opt(
        "auto",
        "liger-kernel's fused linear cross-entropy (no full vocabulary logits); auto: on GPU when installed",
    )
    eval_steps: int | None = opt(
        None, "evaluate held-out domain/general loss every N steps (default: 10 times a run)"
    )
    resume: str = opt(
        "auto", "auto: continue from the last checkpoint in output_dir; never; or a checkpoint path"
    )
    guard: GuardConfig = opt(factory=GuardConfig, help="divergence guard: what stops a run that broke")
    report_to: list[str] = opt(factory=lambda: ["tensorboard"], help="tensorboard, wandb, mlflow, or none")
    overwrite_output_dir: bool = opt(False, "allow writing into an output folder that holds another run")
    hf: dict[str, Any] = opt(
        factory=dict,
        help="passed to transformers.TrainingArguments (learning_rate, per_device_train_batch_size, "
        "gradient_accumulation_steps, num_train_epochs, max_steps, save_steps, logging_steps, deepspeed, ...)",
    )

    def check(self, path: str):
        problems = []
        for owned in OWNED_BY:
            if owned in self.hf:
                problems.append(
                    (f"{path}.hf.{owned}", f"set by cptkit; use {path}.{OWNED_BY[owned]} instead")
                )
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            problems.append((f"{path}.embedding_lr", f"{self.embedding_lr} must be a positive learning rate"))
        if self.memory_budget is not None:
            from cptkit.train.memory import budget_problem

            problem = budget_problem(self.memory_budget)
            if problem:
                problems.append((f"{path}.memory_budget", problem))
        if self.eval_steps is not None and self.eval_steps < 1:
            problems.append(
                (f"{path}.eval_steps", f"{self.eval_steps} must be at least 1 (none: 10 times a run)")
            )
        if self.kernels.fast_lora == "on" and (self.mode == "full" or self.lora.dropout > 0):
            problems.append(
                (
                    f"{path}.kernels.fast_lora",
                    f"on needs mode lora or qlora and lora.dropout 0 (mode {self.mode}, dropout "
                    f"{self.lora.dropout}): set {path}.lora.dropout: 0, or fast_lora: auto",
                )
            )
        return problems + self.hf_problems(path)

    def hf_problems(self, path: str):
        """The problems of `<path>.hf` against the arguments class the run builds (here
        TrainingArguments; a section that builds another overrides this)."""
        # imported here: transformers is slow to import and only configs that train need it
        from cptkit.train.arguments import hf_problems

        return hf_problems(self, path)


@dataclass
class TrainConfig(TrainingRun):
    """`cptkit train`: base model + prepared dataset -> adapter or full checkpoint."""

    dataset: str | None = opt(None, "prepared dataset folder (default: data.output_dir)")
    eval_max_tokens: int = opt(
        200_000, "held-out tokens per set evaluated during training (the full set in cptkit eval)"
    )
    regularize: RegularizeConfig = opt(
        factory=RegularizeConfig, help="regularizers against the base model (kl_to_base, l2_to_base, ewc)"
    )
    forgetting_budget: float | None = opt(
        None,
        "the most the general held-out perplexity may rise over the base's, as a fraction (0.01: 1%); "
        "checked at every held-out evaluation (and every save step, evaluated too), the best checkpoint "
        "within it by domain gain is kept from rotation and named in run_meta.json",
    )
    stop_at_forgetting_budget: bool = opt(False, "stop training when the forgetting budget is crossed")
    loss_per_source: bool = opt(True, "log the training loss of each source at every logging step")

    def check(self, path: str):
        problems = list(super().check(path))
        if self.eval_max_tokens < 1:
            problems.append((f"{path}.eval_max_tokens", f"{self.eval_max_tokens} must be at least 1"))
        from cptkit.train.budget import budget_problems

        return problems + budget_problems(
            self.forgetting_budget,
            self.stop_at_forgetting_budget,
            path,
            self.hf.get("save_strategy", "steps"),
        )


# TrainingArguments fields that cptkit sets itself -> the cptkit key that says what the user wants
OWNED_BY = {
    "lr_scheduler_type": "schedule.type",
    "warmup_ratio": "schedule.warmup",
    "output_dir": "output_dir",
    "gradient_checkpointing": "gradient_checkpointing",
    "report_to": "report_to",
    "eval_steps": "eval_steps",
}

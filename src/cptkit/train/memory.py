"""The memory plan: from the model's shape, the run's shape and the kernels in use, the GPU memory a
training step needs under each way of checkpointing, and the fastest way that fits the budget.

The estimate is analytic: the tensors autograd keeps for the backward of one decoder block, counted one
term per tensor (`block_saved_bytes`), times tokens and blocks, plus weights, trainable copies,
gradients, optimizer states, the loss's logits and a workspace allowance. Two constants, set from
measured H200 peaks, correct it: `ACTIVATION_CALIBRATION` (multiplies the activations) and
`FIXED_OVERHEAD_BYTES` (added once)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from cptkit.train.saved_tensors import block_saved_bytes, head_saved_bytes, logits_bytes, workspace_bytes

DEFAULT_MARGIN = 0.08  # the fraction of the GPU's memory the default budget leaves to the allocator and CUDA

# Set from measured peaks (bench/README.md "memory plan"): measured / predicted activations, and what
# max_memory_allocated shows beyond the model of it. 1.0 and 0 until measured.
ACTIVATION_CALIBRATION = 1.0
FIXED_OVERHEAD_BYTES = 0

# auto keeps this fraction of the budget free for the estimate's error (within 3% on the H200's 8B
# runs, bench/README.md "speed"), so a plan chosen to fit does not end a few percent over
PREDICTION_HEADROOM = 0.04
OFFLOAD_OVERHEAD = 0.03  # step time the pinned-memory copies of offloaded block inputs add (to be measured)
NF4_BYTES_PER_PARAM = 0.5 + 0.127 / 8  # 4-bit values + double-quantised absmax constants
# Optimizer states per trainable parameter, by `train.hf.optim` (a prefix matches), each in the
# parameter's dtype (torch's AdamW keeps exp_avg/exp_avg_sq like the parameter), one byte in 8-bit ones.
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "adafactor": 0, "lion": 1}
EIGHT_BIT_OPTIMIZER = re.compile(r"(8bit|_8bit)")
FULL_MODE_COPIES = {
    "kl_to_base": 1,
    "l2_to_base": 1,
    "ewc": 3,
}  # frozen copies (full mode; ewc: e + fp32 Fisher)

Checkpointing = Literal["none", "some", "all", "offload"]


@dataclass(frozen=True)
class RunShape:
    """What sizes the activations: tokens of one row and rows of one micro-batch."""

    seq_length: int
    micro_batch: int

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch

    @classmethod
    def of(cls, train_cfg: Any, seq_length: int) -> RunShape:
        """The shape a `train`/`sft` section trains at: rows of `seq_length` tokens,
        `per_device_train_batch_size` of them (cptkit's default under `train.hf`)."""
        import torch

        from cptkit.train.arguments import hf_settings

        micro_batch = hf_settings(train_cfg, False, torch.float32)["per_device_train_batch_size"]
        return cls(seq_length=seq_length, micro_batch=int(micro_batch))


@dataclass(frozen=True)
class MemorySetup:
    """What decides a training step's memory besides the model's shape."""

    mode: str
    seq_length: int
    micro_batch: int
    lora_r: int
    lora_targets: list[str] | str
    train_embeddings: bool
    fused_cross_entropy: bool
    fast_lora: bool
    fused_mlp: bool
    dtype_bytes: int = 2
    optimizer: str = "adamw_torch"
    extra_model_copies: int = 0  # frozen copies of the weights the regularizers keep (full mode)
    ewc_fisher: bool = False  # LoRA/QLoRA with regularize.ewc: an fp32 Fisher of every adapted base weight
    fused_norm: bool = False  # liger's RMSNorm: keeps its input in the compute dtype, not in fp32
    fused_swiglu: bool = False  # liger's SwiGLU: recomputes act(gate) (fused_mlp, cptkit's, keeps less)
    lora_dropout: float = 0.0
    shards: int = 1  # processes the weights, gradients and optimizer states are split over (FSDP, ZeRO-3)

    @property
    def tokens(self) -> int:
        return self.seq_length * self.micro_batch

    @property
    def lora(self) -> bool:
        return self.mode in ("lora", "qlora")

    @classmethod
    def from_config(
        cls,
        train_cfg: Any,
        run_shape: RunShape,
        fused_cross_entropy: bool,
        fast_lora: bool,
        fused_mlp: bool,
        dtype_bytes: int = 2,
        fused_norm: bool = False,
        shards: int = 1,
        fused_swiglu: bool = False,
    ) -> MemorySetup:
        """The setup of a `train`/`sft` section run at `run_shape` with the kernels named."""
        copies = 0
        regularize = getattr(train_cfg, "regularize", None)
        if train_cfg.mode == "full" and regularize is not None:
            copies = sum(n for name, n in FULL_MODE_COPIES.items() if getattr(regularize, name).weight > 0)
        return cls(
            mode=train_cfg.mode,
            seq_length=run_shape.seq_length,
            micro_batch=run_shape.micro_batch,
            lora_r=train_cfg.lora.r,
            lora_targets=train_cfg.lora.target_modules,
            train_embeddings=train_cfg.mode == "full" or train_cfg.lora.train_embeddings,
            fused_cross_entropy=fused_cross_entropy,
            fast_lora=fast_lora and train_cfg.mode != "full",
            fused_mlp=fused_mlp,
            dtype_bytes=dtype_bytes,
            optimizer=str(train_cfg.hf.get("optim", "adamw_torch_fused")),
            extra_model_copies=copies,
            ewc_fisher=train_cfg.mode != "full" and regularize is not None and regularize.ewc.weight > 0,
            fused_norm=fused_norm,
            fused_swiglu=fused_swiglu,
            lora_dropout=train_cfg.lora.dropout if train_cfg.mode != "full" else 0.0,
            shards=shards,
        )


def _mlp_adapted(targets: list[str] | str) -> bool:
    """Whether LoRA adapts all three projections of a SwiGLU MLP, which the fused MLP needs."""
    if targets == "all-linear":
        return True
    names = {targets} if isinstance(targets, str) else set(targets)
    return {"gate_proj", "up_proj", "down_proj"} <= {n.split(".")[-1] for n in names}


def expected_setup(
    train_cfg: Any, run_shape: RunShape, fused_cross_entropy: bool, dtype_bytes: int = 2, shards: int = 1
) -> MemorySetup:
    """The setup a run of `train_cfg` will have on a GPU, known before its model loads (for the check
    before loading and `cptkit plan`): liger's RMSNorm and SwiGLU come with its fused loss unless
    train.kernels turns them off, cptkit's fused LoRA path and MLP with lora.dropout 0."""
    kernels = train_cfg.kernels
    return MemorySetup.from_config(
        train_cfg,
        run_shape,
        fused_cross_entropy=fused_cross_entropy,
        fast_lora=train_cfg.lora.dropout == 0 and kernels.fast_lora != "off",
        fused_mlp=train_cfg.mode != "full"
        and train_cfg.lora.dropout == 0
        and kernels.fast_lora != "off"
        and _mlp_adapted(train_cfg.lora.target_modules),
        fused_swiglu=fused_cross_entropy and kernels.swiglu != "off",
        fused_norm=fused_cross_entropy and kernels.rms_norm != "off",
        dtype_bytes=dtype_bytes,
        shards=shards,
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak GPU memory of one training step, in bytes, by part.

    weights: the model as stored (bf16, or NF4 block linears in qlora) and frozen copies of it;
    trainable: the fp32 adapters (or the modules_to_save copies) beside the base weights;
    gradients: one per trainable parameter; optimizer: its states (and a foreach step's scratch);
    checkpoints: the inputs the checkpointed blocks keep (none when offloaded);
    activations: the saved tensors of the blocks that do not recompute, plus one block's worth while a
    checkpointed block is recomputed, plus what the final norm and lm_head keep;
    logits: the loss's vocabulary-sized tensors; workspace: cuBLAS, the largest transient matmul output
    and its gradient, a dequantised 4-bit weight.
    Gradients grow as the activations are freed during the backward, so the peak holds the larger of
    the two (`total`), not their sum."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    checkpoints: int
    activations: int
    logits: int
    workspace: int
    optimizer_step: int = 0  # scratch of the optimizer's step (torch's foreach AdamW), with the gradients

    @property
    def total(self) -> int:
        forward = self.checkpoints + self.activations + self.logits
        step = self.gradients + self.optimizer_step
        return self.weights + self.trainable + self.optimizer + max(forward, step) + self.workspace

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class MemoryPlan:
    """How the decoder blocks checkpoint, and what that was predicted to cost in memory and time."""

    checkpointing: Checkpointing
    checkpointed_layers: tuple[int, ...]
    estimate: MemoryEstimate
    budget_bytes: int
    relative_time: float
    forced: bool
    layers: int = 0
    warnings: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.budget_bytes

    def describe(self) -> str:
        """One line for logs and `cptkit plan`."""
        how = {
            "none": "no gradient checkpointing",
            "some": f"checkpointing {len(self.checkpointed_layers)} of {self.layers} blocks",
            "all": f"checkpointing all {self.layers} blocks",
            "offload": f"checkpointing all {self.layers} blocks, inputs offloaded to CPU memory",
        }[self.checkpointing]
        why = "as train.gradient_checkpointing says" if self.forced else "the fastest that fits"
        if not self.fits:
            why += ", over budget"
        return (
            f"memory plan: {how} ({why}); predicted peak {gib(self.estimate.total)} of a "
            f"{gib(self.budget_bytes)} budget, step time x{self.relative_time:.2f}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "checkpointing": self.checkpointing,
            "checkpointed_layers": list(self.checkpointed_layers),
            "layers": self.layers,
            "predicted_peak_bytes": self.estimate.total,
            "estimate": self.estimate.to_json(),
            "budget_bytes": self.budget_bytes,
            "relative_time": round(self.relative_time, 4),
            "forced": self.forced,
            "warnings": list(self.warnings),
        }


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def estimate_memory(
    shape: Any, setup: MemorySetup, checkpointed: int, offload: bool = False
) -> MemoryEstimate:
    """Predicted peak of a training step with `checkpointed` of the shape's blocks recomputing (their
    inputs in CPU memory when `offload`)."""
    if not 0 <= checkpointed <= shape.layers:
        raise ValueError(f"checkpointed={checkpointed}: must be within 0..{shape.layers}")
    e, tokens = setup.dtype_bytes, setup.tokens
    per_block = sum(block_saved_bytes(shape, setup).values()) * tokens
    kept = shape.layers - checkpointed
    head_inputs = head_saved_bytes(shape, setup) * tokens
    activations = (kept + (1 if checkpointed else 0)) * per_block + head_inputs
    checkpoints = 0 if offload else checkpointed * e * shape.hidden * tokens
    weights, trainable, trainable_params, trainable_bytes = _weights(shape, setup)
    states, step_scratch = _optimizer_bytes(setup, trainable_params, trainable_bytes)
    n = setup.shards
    return MemoryEstimate(
        weights=weights // n,
        trainable=trainable // n,
        gradients=trainable_params * trainable_bytes // n,
        optimizer=states // n,
        checkpoints=round(checkpoints * ACTIVATION_CALIBRATION),
        activations=round(activations * ACTIVATION_CALIBRATION),
        logits=logits_bytes(shape, setup),
        workspace=workspace_bytes(shape, setup) + FIXED_OVERHEAD_BYTES,
        optimizer_step=step_scratch // n,
    )


def _weights(shape: Any, setup: MemorySetup) -> tuple[int, int, int, int]:
    """(base weights + frozen copies, trainable copies beside them, trainable parameters, bytes each)."""
    e = setup.dtype_bytes
    total = shape.total_params()
    linears = shape.layers * shape.block_linear_params
    if setup.mode == "qlora":
        base = round(linears * NF4_BYTES_PER_PARAM) + (total - linears) * e
    else:
        base = total * e
    if setup.mode == "full":
        return base + setup.extra_model_copies * total * e, 0, total, e
    if setup.ewc_fisher:  # train/ewc.py keeps it on the GPU beside the weights
        base += 4 * shape.layers * sum(i * o for i, o in shape.adapted(setup.lora_targets).values())
    adapters = shape.lora_params(setup.lora_r, setup.lora_targets)
    embeddings = shape.embedding_params + shape.head_params if setup.train_embeddings else 0
    trainable = adapters * 4 + embeddings * e  # peft keeps adapters in fp32, modules_to_save as the base
    params = adapters + embeddings
    mean_bytes = round(trainable / params) if params else 4
    return base, trainable, params, mean_bytes


def _optimizer_bytes(setup: MemorySetup, params: int, param_bytes: int) -> tuple[int, int]:
    """(optimizer states, scratch of a step): AdamW keeps two states per parameter in its dtype (one byte
    each in the 8-bit optimizers); torch's foreach (not fused) step makes a temporary of the states."""
    name = setup.optimizer.lower()
    states = next((n for prefix, n in OPTIMIZER_STATES.items() if name.startswith(prefix)), 2)
    state_bytes = 1 if EIGHT_BIT_OPTIMIZER.search(name) else param_bytes
    scratch = params * param_bytes if name in ("adamw_torch", "adamw_hf", "adam") else 0
    return params * states * state_bytes, scratch


def relative_step_time(mode: str, checkpointed: int, layers: int, offload: bool = False) -> float:
    """Step time over the time without recompute: a recomputed block runs its forward again; the forward
    is 1/3 of a full-mode step and 1/2 of a LoRA step (frozen weights get no weight gradient)."""
    share = 1 / 3 if mode == "full" else 0.5
    time = 1 + share * checkpointed / max(layers, 1)
    return time * (1 + OFFLOAD_OVERHEAD) if offload else time


def spread_layers(count: int, layers: int) -> tuple[int, ...]:
    """`count` block indices spread evenly over `layers` (so the memory freed is spread too)."""
    if count <= 0:
        return ()
    if count >= layers:
        return tuple(range(layers))
    return tuple(sorted({math.floor((i + 0.5) * layers / count) for i in range(count)}))


def plan_memory(shape: Any, setup: MemorySetup, budget_bytes: int, forced: bool | None = None) -> MemoryPlan:
    """The fastest plan that fits `budget_bytes`: no checkpointing, the fewest blocks checkpointed
    (spread evenly), all blocks, or all blocks with their inputs offloaded. `forced` True/False (the
    config's true/false) takes all / none whatever the budget; it is estimated all the same. When even
    offloading does not fit, the plan is offload with a warning of how far over it is."""
    layers = shape.layers

    def make(kind: Checkpointing, count: int, warnings: tuple[str, ...] = ()) -> MemoryPlan:
        offload = kind == "offload"
        return MemoryPlan(
            checkpointing=kind,
            checkpointed_layers=spread_layers(count, layers),
            estimate=estimate_memory(shape, setup, count, offload=offload),
            budget_bytes=budget_bytes,
            relative_time=relative_step_time(setup.mode, count, layers, offload),
            forced=forced is not None,
            layers=layers,
            warnings=warnings,
        )

    if forced is not None:
        plan = make("all", layers) if forced else make("none", 0)
        return plan if plan.fits else _over_budget(plan)
    aim = budget_bytes * (1 - PREDICTION_HEADROOM)
    for count in range(layers + 1):  # memory falls as count grows: the first that fits is the fastest
        if estimate_memory(shape, setup, count).total <= aim:
            return make("none" if count == 0 else "some" if count < layers else "all", count)
    offload = make("offload", layers)
    return offload if offload.fits else _over_budget(offload)


def _over_budget(plan: MemoryPlan) -> MemoryPlan:
    """`plan` with the warning that it exceeds its budget, by how much and what to lower."""
    over = plan.estimate.total - plan.budget_bytes
    advice = "lower train.hf.per_device_train_batch_size (raise gradient_accumulation_steps) or the sequence"
    if plan.checkpointing != "offload":
        advice = "set train.gradient_checkpointing: auto, or " + advice
    warning = (
        f"the memory plan exceeds train.memory_budget ({gib(plan.budget_bytes)}) by {gib(over)}: {advice} "
        "length, or train with mode: qlora"
    )
    return replace(plan, warnings=(*plan.warnings, warning))


SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_budget(text: str | None, gpu_total_bytes: int) -> int:
    """`train.memory_budget` in bytes: a size ("24GiB", "80GB", "20000MiB") or a fraction of the GPU's
    memory ("0.8"); None: the GPU's memory less DEFAULT_MARGIN. ValueError for text it cannot read
    (`budget_problem` says it in the config's terms)."""
    if text is None:
        return int(gpu_total_bytes * (1 - DEFAULT_MARGIN))
    found = SIZE.match(str(text))
    if not found:
        raise ValueError(
            f"{text!r}: expected a size such as 24GiB, 80GB, 20000MiB, or a fraction such as 0.8"
        )
    number, unit = float(found.group(1)), found.group(2)
    if unit is None:
        if not 0 < number <= 1:
            raise ValueError(f"{text!r}: a fraction of the GPU's memory must be in (0, 1]; add a unit (GiB)")
        return int(gpu_total_bytes * number)
    if number <= 0:
        raise ValueError(f"{text!r}: must be above 0")
    return int(number * UNITS[unit.lower()])


def budget_problem(text: str | None) -> str | None:
    """What is wrong with a `train.memory_budget` value, or None (for the config's check)."""
    try:
        parse_budget(text, 1)
    except ValueError as e:
        return str(e)
    return None

"""Trainer construction shared by `cptkit train` and `cptkit sft`: TrainingArguments with cptkit's
defaults under the user's `train.hf`, our schedules and optimizer groups, and the callbacks."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

from cptkit.config.train import TrainConfig
from cptkit.data.prepared import Prepared
from cptkit.model.attention import VARLEN
from cptkit.model.load import LoadedModel
from cptkit.paths import METRICS
from cptkit.train.arguments import training_arguments
from cptkit.train.budget import ForgettingBudget
from cptkit.train.callbacks import CountingCollator, HeldoutEvalCallback, MetricsWriter, ThroughputCallback
from cptkit.train.checkpoints import CheckpointCallback, saved_settings
from cptkit.train.collator import PackedCollator
from cptkit.train.guard import DivergenceGuard
from cptkit.train.heads import capturing_last_hidden
from cptkit.train.heldout import HeldoutSet
from cptkit.train.losses import LossContext, LossTerm, LossTerms, build_loss_terms
from cptkit.train.memory_report import MemoryReportCallback
from cptkit.train.schedules import make_scheduler
from cptkit.train.stall import StallWatchdog, stall_seconds
from cptkit.train.task_callback import ReadyTask, add_task_callback

log = logging.getLogger(__name__)

TERM_ONLY_INPUTS = ("source_ids",)  # batch keys for the loss terms, never passed to the model


class CptTrainer(Trainer):
    """transformers.Trainer with four decisions made for continued pretraining:

    - the sampler is sequential: prepare already shuffled and mixed the rows, and a fixed order is what
      makes `resume` continue at exactly the same data position;
    - the schedule is cptkit's (cosine, WSD, linear, constant with min_lr_ratio and re-warming), which
      HF's named schedulers do not all offer;
    - the input embeddings and lm_head, when trained, get their own learning rate;
    - the loss is a sum of terms (`cptkit.train.losses`), whose metrics join each training log;
    - a checkpoint saved under other optimisation settings (`optimization_settings`) resumes its weights,
      step and data position with a fresh optimizer and the configured schedule at that step.
    Subclassing is the documented way to change these under DeepSpeed and FSDP (`optimizers=` is refused
    there), so nothing else is overridden.
    """

    def __init__(
        self,
        *args: Any,
        cpt: TrainConfig,
        loss_terms: list[LossTerm] | None = None,
        settings: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.cpt = cpt
        self.loss_terms = LossTerms(loss_terms or build_loss_terms(cpt))
        self.settings = settings
        super().__init__(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The saved optimizer and scheduler state hold the learning rate, weight decay and schedule
        # they ran with: loading them would bring back the settings a rerun changed (the advice after a
        # divergence is a lower learning rate). Such a checkpoint keeps its weights, step and data
        # position, and the optimizer and the new schedule start fresh at its step.
        saved = saved_settings(checkpoint)
        if checkpoint is None or saved is None or saved == self.settings or self.is_deepspeed_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        changed = sorted(
            k for k in {**saved, **(self.settings or {})} if saved.get(k) != (self.settings or {}).get(k)
        )
        step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
        log.info(
            "%s was trained with other optimisation settings (%s): continuing from its weights at step %d "
            "with a fresh optimizer and the configured schedule",
            checkpoint,
            ", ".join(changed),
            step,
        )
        _schedule_at(self.lr_scheduler, step)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # transformers' forward with labels and its scaling (num_items_in_batch, averaging over devices)
        # give the causal-LM term; the terms then share those outputs, so no second forward is made.
        # The model never sees the batch's source_ids; the terms do (they get `inputs` as it came).
        logging_step = self._logs_this_step()
        forward = {k: v for k, v in inputs.items() if k not in TERM_ONLY_INPUTS}
        if not self.loss_terms.needs_hidden_states(logging_step):
            loss, outputs = super().compute_loss(
                model, forward, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        else:  # the final norm's output alone, not every layer's (output_hidden_states keeps them all)
            with capturing_last_hidden(model) as captured:
                if captured is None:
                    forward["output_hidden_states"] = True
                loss, outputs = super().compute_loss(
                    model, forward, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            if captured:
                outputs["hidden_states"] = (captured[-1],)
        outputs["loss"] = loss
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # an override that not every 5.x Trainer has
        if scaled is None:  # transformers' own rule in training_step
            scaled = bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        # the training loop sets the micro-batches of the current step; a call outside it has the configured
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        total = self.loss_terms(
            model, inputs, outputs, steps, causal_lm_is_scaled=scaled, logging_step=logging_step
        )
        return (total, outputs) if return_outputs else total

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step now being computed ends in a training log (the Trainer's
        DefaultFlowCallback rule; an epoch strategy counts every step, not knowing where epochs end)."""
        strategy = getattr(self.args.logging_strategy, "value", self.args.logging_strategy)
        if strategy == "no":
            return False
        if strategy != "steps":
            return True
        step = self.state.global_step + 1
        every = max(int(self.state.logging_steps or self.args.logging_steps or 1), 1)
        return step % every == 0 or (step == 1 and self.args.logging_first_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the loss terms' metrics since the last one join it
            logs.update(self.loss_terms.pop_means())
        super().log(logs, start_time)

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> torch.utils.data.Sampler:
        dataset = args[0] if args else kwargs.get("train_dataset") or self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            self.lr_scheduler = make_scheduler(
                optimizer or self.optimizer, self.cpt.schedule, num_training_steps
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        lr = embedding_learning_rate(self.cpt)
        # only the new rows train (cptkit.model.new_tokens.freeze_base_rows): weight decay would still
        # move the base rows, whose gradient is zero
        frozen_rows = getattr(self.model, "_cptkit_frozen_base_rows", None) is not None
        if (lr is None and not frozen_rows) or getattr(self, "_embedding_group_done", False):
            return optimizer
        embedding = _embedding_param_ids(self.model)
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in embedding]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in embedding]
                settings = {k: v for k, v in group.items() if k != "params"}
                settings["lr"] = lr if lr is not None else group["lr"]
                if frozen_rows:
                    settings["weight_decay"] = 0.0
                optimizer.add_param_group({**settings, "params": moved})
        self._embedding_group_done = True
        if lr is not None:
            log.info("embeddings/lm_head train at learning rate %g", lr)
        return optimizer


def _schedule_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Move a fresh LambdaLR to `step`, as if it had stepped that often (the Trainer steps it on)."""
    scheduler.last_epoch = step
    for group, base, fn in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
    ):
        group["lr"] = base * fn(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def optimization_settings(args: TrainingArguments, train_cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint's optimizer and scheduler state depend on: the learning rates, the schedule,
    the optimizer and its settings, clipping and the batch (recorded in each checkpoint)."""
    optim = getattr(args.optim, "value", args.optim)
    keys = (
        "learning_rate optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon max_grad_norm "
        "per_device_train_batch_size gradient_accumulation_steps"
    ).split()
    return {
        **{k: getattr(args, k) for k in keys},
        "optim": str(optim),
        "embedding_lr": embedding_learning_rate(train_cfg),
        "schedule": dataclasses.asdict(train_cfg.schedule),
    }


def embedding_learning_rate(train_cfg: TrainConfig) -> float | None:
    """The learning rate of the input embeddings and lm_head when they train: `train.embedding_lr`, or in
    lora/qlora mode `train.lora.embedding_lr` where set (it came first); None: the main learning rate."""
    if train_cfg.mode != "full" and train_cfg.lora.embedding_lr is not None:
        return train_cfg.lora.embedding_lr
    return train_cfg.embedding_lr


def _embedding_param_ids(model: Any) -> set[int]:
    """Trainable parameters of the input embeddings and lm_head (also inside peft's modules_to_save, and
    peft's trainable tokens of the new rows, whose names run through the same modules)."""
    ids = set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.requires_grad and any(
            p in ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out") for p in parts
        ):
            ids.add(id(param))
    return ids


def default_eval_steps(args: TrainingArguments, num_rows: int, train_cfg: TrainConfig) -> int:
    """train.eval_steps, or about ten evaluations a run."""
    if train_cfg.eval_steps:
        return train_cfg.eval_steps
    world = max(args.world_size, 1)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    steps = (
        args.max_steps if args.max_steps > 0 else int(args.num_train_epochs * max(num_rows // per_step, 1))
    )
    return max(steps // 10, 1)


def forgetting_budget(train_cfg: TrainConfig) -> ForgettingBudget | None:
    """The forgetting budget the run checks (`train.forgetting_budget`; `cptkit sft` has none)."""
    budget = getattr(train_cfg, "forgetting_budget", None)
    if budget is None:
        return None
    return ForgettingBudget(budget, train_cfg.stop_at_forgetting_budget, train_cfg.eval_max_tokens)


def build_trainer(
    train_cfg: TrainConfig,
    loaded: LoadedModel,
    train_dataset: Any,
    eval_sets: list[HeldoutSet],
    output_dir: str | Path,
    data_collator: Any = None,
    flops_per_token: float | None = None,
    seed: int = 1234,
    loss_terms: list[LossTerm] | None = None,
    prepared: Prepared | None = None,
    resume_from: str | None = None,
    tasks: Sequence[ReadyTask] = (),
) -> tuple[CptTrainer, dict[str, Any]]:
    """A Trainer for `loaded` on `train_dataset` (rows of input_ids/position_ids, plus labels for SFT's
    prompt mask and source_ids for the per-source terms, or whatever `data_collator` takes).
    `loss_terms` default to `build_loss_terms(train_cfg, context)`, the context built from the model,
    the sources of `prepared` (the dataset `train_dataset` comes from) and the checkpoint the run
    resumes from (`resume_from`), before the Trainer loads it: the model is still the base here.
    `tasks` (checked downstream tasks) run at each held-out evaluation.

    Returns the trainer and its cptkit callbacks by name ("throughput", "guard", "heldout",
    "checkpoints", "memory" (the plan's predicted against the measured peak), "tasks" with tasks, and
    "stall" with `CPTKIT_STALL_DUMP_S` set: `cptkit.train.stall`) so the command can read what they measured.
    """
    args = training_arguments(train_cfg, output_dir, loaded.dtype, seed)
    settings = optimization_settings(args, train_cfg)
    # cptkit applies save_total_limit itself, after marking a checkpoint complete: the Trainer's own
    # rotation runs before that and would count an unfinished folder as the newest checkpoint
    save_total_limit, args.save_total_limit = args.save_total_limit, None
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    collator = data_collator or PackedCollator(
        pad,
        pad_to_multiple_of=8 if torch.cuda.is_available() else None,
        varlen_metadata=loaded.attention == VARLEN,
    )
    counting = CountingCollator(collator)
    if loss_terms is None:
        context = loss_context(loaded.model, output_dir, prepared, train_dataset, collator, resume_from)
        loss_terms = build_loss_terms(train_cfg, context)
    writer = MetricsWriter(Path(output_dir) / METRICS, enabled=args.process_index == 0)
    guard = DivergenceGuard(train_cfg.guard)
    budget = forgetting_budget(train_cfg)
    callbacks = {  # in this order: the guard may cancel a save; the marker lists the throughput file
        "throughput": ThroughputCallback(counting, flops_per_token, writer),
        "guard": guard,
        "heldout": HeldoutEvalCallback(
            eval_sets,
            pad,
            args.per_device_eval_batch_size,
            default_eval_steps(args, len(train_dataset), train_cfg),
            writer,
            budget,
        ),
        "checkpoints": CheckpointCallback(
            settings, save_total_limit, keep=[guard.keep, *([budget.keep] if budget else [])]
        ),
        "memory": MemoryReportCallback(loaded.memory_plan),
    }
    stall = stall_seconds()
    if stall is not None:  # last: its step-end beat comes after the held-out evaluation there
        callbacks["stall"] = StallWatchdog(stall)
    trainer = CptTrainer(
        model=loaded.model,
        args=args,
        train_dataset=train_dataset,
        data_collator=counting,
        processing_class=loaded.tokenizer,
        callbacks=list(callbacks.values()),
        cpt=train_cfg,
        loss_terms=loss_terms,
        settings=settings,
    )
    callbacks["heldout"].trainer = trainer
    add_task_callback(trainer, callbacks, tasks)
    return trainer, callbacks


def loss_context(
    model: Any,
    output_dir: str | Path,
    prepared: Prepared | None,
    train_rows: Any,
    collator: Any,
    resume_from: str | None = None,
) -> LossContext:
    """What the loss terms get besides the batch: the model, and from the prepared manifest's
    `source_index` the name of each source id and the ids of the general sources (none without it)."""
    index = prepared.source_index if prepared is not None else {}
    return LossContext(
        model=model,
        output_dir=Path(output_dir),
        source_names={i: name for name, i in index.items()},
        general_sources=prepared.general_source_ids if prepared is not None else frozenset(),
        train_rows=train_rows,
        collator=collator,
        resume_from=resume_from,
    )

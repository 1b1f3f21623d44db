"""`cptkit grpo CONFIG.yaml`: reinforcement learning with group-relative rewards (TRL's GRPOTrainer) after
SFT, the seed's appendix A step 5. Prompts are read and checked and the rewards built before any model
loads; the start model (grpo.model, else the SFT output; a LoRA adapter merged into its base first) is
loaded in grpo.mode, the held-out prompts are scored with greedy completions, GRPO trains, and they are
scored again. The folder holds the adapter or model, run_meta.json, metrics.jsonl (TRL's names),
grpo_prompts.json and grpo_scores.json (docs/CONTRACTS.md, grpo).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.model import ModelConfig
from cptkit.errors import CptkitError
from cptkit.locks import locks_stage_folder
from cptkit.paths import GRPO_PROMPTS, GRPO_SCORES, resolve

log = logging.getLogger(__name__)

GRPO_BEFORE = "grpo_before.json"  # the start model's held-out completions and scores, for a resumed run


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args, "grpo"))
    return 0


@locks_stage_folder("grpo")
def run(cfg: Config) -> dict[str, Any]:
    """Train the policy as `cfg.grpo` says; returns the run's summary (also in run_meta.json)."""
    from datasets import Dataset
    from transformers import set_seed

    from cptkit.grpo import rewards, score
    from cptkit.grpo.prompts import build_prompt_sets, read_prompts
    from cptkit.grpo.start import start_model
    from cptkit.grpo.trainer import build_grpo_trainer, grpo_settings, policy_run, require_trl
    from cptkit.model.load import load_model_and_tokenizer, resolve_dtype
    from cptkit.outputs import write_config, write_json
    from cptkit.train.checkpointing import check_plan_fits
    from cptkit.train.checks import check_training_run
    from cptkit.train.fit import fit
    from cptkit.train.memory import RunShape
    from cptkit.train.meta import write_run_meta

    started = time.perf_counter()
    require_trl()
    grpo_cfg, output_dir = cfg.grpo, resolve(cfg).folder("grpo")
    system = grpo_cfg.system_prompt if grpo_cfg.system_prompt is not None else _default_system_prompt(cfg)
    read = read_prompts(grpo_cfg.prompts, system)  # data errors first, before any model loads
    if grpo_cfg.heldout_prompts:
        read_prompts(grpo_cfg.heldout_prompts, system, where="grpo.heldout_prompts")
    functions = rewards.build_rewards(grpo_cfg.rewards)  # a user function that does not import: now
    weights = rewards.reward_weights(grpo_cfg.rewards)
    start = grpo_start_model(cfg)
    model_cfg = _model_config(cfg, start)
    policy = policy_run(grpo_cfg)
    run_start = check_training_run(policy, model_cfg, _data_hash(grpo_cfg), output_dir, section="grpo")
    identity, resume_from = run_start.identity, run_start.resume_from
    done = None if run_start.fresh else _finished(output_dir, identity, grpo_cfg)
    if done is not None:
        return done
    settings = grpo_settings(grpo_cfg, on_gpu=False, dtype=resolve_dtype(model_cfg))
    shape = RunShape(
        seq_length=grpo_cfg.max_prompt_length + grpo_cfg.max_completion_length,
        micro_batch=int(settings["per_device_train_batch_size"]),
    )
    check_plan_fits(model_cfg, policy, shape)
    # the folder is this run's from here on (a killed merge below is not someone else's files)
    write_run_meta(output_dir, identity=identity, stage="grpo", status="starting")
    loads, merged_from = start_model(start, output_dir, model_cfg.trust_remote_code)
    model_cfg = dataclasses.replace(model_cfg, name_or_path=loads)
    set_seed(cfg.seed)
    loaded = load_model_and_tokenizer(model_cfg, policy, run_shape=shape)
    sets = build_prompt_sets(grpo_cfg, loaded.tokenizer, cfg.seed, _default_system_prompt(cfg), read=read)
    train_prompts = score.tokenized_once(sets.train, loaded.tokenizer)
    heldout = score.tokenized_once(sets.heldout, loaded.tokenizer)
    trainer, callbacks = build_grpo_trainer(
        grpo_cfg, loaded, Dataset.from_list(train_prompts), functions, weights, output_dir, cfg.seed
    )
    main_process = trainer.args.process_index == 0
    if main_process:
        write_config(output_dir, cfg)
        write_json(output_dir / GRPO_PROMPTS, sets.stats)

    def scored() -> dict[str, Any]:
        batch = max(trainer.args.per_device_eval_batch_size, 1)
        return score.score_heldout(
            trainer.model,
            loaded.tokenizer,
            heldout,
            functions,
            weights,
            grpo_cfg.max_completion_length,
            batch,
        )

    before = _before(output_dir, resume_from) or scored()
    names = [f.__name__ for f in functions]
    if main_process:  # kept for a resumed run, whose model is no longer the start
        write_json(output_dir / GRPO_BEFORE, before)
    meta = {"identity": identity, "mode": grpo_cfg.mode, "base_model": loads, "stage": "grpo"}
    meta.update(start_model=start, merged_adapter=merged_from)
    meta["memory_plan"] = loaded.memory_plan.to_json() if loaded.memory_plan else None
    extra = {"base_model": loads, "prompts": sets.stats}
    summary = fit(trainer, callbacks, output_dir, meta, resume_from, extra)
    after = scored()
    scores = score.grpo_scores(
        grpo_cfg.rewards,
        names,
        heldout,
        (start, before),
        (str(output_dir), after),
        grpo_cfg.max_completion_length,
    )
    summary.update(
        heldout_reward_before=scores["before"]["reward"], heldout_reward_after=scores["after"]["reward"]
    )
    if main_process:
        write_json(output_dir / GRPO_SCORES, scores)
        write_run_meta(output_dir, seconds=round(time.perf_counter() - started, 1), final=summary)
    log.info(
        "grpo: %s steps on %s; held-out reward %s -> %s; policy in %s",
        summary["steps"],
        loads,
        _rounded(scores["before"]["reward"]),
        _rounded(scores["after"]["reward"]),
        output_dir,
    )
    return summary


def grpo_start_model(cfg: Config) -> str:
    """grpo.model, else the SFT output, else the model SFT starts from (`Paths.grpo_base`)."""
    start = resolve(cfg).grpo_base
    if start is None:
        raise CptkitError(
            "grpo.model: not set, and there is no SFT output, merged or trained CPT model or model section "
            "to start from"
        )
    derived = not cfg.grpo.model and (cfg.model is None or start != cfg.model.name_or_path)
    if derived and not Path(start).exists():
        raise CptkitError(
            f"grpo: the model to start from, {start}, does not exist yet; run the stages before it "
            "(cptkit run) or set grpo.model"
        )
    return start


def _model_config(cfg: Config, start: str) -> ModelConfig:
    """The model section (attention, dtype) pointed at the model GRPO starts from. GRPO's batches are
    padded prompts and completions, not packed documents: auto attention is sdpa here, and varlen (which
    reads the packed documents' boundaries that cptkit's collator adds) is refused."""
    if cfg.model is None:
        return ModelConfig(name_or_path=start, attention="sdpa")
    if cfg.model.attention == "varlen":
        raise CptkitError(
            "model.attention: varlen attends within packed documents, and GRPO's batches are padded "
            "prompts and completions; use auto (sdpa), sdpa, flex or flash_attention_2 for grpo"
        )
    same = start == cfg.model.name_or_path
    attention = "sdpa" if cfg.model.attention == "auto" else cfg.model.attention
    return dataclasses.replace(
        cfg.model, name_or_path=start, gguf_file=cfg.model.gguf_file if same else None, attention=attention
    )


def _default_system_prompt(cfg: Config) -> str | None:
    return cfg.sft.system_prompt if cfg.sft is not None else None


def _data_hash(grpo_cfg) -> str:
    """What makes two GRPO runs the same run (to resume): the prompt files' bytes, how they are
    rendered and split, the rewards and the sampling."""
    h = hashlib.sha256(Path(grpo_cfg.prompts).read_bytes())
    if grpo_cfg.heldout_prompts:
        h.update(Path(grpo_cfg.heldout_prompts).read_bytes())
    rendering = {
        k: getattr(grpo_cfg, k)
        for k in (
            "template system_prompt max_prompt_length heldout_fraction heldout_max num_generations "
            "max_completion_length temperature top_p beta"
        ).split()
    }
    rendering["rewards"] = [dataclasses.asdict(r) for r in grpo_cfg.rewards]
    h.update(json.dumps(rendering, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _before(output_dir: Path, resume_from: str | None) -> dict[str, Any] | None:
    """A resumed run's `before` scores, kept from its first start (the model is no longer the start)."""
    path = output_dir / GRPO_BEFORE
    if resume_from is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _finished(output_dir: Path, identity: str, grpo_cfg) -> dict[str, Any] | None:
    """The summary of this same run when it already completed its steps (GRPOTrainer resumed from its
    last checkpoint would train one step more); None when there is something to train."""
    from cptkit.paths import RUN_META

    try:
        meta = json.loads((output_dir / RUN_META).read_text())
    except (OSError, ValueError):
        return None
    final = meta.get("final") or {}
    max_steps = grpo_cfg.hf.get("max_steps", -1)
    if meta.get("identity") != identity or meta.get("status") != "complete" or not final:
        return None
    if not (output_dir / GRPO_SCORES).is_file() or (max_steps > 0 and final.get("steps", 0) < max_steps):
        return None
    log.info("grpo: %s already holds this run, complete after %s steps", output_dir, final.get("steps"))
    return final


def _rounded(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

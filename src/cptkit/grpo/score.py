"""Held-out prompts scored with the training rewards, before GRPO (the starting model) and after (the
trained policy): greedy completions, so the two numbers differ only by the model, and grpo_scores.json's
`before`, `after` and `samples` (docs/CONTRACTS.md, grpo)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from statistics import fmean
from typing import Any

SAMPLES = 8  # prompts shown with both completions in grpo_scores.json


def tokenized_once(prompts: list[dict], tokenizer: Any) -> list[dict]:
    """The prompt records with a leading BOS text removed where the tokenizer adds BOS itself: a chat
    template renders it, and TRL (as `generate_with_model`) tokenizes the text with the special tokens,
    so without this the model would see it twice. Both training and scoring get these texts."""
    bos = tokenizer.bos_token
    if not bos or not _adds_bos(tokenizer):
        return prompts
    return [
        {**p, "prompt": p["prompt"][len(bos) :]}
        if isinstance(p["prompt"], str) and p["prompt"].startswith(bos)
        else p
        for p in prompts
    ]


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def score_heldout(
    model: Any,
    tokenizer: Any,
    prompts: list[dict],
    functions: Sequence[Callable[..., list[float | None]]],
    weights: Sequence[float],
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """Greedy completions of `prompts` (records with the rendered `prompt` and the fields the rewards
    read) scored by `functions` combined by `weights`: the mean total reward, each function's mean, the
    mean completion length in characters, and per prompt its completion and total (for the samples)."""
    from cptkit.generate import Sampling, generate_with_model
    from cptkit.grpo.rewards import score_completions

    if not prompts:
        return {"reward": None, "rewards": {}, "completion_chars": None, "completions": [], "totals": []}
    texts = [p["prompt"] for p in prompts]
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = True  # the training loader turns it off; greedy decoding wants it
    try:
        generated = generate_with_model(model, tokenizer, texts, Sampling(max_new_tokens), batch_size)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    completions = [g.text for g in generated]
    columns = {key: [p.get(key) for p in prompts] for key in _columns(prompts)}
    scored = score_completions(list(functions), list(weights), texts, completions, columns)
    return {
        "reward": fmean(scored.total),
        "rewards": {name: _mean_of_scored(values) for name, values in scored.per_function.items()},
        "completion_chars": fmean(len(c) for c in completions),
        "completions": completions,
        "totals": list(scored.total),
    }


def _mean_of_scored(values: list[float]) -> float | None:
    """The mean over the completions a reward applied to (NaN: it returned None), as TRL's logs."""
    kept = [v for v in values if not math.isnan(v)]
    return fmean(kept) if kept else None


def _columns(prompts: list[dict]) -> list[str]:
    """Every field besides the prompt (the rewards read the ones they need, e.g. `answer`)."""
    keys: dict[str, None] = {}
    for p in prompts:
        keys.update(dict.fromkeys(k for k in p if k != "prompt"))
    return list(keys)


def score_block(model_path: str, scored: dict[str, Any]) -> dict[str, Any]:
    """grpo_scores.json's `before` or `after`: the model and its means."""
    return {"model": model_path, **{k: scored[k] for k in ("reward", "rewards", "completion_chars")}}


def grpo_scores(
    reward_configs: Sequence[Any],
    names: Sequence[str],
    prompts: list[dict],
    before: tuple[str, dict[str, Any]],
    after: tuple[str, dict[str, Any]],
    max_new_tokens: int,
) -> dict[str, Any]:
    """grpo_scores.json from the two scorings (`(model path, score_heldout(...))` each)."""
    (before_model, first), (after_model, last) = before, after
    samples = []
    for i, record in enumerate(prompts[:SAMPLES]):
        sample = {"prompt": record["prompt"]}
        if "answer" in record:
            sample["answer"] = record["answer"]
        sample.update(
            before=first["completions"][i],
            after=last["completions"][i],
            reward_before=first["totals"][i],
            reward_after=last["totals"][i],
        )
        samples.append(sample)
    return {
        "rewards": [
            {"name": name, "type": cfg.type, "weight": cfg.weight}
            for name, cfg in zip(names, reward_configs, strict=True)
        ],
        "sampling": {"greedy": True, "max_new_tokens": max_new_tokens},
        "prompts": len(prompts),
        "before": score_block(before_model, first),
        "after": score_block(after_model, last),
        "samples": samples,
    }

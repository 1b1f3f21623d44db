"""Training rows that record their sources (one id per packed segment, as prepared rows do), the
collator that turns them into per-token `source_ids`, and a train config on a tiny model: what tests
of the regularizers against the base model train with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cptkit.train.collator import PackedCollator

DOMAIN, GENERAL = 0, 1  # the source ids the rows use


def source_rows(
    vocab_size: int, count: int, seq_length: int = 32, kinds: Sequence[str] = ("mixed",), seed: int = 0
) -> list[dict[str, list[int]]]:
    """`count` packed rows of random tokens, two documents each, with `source_ids` per segment. Row i is of
    kind kinds[i % len(kinds)]: `domain` (both documents domain), `general` (both general) or `mixed`
    (a domain document, then a general one). Domain documents use the lower half of the vocabulary,
    general ones the upper half, so the two give different gradients."""
    generator = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        sources = {"domain": (DOMAIN, DOMAIN), "general": (GENERAL, GENERAL), "mixed": (DOMAIN, GENERAL)}[
            kind
        ]
        first = seq_length // 2
        ids, positions, source_ids = [], [], []
        for source, length in zip(sources, (first, seq_length - first), strict=True):
            low = 3 if source == DOMAIN else half
            high = half if source == DOMAIN else vocab_size
            ids += torch.randint(low, high, (length,), generator=generator).tolist()
            positions += list(range(length))
            source_ids.append(source)
        rows.append({"input_ids": ids, "position_ids": positions, "source_ids": source_ids})
    return rows


def SourceCollator(pad_token_id: int = 0) -> PackedCollator:  # noqa: N802 (reads as the class it makes)
    """The training collator: its batch has per-token `source_ids` (-1 on padding) from the rows'."""
    return PackedCollator(pad_token_id)


def tiny_train_config(
    model_dir: str | Path, out: str | Path, mode: str = "full", regularize: dict | None = None, **hf: Any
):
    """A Config that trains `model_dir` into `out` with `regularize` (train.regularize) and `hf` over
    cptkit's small defaults (8 steps of 4 rows, logged every step, no checkpoints)."""
    from cptkit.config import Config, build_config

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, **hf.pop("lora", {})}
    hf = {**SMALL_RUN, **hf}
    train = dict(mode=mode, output_dir=str(out), report_to=["none"], eval_steps=1000, lora=lora, hf=hf)
    train["regularize"] = regularize or {}
    return build_config(Config, {"model": {"name_or_path": str(model_dir)}, "train": train})


# train.hf of the tiny runs: 8 steps of 4 rows, logged at every step, no checkpoint
SMALL_RUN = dict(
    max_steps=8, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_steps=1000
)


def perturb_trainable(model: Any, seed: int = 1, size: float = 0.1) -> None:
    """Move every trainable weight by Gaussian noise, so that the drift from the base is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(noise.to(param.device) * size)


def value_and_grads(compute: Any, model: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`compute()`'s value and the gradients it gives the trainable parameters (by name); none are left."""
    model.zero_grad(set_to_none=True)
    value = compute()
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def train_regularized(cfg: Any, rows: Sequence[Mapping[str, Any]], resume_from: str | None = None):
    """Train as `cptkit train` does, with the loss terms `cfg.train` asks for built on the freshly
    loaded model (a LossContext of `rows`, `SourceCollator` and the domain/general ids above), through
    `fit`. Returns (model, terms, the train lines of metrics.jsonl)."""
    import json

    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.paths import METRICS
    from cptkit.train.build import build_trainer
    from cptkit.train.fit import fit
    from cptkit.train.losses import LossContext, build_loss_terms

    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    out = Path(cfg.train.output_dir)
    names = {DOMAIN: "domain", GENERAL: "general"}
    context = LossContext(loaded.model, out, names, frozenset({GENERAL}), rows, SourceCollator(), resume_from)
    terms = build_loss_terms(cfg.train, context)
    trainer, callbacks = build_trainer(cfg.train, loaded, rows, [], out, loss_terms=terms, seed=cfg.seed)
    fit(trainer, callbacks, out, {"identity": "regularized"}, resume_from)
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return loaded.model, terms, [line for line in lines if line["type"] == "train"]

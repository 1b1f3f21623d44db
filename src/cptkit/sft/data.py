"""Instruction data for `cptkit sft`: read, render with label masks, hold out, pack, and count.

The counts (records read and skipped by reason, truncations, trained vs prompt tokens, packing
efficiency) go to `sft_data.json` in the output folder, so nothing is lost without a number.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cptkit.config.sft import SftConfig
from cptkit.errors import CptkitError
from cptkit.sft.formats import ReadResult, read_conversations
from cptkit.sft.pack import pack_examples
from cptkit.sft.render import IGNORE_INDEX, Example, choose_template, render

log = logging.getLogger(__name__)


@dataclass
class SftData:
    """Packed training and held-out rows, and the numbers that describe them."""

    train_rows: list[dict[str, list[int]]]
    heldout_rows: list[dict[str, list[int]]]
    stats: dict[str, Any] = field(default_factory=dict)


def truncate(example: Example, seq_length: int) -> Example:
    return Example(example.input_ids[:seq_length], example.labels[:seq_length])


def build_sft_data(
    sft_cfg: SftConfig, tokenizer: Any, seed: int = 1234, read: ReadResult | None = None
) -> SftData:
    """Everything between the instruction file and the rows the trainer sees (`read`: the file
    already read by `read_conversations`, when the caller checked it before loading a model)."""
    read = read or read_conversations(sft_cfg.data, sft_cfg.format, sft_cfg.system_prompt)
    template = choose_template(tokenizer, sft_cfg.template)
    skipped, truncated, examples = Counter(read.skipped), 0, []
    for conversation in read.conversations:
        example = render(conversation, tokenizer, template)
        if len(example.input_ids) > sft_cfg.seq_length:
            example, truncated = truncate(example, sft_cfg.seq_length), truncated + 1
        if example.trained_tokens == 0:
            skipped[f"no response token within sft.seq_length={sft_cfg.seq_length}"] += 1
            continue
        examples.append(example)
    if not examples:
        raise CptkitError(
            f"sft.data: {sft_cfg.data}: no example keeps a response token; raise sft.seq_length"
        )
    random.Random(seed).shuffle(examples)
    num_heldout = min(round(len(examples) * sft_cfg.heldout_fraction), len(examples) - 1)
    heldout, train = examples[:num_heldout], examples[num_heldout:]
    train_rows = pack_examples(train, sft_cfg.seq_length, sft_cfg.packing)
    random.Random(seed + 1).shuffle(train_rows)  # the trainer reads rows in order
    heldout_rows = pack_examples(heldout, sft_cfg.seq_length, sft_cfg.packing)
    records = len(read.conversations) + sum(read.skipped.values())
    stats = _stats(read.format, template, records, skipped, truncated, train, heldout, train_rows, sft_cfg)
    log.info(
        "sft data: %d examples (%d held out), %d rows, %d response tokens trained, %d skipped",
        len(examples),
        len(heldout),
        len(train_rows),
        stats["trained_tokens"],
        sum(skipped.values()),
    )
    return SftData(train_rows, heldout_rows, stats)


def _stats(fmt, template, records, skipped, truncated, train, heldout, rows, sft_cfg) -> dict[str, Any]:
    tokens = sum(len(e.input_ids) for e in train)
    trained = sum(e.trained_tokens for e in train)
    return {
        "data": str(sft_cfg.data),
        "format": fmt,
        "template": template,
        "records": records,
        "skipped": dict(skipped),
        "truncated": truncated,
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "train_rows": len(rows),
        "tokens": tokens,
        "trained_tokens": trained,
        "prompt_tokens": tokens - trained,
        "packing": sft_cfg.packing,
        "packing_efficiency": tokens / max(len(rows) * sft_cfg.seq_length, 1),
        "ignore_index": IGNORE_INDEX,
    }

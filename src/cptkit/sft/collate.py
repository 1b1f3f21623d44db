"""The SFT collator: the train side's PackedCollator with the rows' own labels (the prompt mask)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cptkit.train.collator import IGNORE_INDEX, PackedCollator


class SftCollator:
    """Batch rows `{input_ids, position_ids, labels}`: padding and layout from PackedCollator, labels
    from the row (-100 on system and prompt tokens), and still -100 at every example's first token
    and on padding, so no loss crosses an example boundary."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.packed = PackedCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.packed([{"input_ids": r["input_ids"], "position_ids": r["position_ids"]} for r in rows])
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, row in enumerate(rows):
            n = len(row["labels"])
            own = torch.as_tensor(row["labels"], dtype=torch.long)
            starts = batch["position_ids"][i, :n] == 0
            labels[i, :n] = torch.where(starts, IGNORE_INDEX, own)
        batch["labels"] = labels
        return batch

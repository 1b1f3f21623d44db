"""PackedCollator and padded_batch: loss on every real token, none across a document boundary, none
on padding; a row's own labels (SFT's prompt mask) kept."""

import pytest
import torch

from cptkit.train.collator import IGNORE_INDEX, PackedCollator, padded_batch
from cptkit.train.schedules import lr_multiplier


def test_labels_skip_document_starts_and_padding():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1]},
        {"input_ids": [3, 4], "position_ids": [0, 1]},
    ]
    batch = PackedCollator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9],
        [IGNORE_INDEX, 4, -100, -100, -100],
    ]
    assert batch["input_ids"][1].tolist() == [3, 4, 0, 0, 0]
    # padding continues the last document's positions: no new document starts inside the padding
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4]


def test_pad_to_multiple():
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=8)(
        [{"input_ids": [1, 2, 3], "position_ids": [0, 1, 2]}]
    )
    assert batch["input_ids"].shape == (1, 8)
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all()


def test_own_labels_are_kept_and_still_masked_at_segment_starts_and_padding():
    rows = [
        {
            "input_ids": [5, 6, 7, 8],
            "position_ids": [0, 1, 0, 1],
            "labels": [-100, 6, 7, 8],
            "doc_index": [0] * 4,
        },
        {"input_ids": [3, 4], "position_ids": [0, 1], "labels": [3, 4], "doc_index": [1, 1]},
    ]
    batch = padded_batch(rows, pad_token_id=0, width=5)
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, -100], [-100, 4, -100, -100, -100]]
    assert batch["doc_index"].tolist() == [[0, 0, 0, 0, -1], [1, 1, -1, -1, -1]]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shorter than the longest row"):
        padded_batch(rows, pad_token_id=0, width=3)


def test_schedules():
    from cptkit.config.train import ScheduleConfig

    cos = ScheduleConfig(type="cosine", warmup=0.1, min_lr_ratio=0.1)
    values = [lr_multiplier(s, cos, 100) for s in range(100)]
    assert values[10] == 1.0 and values[0] < 0.2 and abs(values[-1] - 0.1) < 0.01
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    wsd = ScheduleConfig(type="wsd", warmup=10, decay=0.2)
    values = [lr_multiplier(s, wsd, 100) for s in range(100)]
    assert values[10:80] == [1.0] * 70 and values[-1] < 0.1
    assert lr_multiplier(50, ScheduleConfig(type="constant", warmup=0), 100) == 1.0
    rewarm = ScheduleConfig(type="cosine", warmup=5, rewarm_from_step=50)
    assert lr_multiplier(50, rewarm, 100) < 0.2 and lr_multiplier(55, rewarm, 100) == 1.0
    assert torch.tensor(values).isfinite().all()

"""Held-out evaluation during training scores with `cptkit eval`'s scorer: same windows, same numbers,
bits per byte over the bytes scored; SFT's labelled rows score only their labelled tokens."""

from __future__ import annotations

import math

import pytest
import torch

from cptkit.eval.perplexity import score_documents
from cptkit.train.heldout import HeldoutSet, evaluate_set


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def test_training_scorer_equals_eval_scorer_with_bits_per_byte(model):
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (130, 7, 64, 65, 1, 200)]
    heldout = HeldoutSet.from_documents("docs", "domain", docs, seq_length=64, num_bytes=1000)
    model.train()  # evaluation switches to eval mode and back
    result = evaluate_set(model, heldout, batch_size=2, pad_id=0)
    assert model.training
    scores = score_documents(model, docs, seq_length=64, batch_size=2)
    assert result["tokens"] == scores.total_tokens == sum(len(d) - 1 for d in docs)
    assert result["loss"] == pytest.approx(scores.total_nats / scores.total_tokens, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(scores.total_nats / (math.log(2) * 1000), rel=1e-6)
    unknown = HeldoutSet.from_documents("docs", "domain", docs, seq_length=64, num_bytes=None)
    assert evaluate_set(model, unknown, batch_size=2, pad_id=0)["bits_per_byte"] is None


def test_labelled_rows_score_only_their_labels(model):
    """SFT's held-out rows: a loss on response tokens only, the same as the model's own loss."""
    rows = [
        {
            "input_ids": [5, 6, 7, 8, 9, 10],
            "position_ids": [0, 1, 2, 3, 0, 1],
            "labels": [-100, -100, 7, 8, -100, 10],
        },
        {"input_ids": [11, 12, 13], "position_ids": [0, 1, 2], "labels": [-100, 12, 13]},
    ]
    result = evaluate_set(model, HeldoutSet.from_rows("sft_heldout", "sft", rows), batch_size=8, pad_id=0)
    assert result["tokens"] == 5 and result["bits_per_byte"] is None
    from cptkit.train.collator import PackedCollator

    with torch.no_grad():
        expected = model(**PackedCollator(0)(rows), use_cache=False).loss
    assert result["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_heldout_budget_is_filled_with_whole_documents_past_a_long_one(tmp_path, tiny_tokenizer):
    """A document longer than what is left of the budget is passed over; the shorter ones after it
    still fill it, and the set's bytes are exactly those of the documents scored."""
    from cptkit.data.prepared import Prepared
    from cptkit.testing.stages import write_prepared
    from cptkit.train.heldout import load_heldout_sets

    texts = ["A short first text about lists.", "word " * 400, "A short third one about dicts.", "Last."]
    prepared = Prepared.load(write_prepared(tmp_path / "p", {"domain": ("domain", texts)}, tiny_tokenizer))
    data = prepared.heldout_set("domain")
    lengths, sizes = [len(ids) for ids in data["input_ids"]], list(data["num_bytes"])
    budget = lengths[0] + lengths[2] + lengths[3]
    assert lengths[1] > budget  # the long one never fits
    (domain,) = load_heldout_sets(prepared, 64, budget)
    assert (domain.num_documents, domain.num_bytes) == (3, sizes[0] + sizes[2] + sizes[3])
    (short,) = load_heldout_sets(prepared, 64, lengths[0] + lengths[2])
    assert (short.num_documents, short.num_bytes) == (2, sizes[0] + sizes[2])

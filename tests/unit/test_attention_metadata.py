"""The varlen kernel's document boundaries, computed once per batch by the collator: the same as the
attention derives from position_ids, kept as they are by the Trainer, and used by the attention
function without a graph break (on CPU through a reference kernel registered for torch's varlen op)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from cptkit.model import attention
from cptkit.model.attention import VARLEN_KEYS, _SeqLens, varlen_attention_forward
from cptkit.train.collator import PackedCollator

pytestmark = pytest.mark.skipif(attention.varlen_attn is None, reason="needs torch.nn.attention.varlen")


def _random_rows(rng: random.Random, count: int) -> list[dict[str, list[int]]]:
    """Packed rows of random documents; some rows begin inside a document (position ids not at 0)."""
    rows = []
    for _ in range(count):
        positions: list[int] = []
        if rng.random() < 0.4:  # the tail of a document cut by the previous row
            start = rng.randint(1, 20)
            positions += range(start, start + rng.randint(1, 9))
        for _ in range(rng.randint(1, 4)):
            positions += range(rng.randint(1, 12))
        rows.append({"input_ids": [rng.randint(3, 99) for _ in positions], "position_ids": positions})
    return rows


def _reference(rows: list[dict[str, list[int]]], width: int) -> tuple[list[int], int]:
    """Boundaries over the flattened batch, counted by hand: each row and each position 0 starts a
    document, and padding belongs to the row's last document."""
    cu = [0]
    for i, row in enumerate(rows):
        starts = [j for j, p in enumerate(row["position_ids"]) if p == 0 or j == 0]
        cu += [i * width + j for j in starts[1:]] + [(i + 1) * width]
    return cu, max(b - a for a, b in zip(cu, cu[1:], strict=False))


@pytest.mark.parametrize("multiple", [None, 8])
def test_collator_boundaries_equal_what_the_attention_derives(multiple):
    rng = random.Random(multiple or 0)
    for _ in range(20):
        rows = _random_rows(rng, rng.randint(1, 5))
        batch = PackedCollator(0, pad_to_multiple_of=multiple, varlen_metadata=True)(rows)
        width = batch["input_ids"].shape[1]
        cu, longest = _reference(rows, width)
        assert batch["cu_seq_lens_q"].dtype == torch.int32
        assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == cu
        assert batch["max_length_q"] == batch["max_length_k"] == longest
        assert type(batch["max_length_q"]) is int
        derived, derived_longest = _SeqLens().get(batch["position_ids"])
        assert derived.tolist() == cu and derived_longest == longest


def test_no_boundaries_unless_asked():
    rows = [{"input_ids": [5, 6, 7], "position_ids": [0, 1, 2]}]
    assert not set(VARLEN_KEYS) & set(PackedCollator(0)(rows))


def test_derived_boundaries_are_reused_for_views_of_the_same_position_ids():
    cache = _SeqLens()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    first = cache.get(position_ids.expand(3, -1))  # a new tensor object in every layer
    assert cache.get(position_ids.expand(3, -1)) is first
    assert first[0].tolist() == [0, 3, 5, 6, 9, 11, 12, 15, 17, 18]
    position_ids[0, 4] = 0  # changed in place: derived again
    assert cache.get(position_ids.expand(3, -1))[0].tolist() != first[0].tolist()


def test_the_trainer_keeps_the_boundaries_as_the_collator_made_them(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args)
    rows = [{"input_ids": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]}]
    inputs = trainer._prepare_inputs(PackedCollator(0, varlen_metadata=True)(rows))
    assert inputs["max_length_q"] == 2 and type(inputs["max_length_k"]) is int
    assert inputs["cu_seq_lens_q"].tolist() == [0, 2, 4] and inputs["cu_seq_lens_k"].dtype == torch.int32


def _cpu_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, *a, **kw):
    """torch's varlen op on CPU, one document at a time through sdpa (a reference, for the tests)."""
    out = torch.empty_like(query)
    bounds = cu_seq_q.tolist()
    shared = query.shape[1] // key.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        q = query[start:end].transpose(0, 1)
        k = key[start:end].transpose(0, 1).repeat_interleave(shared, 0)
        v = value[start:end].transpose(0, 1).repeat_interleave(shared, 0)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale).transpose(
            0, 1
        )
    lse = torch.zeros(query.shape[1], query.shape[0])
    return out, lse, torch.zeros(2, dtype=torch.uint64)


@pytest.fixture
def cpu_varlen_kernel():
    """A CPU kernel for torch_attn::_varlen_attn for the length of one test (forward only)."""
    library = torch.library.Library("torch_attn", "FRAGMENT")
    torch.library.register_kernel("torch_attn::_varlen_attn", "cpu", _cpu_varlen, lib=library)
    yield
    library._destroy()


def _attention_inputs(batch: dict) -> tuple:
    gen = torch.Generator().manual_seed(0)
    rows, width = batch["input_ids"].shape
    query = torch.randn(rows, 4, width, 8, generator=gen)
    key, value = torch.randn(2, rows, 2, width, 8, generator=gen)
    return torch.nn.Module(), query, key, value, None


def test_given_boundaries_give_the_derived_result_without_a_graph_break(cpu_varlen_kernel):
    rows = [
        {"input_ids": [1] * 9, "position_ids": [0, 1, 2, 3, 0, 1, 0, 1, 2]},
        {"input_ids": [1] * 6, "position_ids": [4, 5, 0, 1, 2, 3]},
    ]
    batch = PackedCollator(0, varlen_metadata=True)(rows)
    given = {k: batch[k] for k in (*VARLEN_KEYS, "position_ids")}
    inputs = _attention_inputs(batch)
    with_metadata, _ = varlen_attention_forward(*inputs, **given)
    derived, _ = varlen_attention_forward(*inputs, position_ids=batch["position_ids"])
    torch.testing.assert_close(with_metadata, derived)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(varlen_attention_forward)(*inputs, **given)
    assert explained.graph_break_count == 0, explained.break_reasons


def test_packed_with_boundaries_equals_separate_documents(tiny_model_dir, cpu_varlen_kernel):
    from transformers import AutoModelForCausalLM

    attention.register()
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=attention.VARLEN
    ).eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 12, 5, 9, 3)]
    rows = [
        {"input_ids": docs[0] + docs[1] + docs[2], "position_ids": [*range(7), *range(12), *range(5)]},
        {"input_ids": docs[3] + docs[4], "position_ids": [*range(9), *range(3)]},
    ]
    batch = PackedCollator(0, varlen_metadata=True)(rows)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        derived = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        torch.testing.assert_close(packed, derived.logits)
        offset = [(0, 0), (0, 7), (0, 19), (1, 0), (1, 9)]
        for doc, (row, start) in zip(docs, offset, strict=True):
            alone = model(input_ids=torch.tensor([doc]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[row, start : start + len(doc)], alone, atol=1e-5, rtol=1e-5)


def test_boundaries_are_derived_under_inference_mode_too():
    """Inference tensors have no version counter: the derived boundaries' cache must not ask for one."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    with torch.inference_mode():
        inference_ids = position_ids.clone()
        cu, longest = _SeqLens().get(inference_ids)
    assert cu.tolist() == [0, 3, 5, 8] and longest == 3

"""The training loss per source: token-weighted over accumulated micro-batches, the same from logits or
from hidden states (the fused cross-entropy's case), measured on logging steps only, and nothing for
rows without source ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cptkit.train.losses import CausalLMLoss, LossContext, LossTerms, build_loss_terms
from cptkit.train.per_source import LossPerSource

NAMES = {0: "domain", 1: "general", 2: "other"}


@pytest.fixture()
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def micro_batch(vocab: int, general_from: int, seed: int) -> dict[str, torch.Tensor]:
    """One row: a domain segment then a general one starting at `general_from` (sizes vary by batch)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (1, 16), generator=g)
    position_ids = torch.cat([torch.arange(general_from), torch.arange(16 - general_from)])[None]
    source_ids = torch.tensor([[0] * general_from + [1] * (16 - general_from)])
    labels = torch.where(position_ids == 0, -100, input_ids)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "source_ids": source_ids}


def outputs_of(model, inputs, logits=True):
    out = model(**{k: v for k, v in inputs.items() if k != "source_ids"}, output_hidden_states=True)
    out["loss"] = out.loss
    if not logits:  # as liger's fused cross-entropy returns them in training
        out["logits"] = None
    return out


def naive_means(model, batches) -> dict[str, float]:
    """Each source's mean next-token loss over all tokens of all micro-batches."""
    losses, ids = [], []
    for b in batches:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        mask = b["labels"][:, 1:] != -100
        losses.append(F.cross_entropy(logits[:, :-1][mask], b["labels"][:, 1:][mask], reduction="none"))
        ids.append(b["source_ids"][:, 1:][mask])
    losses, ids = torch.cat(losses), torch.cat(ids)
    return {f"loss/source/{NAMES[i]}": losses[ids == i].mean().item() for i in ids.unique().tolist()}


@pytest.mark.parametrize("logits", [True, False])
def test_per_source_loss_is_token_weighted_over_accumulated_micro_batches(llama, logits):
    vocab = llama.config.vocab_size
    batches = [micro_batch(vocab, 3, 0), micro_batch(vocab, 12, 1)]  # very different token shares
    terms = LossTerms([CausalLMLoss(), LossPerSource(NAMES, chunk_tokens=5)])
    llama.train()
    for b in batches:
        terms(llama, b, outputs_of(llama, b, logits), accumulation_steps=2)
    means = terms.pop_means()
    expected = naive_means(llama, batches)
    assert set(expected) == {"loss/source/domain", "loss/source/general"}
    for key, value in expected.items():
        assert means[key] == pytest.approx(value, rel=1e-5)
    assert "loss/source/other" not in means  # no token of it since the last log
    assert not any(key.startswith("tokens/") for key in means)
    batch_means = [naive_means(llama, [b])["loss/source/general"] for b in batches]
    assert means["loss/source/general"] != pytest.approx(sum(batch_means) / 2, rel=1e-4)


def test_per_source_runs_on_logging_steps_only(llama):
    b = micro_batch(llama.config.vocab_size, 5, 0)
    terms = LossTerms([CausalLMLoss(), LossPerSource(NAMES)])
    llama.train()
    assert terms.needs_hidden_states(logging_step=True) and not terms.needs_hidden_states(logging_step=False)
    terms(llama, b, outputs_of(llama, b), logging_step=False)
    assert set(terms.pop_means()) == {"loss/causal_lm"}
    terms(llama, b, outputs_of(llama, b), logging_step=True)
    assert {"loss/source/domain", "loss/source/general"} <= set(terms.pop_means())


def test_rows_without_source_ids_log_no_per_source_loss(llama, caplog):
    b = {k: v for k, v in micro_batch(llama.config.vocab_size, 5, 0).items() if k != "source_ids"}
    terms = LossTerms([CausalLMLoss(), LossPerSource(NAMES)])
    llama.train()
    terms(llama, b, outputs_of(llama, b))
    assert set(terms.pop_means()) == {"loss/causal_lm"}
    # a prepared folder without a source index: no term, one info line
    context = LossContext(model=llama, output_dir=".")
    with caplog.at_level("INFO"):
        built = build_loss_terms(_train_cfg(), context)
    assert [type(t) for t in built] == [CausalLMLoss]
    assert "no per-source training loss" in caplog.text


def test_build_loss_terms_adds_the_per_source_loss_by_default_and_on_request_only(llama):
    context = LossContext(model=llama, output_dir=".", source_names=NAMES, general_sources=frozenset({1}))
    assert [type(t) for t in build_loss_terms(_train_cfg(), context)] == [CausalLMLoss, LossPerSource]
    assert [type(t) for t in build_loss_terms(_train_cfg(loss_per_source=False), context)] == [CausalLMLoss]
    assert [type(t) for t in build_loss_terms(_train_cfg())] == [CausalLMLoss]  # no context: no terms


def _train_cfg(**train):
    from cptkit.config import Config, build_config

    return build_config(Config, {"run_dir": "run", "train": train}).train


def test_token_losses_take_hidden_states_wider_than_the_head():
    """Under bf16 training the final hidden states can reach the terms in float32 while lm_head is bf16."""
    from cptkit.train.heads import token_losses

    hidden, weight = torch.randn(5, 8), torch.randn(11, 8).to(torch.bfloat16)
    targets = torch.randint(0, 11, (5,))
    expected = torch.nn.functional.cross_entropy(
        hidden.to(torch.bfloat16) @ weight.T.float().to(torch.bfloat16), targets, reduction="none"
    )
    torch.testing.assert_close(
        token_losses(hidden, weight, None, targets, 2), expected.float(), atol=1e-2, rtol=1e-2
    )

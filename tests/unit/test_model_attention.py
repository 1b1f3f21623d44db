"""Packing isolation: a packed batch gives the same per-token losses as its documents one at a time."""

import pytest
import torch

from cptkit.model.flops import count_matmul_params, flops_per_token
from cptkit.train.collator import PackedCollator


def _token_losses(logits, labels):
    shift_logits, shift_labels = logits[..., :-1, :], labels[..., 1:]
    losses = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return losses[shift_labels.reshape(-1) != -100]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_equals_separate(tiny_model_dir, implementation):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation=implementation
    )
    model.eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 12, 5, 9, 3)]
    rows = [
        {"input_ids": docs[0] + docs[1] + docs[2], "position_ids": [*range(7), *range(12), *range(5)]},
        {"input_ids": docs[3] + docs[4], "position_ids": [*range(9), *range(3)]},
    ]
    batch = PackedCollator(pad_token_id=0)(rows)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        separate = []
        for doc in docs:
            ids = torch.tensor([doc])
            logits = model(input_ids=ids, use_cache=False).logits
            labels = ids.clone()
            labels[0, 0] = -100
            separate.append(_token_losses(logits, labels))
    got = _token_losses(packed, batch["labels"])
    want = torch.cat(separate)
    assert got.shape == want.shape == (sum(len(d) - 1 for d in docs),)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flops_formula(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    c = model.config
    layer = (
        4 * c.hidden_size * c.hidden_size // 2 * 0
        + c.hidden_size
        * (c.hidden_size + 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads))
        + c.hidden_size * c.hidden_size
        + 3 * c.hidden_size * c.intermediate_size
    )
    n = c.num_hidden_layers * layer + c.hidden_size * c.vocab_size  # + lm_head, no embeddings
    assert count_matmul_params(model) == (0, n)
    attention = 12 * c.num_hidden_layers * c.hidden_size * 128
    assert flops_per_token(model, 128) == 6 * n + attention
    for p in model.parameters():
        p.requires_grad_(False)
    assert flops_per_token(model, 128, causal=True) == 4 * n + attention / 2

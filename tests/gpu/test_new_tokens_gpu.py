"""On a CUDA GPU: QLoRA with added tokens. The new rows start at their pieces' means on the
unquantised embeddings and head, train as peft's trainable tokens with the 4-bit base, and the base
rows do not move. Run through the device tool: pytest -m gpu tests/gpu."""

from __future__ import annotations

import pytest
import torch

from cptkit.config import Config, build_config
from cptkit.data.vocabulary_file import NewToken, Vocabulary

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORDS = [" hypertension", " myocardial", " infarction"]


@pytest.mark.parametrize("mode", ["qlora", "lora", "full"])
def test_new_token_rows_train_on_the_gpu(tiny_model_dir, tiny_tokenizer, mode):
    from transformers import AutoModelForCausalLM

    from cptkit.model.load import load_model_and_tokenizer

    base = len(tiny_tokenizer)
    tokens = [
        NewToken(base + k, w, w, tuple(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]), 9, 9)
        for k, w in enumerate(WORDS)
    ]
    vocabulary = Vocabulary("tiny", "fp", base, base + len(WORDS), "fp2", tokens)
    cfg = build_config(
        Config,
        {
            "model": {"name_or_path": str(tiny_model_dir), "dtype": "bfloat16"},
            "run_dir": "/tmp/unused-run",
            "train": {
                "mode": mode,
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "quantization": {"compute_dtype": "bfloat16"},
            },
        },
    )
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ref_in = reference.get_input_embeddings().weight.detach()
    loaded = load_model_and_tokenizer(cfg.model, cfg.train, tokenizer=tiny_tokenizer, vocabulary=vocabulary)
    model = loaded.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    embed = inner.get_input_embeddings()
    weight = embed.token_adapter.base_layer.weight if hasattr(embed, "token_adapter") else embed.weight
    for t in tokens:  # the start, before any step (bf16 rounding of the fp32 mean)
        expected = ref_in[list(t.pieces)].mean(0).to(weight.dtype).float()
        torch.testing.assert_close(weight[t.id].float().cpu(), expected, rtol=0, atol=1e-2)
    before = weight[:base].detach().clone()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    ids = torch.tensor([[1, 5, base, 7, base + 1, 9, base + 2, 3]], device="cuda")
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(weight[:base], before)
    if mode == "full":
        changed = weight[base:].float() - torch.stack([ref_in[list(t.pieces)].mean(0) for t in tokens]).cuda()
        assert changed.abs().max() > 1e-3
    else:
        deltas = [p for n, p in model.named_parameters() if "trainable_tokens" in n]
        assert deltas and all(d.abs().sum() > 0 for d in deltas)

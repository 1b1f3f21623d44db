"""Merging a model whose vocabulary grew in training: the base has fewer embedding and head rows than the
adapter, which holds the new rows either as peft trainable tokens (only the selected rows' values) or as
trained copies of the whole matrices (modules_to_save), on a base with tied or untied embeddings. The
merged folder must load with plain transformers, ship the extended tokenizer, say the new vocab_size, and
compute what the adapter on the resized base computes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from cptkit.commands import merge
from cptkit.config import Config
from cptkit.config.load import build_config
from cptkit.errors import CptkitError

NEW_WORDS = [" function", " object", " return", " statement", " value", " argument"]
TEXT = "The function returns an object; the return statement gives the value of the argument."


def extended_tokenizer(tokenizer):
    """The base tokenizer with the new words appended (ids base_size .. base_size + K - 1)."""
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(NEW_WORDS)
    return tok


def make_base(folder: Path, tokenizer, tied: bool) -> Path:
    """A tiny Llama whose head is tied to its input embedding or not (a tied one stores no lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def resized_base(base: Path, size: int):
    """The base with its embedding (and head) grown to `size` rows, the new ones at the base rows' mean."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for layer in {
            id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())
        }.values():
            layer.weight[old:] = layer.weight[:old].mean(0)
    return model


def make_adapter(base: Path, tokenizer, folder: Path, kind: str, tied: bool, steps: int = 3) -> Path:
    """A LoRA adapter trained a few steps on the resized base: new rows as trainable tokens (of the
    embedding, and of an untied head), as whole trained copies of embedding and head, or (`lora`) as a
    LoRA update of the grown embedding beside a trained copy of the head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = resized_base(base, len(tokenizer))
    new_ids = list(range(model.config.vocab_size - len(NEW_WORDS), model.config.vocab_size))
    if kind == "tokens":
        indices = {"embed_tokens": new_ids} if tied else {"embed_tokens": new_ids, "lm_head": new_ids}
        extra = {"trainable_token_indices": indices}
    elif kind == "lora":  # LoRA on the grown embedding (peft saves the resized matrix it started from)
        extra = {"modules_to_save": ["lm_head"]}
    else:
        extra = {"modules_to_save": ["embed_tokens", "lm_head"]}
    targets = ["q_proj", "v_proj"] + (["embed_tokens"] if kind == "lora" else [])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def config(tmp_path: Path, base: Path, adapter: Path, **merge_opts) -> Config:
    return build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(base)},
            "merge": {"adapter": str(adapter), "dtype": "float32", **merge_opts},
        },
    )


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizer):
    return tiny_tokenizer, extended_tokenizer(tiny_tokenizer)


@pytest.mark.parametrize(
    "kind, tied",
    [("tokens", False), ("tokens", True), ("copies", False), ("copies", True), ("lora", False)],
    ids=["tokens-untied", "tokens-tied", "copies-untied", "copies-tied", "lora-untied"],
)
def test_merged_extended_vocabulary_equals_the_adapter(tmp_path, tokenizers, kind, tied):
    """The merged model (plain transformers) computes the adapter's logits on the resized base to fp32
    round-off, on text that uses the new tokens; the adapter itself moves them far more."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied)
    adapter = make_adapter(base, ext_tok, tmp_path / "adapter", kind, tied)
    report = merge.run(config(tmp_path, base, adapter))
    out = tmp_path / "run/merged"

    merged_tok = AutoTokenizer.from_pretrained(str(out))
    assert len(merged_tok) == len(ext_tok) == len(base_tok) + len(NEW_WORDS)
    ids = merged_tok(TEXT, return_tensors="pt").input_ids
    assert (ids >= len(base_tok)).sum() >= 4  # the text uses the new tokens
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert (
        merged.config.vocab_size
        == json.loads((out / "config.json").read_text())["vocab_size"]
        == len(ext_tok)
    )
    assert merged.get_input_embeddings().weight.shape[0] == len(ext_tok)
    assert merged.get_output_embeddings().weight.shape[0] == len(ext_tok)
    head_tied = (
        merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    )
    assert head_tied == (tied and kind == "tokens")  # trained copies of both are two matrices

    reference = PeftModel.from_pretrained(resized_base(base, len(ext_tok)), str(adapter)).eval()
    untrained = resized_base(base, len(ext_tok))
    expected, before = logits(reference, ids), logits(untrained, ids)
    assert (expected - before).abs().max() > 1e-2  # training moved the new rows
    assert (logits(merged, ids) - expected).abs().max() < 1e-5
    if kind == "tokens":
        assert set(report["trained_token_rows"].values()) == {len(NEW_WORDS)}


def test_bfloat16_merge_within_its_rounding(tmp_path, tokenizers):
    """bf16 output (weights rounded once) against the adapter computed in fp32: logits agree to 5e-2."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied=False)
    adapter = make_adapter(base, ext_tok, tmp_path / "adapter", "tokens", tied=False)
    merge.run(config(tmp_path, base, adapter, dtype="bfloat16"))
    ids = ext_tok(TEXT, return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run/merged"), dtype=torch.bfloat16)
    reference = PeftModel.from_pretrained(resized_base(base, len(ext_tok)), str(adapter)).eval()
    assert (logits(merged, ids) - logits(reference, ids)).abs().max() < 5e-2


def test_adapter_with_fewer_rows_than_its_tokenizer_is_refused(tmp_path, tokenizers):
    """An adapter trained on the base vocabulary, beside the extended tokenizer: refused before writing."""
    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied=False)
    adapter = make_adapter(base, base_tok, tmp_path / "adapter", "copies", tied=False, steps=1)
    ext_tok.save_pretrained(str(adapter))
    with pytest.raises(
        CptkitError, match=r"has \d+ tokens but the trained input embedding has only \d+ rows"
    ):
        merge.run(config(tmp_path, base, adapter))
    assert not (tmp_path / "run/merged").exists()


def test_full_model_with_resized_embeddings_merged_part_of_the_way(tmp_path, tokenizers):
    """A fully fine-tuned model with grown embeddings at merge.scale 0.5: base rows halfway, new rows as
    trained, the extended tokenizer and vocab_size kept; at scale 1 the train output is the model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied=False)
    trained = resized_base(base, len(ext_tok))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    trained.save_pretrained(str(tmp_path / "full"))
    ext_tok.save_pretrained(str(tmp_path / "full"))

    merge.run(config(tmp_path, base, tmp_path / "full", scale=0.5))
    out = tmp_path / "run/merged"
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert merged.config.vocab_size == len(AutoTokenizer.from_pretrained(str(out))) == len(ext_tok)
    b, t = load_file(str(base / "model.safetensors")), trained.state_dict()
    n = len(base_tok)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = dict(merged.named_parameters())[key]
        torch.testing.assert_close(w[:n], (b[key] + 0.5 * (t[key][:n] - b[key])).float())
        torch.testing.assert_close(w[n:], t[key][n:])
    with pytest.raises(CptkitError, match="nothing to merge"):
        merge.run(config(tmp_path, base, tmp_path / "full"))


def test_qlora_adapter_with_new_tokens_compared_on_the_resized_nf4_base(tmp_path, tokenizers):
    """QLoRA: both merges are compared with the adapter on the 4-bit base resized to the adapter's rows
    (eval's loader grows the vocabulary before peft loads the saved matrices)."""
    from cptkit.paths import RUN_META
    from cptkit.testing.stages import write_prepared
    from cptkit.testing.tiny import sample_texts

    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied=True)
    adapter = make_adapter(base, ext_tok, tmp_path / "adapter", "tokens", tied=True)
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    (adapter / RUN_META).write_text(json.dumps({"mode": "qlora", "quantization": quant}))
    texts = [f"{TEXT} {t}" for t in sample_texts(4)]
    write_prepared(tmp_path / "run/data", {"docs": ("domain", texts[:2])}, ext_tok)
    report = merge.run(config(tmp_path, base, adapter, compare_tokens=128))
    assert set(report["comparison"]["candidates"]) == {"bf16", "dequantized"}
    assert report["kept"] == "dequantized"
    merged = json.loads((tmp_path / "run/merged/config.json").read_text())
    assert merged["vocab_size"] == len(ext_tok) and merged["tie_word_embeddings"] is True


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_trained_token_rows_merged_part_of_the_way(tmp_path, tokenizers, tied):
    """merge.scale 0.5 moves each trained row halfway from its start, as eval's `adapter_at_scale` does
    to the peft model in memory: the two agree to fp32 round-off, and differ from the full merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cptkit.merge.scale import adapter_at_scale

    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied)
    adapter = make_adapter(base, ext_tok, tmp_path / "adapter", "tokens", tied)
    merge.run(config(tmp_path, base, adapter, scale=0.5))
    ids = ext_tok(TEXT, return_tensors="pt").input_ids
    merged = logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "run/merged")), ids)
    reference = PeftModel.from_pretrained(resized_base(base, len(ext_tok)), str(adapter)).eval()
    full = logits(reference, ids)
    with adapter_at_scale(reference, 0.5):
        half = logits(reference, ids)
    assert (full - half).abs().max() > 1e-3
    assert (merged - half).abs().max() < 1e-5
    assert (logits(reference, ids) - full).abs().max() == 0  # restored on exit


def test_full_model_with_fewer_rows_than_its_tokenizer_is_refused(tmp_path, tokenizers):
    """A fully fine-tuned model of the base vocabulary saved with the extended tokenizer: refused."""
    from transformers import AutoModelForCausalLM

    base_tok, ext_tok = tokenizers
    base = make_base(tmp_path / "base", base_tok, tied=False)
    AutoModelForCausalLM.from_pretrained(str(base)).save_pretrained(str(tmp_path / "full"))
    ext_tok.save_pretrained(str(tmp_path / "full"))
    with pytest.raises(
        CptkitError, match=r"has \d+ tokens but the trained input embedding has only \d+ rows"
    ):
        merge.run(config(tmp_path, base, tmp_path / "full", scale=0.5))

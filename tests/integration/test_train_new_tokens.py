"""`cptkit train` on a prepared folder whose tokenizer data.vocabulary extended: it trains with the
folder's `tokenizer/`, grows the model to it, keeps the base rows bit-identical when only the new rows
train (full), saves the new rows with a LoRA adapter, records both in run_meta.json, and refuses a base
model the vocabulary was not extended from or whose embedding matrix is smaller than its tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cptkit.config import Config, build_config
from cptkit.data.manifest import tokenizer_fingerprint
from cptkit.data.vocabulary_file import TOKENIZER_DIR, NewToken, Vocabulary, write_vocabulary
from cptkit.errors import CptkitError
from cptkit.testing.store import tokenizer_entry, write_prepared
from cptkit.testing.tiny import sample_texts

SEQ, BATCH = 64, 4
WORDS = [" hypertension", " myocardial", " infarction"]


@pytest.fixture(scope="module")
def extended(tiny_tokenizer):
    """The tiny tokenizer with WORDS appended (train-side stand-in for prepare's merges: any tokenizer
    whose ids below the base's length are the base's will do here)."""
    tokenizer = __import__("copy").deepcopy(tiny_tokenizer)
    tokenizer.add_tokens(WORDS)
    assert len(tokenizer) == len(tiny_tokenizer) + len(WORDS)
    return tokenizer


def vocabulary(tiny_tokenizer, extended, base_fingerprint: str | None = None) -> Vocabulary:
    base = len(tiny_tokenizer)
    tokens = [
        NewToken(base + k, w, w, tuple(tiny_tokenizer(w, add_special_tokens=False)["input_ids"]), 20, 20)
        for k, w in enumerate(WORDS)
    ]
    return Vocabulary(
        "tiny",
        base_fingerprint or tokenizer_fingerprint(tiny_tokenizer),
        base,
        len(extended),
        tokenizer_fingerprint(extended),
        tokens,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer, extended) -> Path:
    out = tmp_path_factory.mktemp("extended")
    # the words in every row the three steps read (a sample text is far longer than a row)
    texts = [" hypertension and myocardial infarction ".join(t.split(". ")[:40]) for t in sample_texts()[:24]]
    docs = [np.asarray(extended(t)["input_ids"] + [extended.eos_token_id], np.int32) for t in texts]
    assert any(len(tiny_tokenizer) <= i for d in docs for i in d)
    write_prepared(out, {"domain": docs}, SEQ, tokenizer_entry(extended), seed=3, batch_documents=4)
    extended.save_pretrained(out / TOKENIZER_DIR)
    write_vocabulary(out, vocabulary(tiny_tokenizer, extended))
    return out


def make_cfg(out: Path, model_dir, dataset, mode: str = "full", **train) -> Config:
    section = {
        "mode": mode,
        "dataset": str(dataset),
        "output_dir": str(out),
        "report_to": ["none"],
        "eval_steps": 1000,
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "hf": {
            "max_steps": 3,
            "per_device_train_batch_size": BATCH,
            "learning_rate": 1e-2,
            "weight_decay": 0.1,
            "logging_steps": 1,
            "save_steps": 1000,
        },
        **train,
    }
    return build_config(Config, {"model": {"name_or_path": str(model_dir)}, "train": section})


def rows_of(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()


def test_full_new_trains_only_the_new_rows(tmp_path, tiny_model_dir, tiny_tokenizer, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cptkit.commands.train import run

    out = tmp_path / "full"
    run(make_cfg(out, tiny_model_dir, folder, embedding_lr=5e-2))
    base_in, base_out = rows_of(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    trained_in, trained_out = rows_of(AutoModelForCausalLM.from_pretrained(out))
    n = len(tiny_tokenizer)
    assert trained_in.shape[0] == trained_out.shape[0] == n + len(WORDS)
    assert torch.equal(trained_in[:n], base_in) and torch.equal(trained_out[:n], base_out)
    v = vocabulary(tiny_tokenizer, AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR))
    for t in v.tokens:  # moved away from their starting means
        assert not torch.allclose(trained_in[t.id], base_in[list(t.pieces)].mean(0))
        assert not torch.allclose(trained_out[t.id], base_out[list(t.pieces)].mean(0))
    assert len(AutoTokenizer.from_pretrained(out)) == n + len(WORDS)  # the extended tokenizer is saved
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["new_tokens"] == {"added": 3, "size": n + 3, "tied": False, "init": "mean"}
    assert meta["untrained_rows"]["input embeddings"]["in_data"] == 0


def test_lora_new_saves_the_new_rows_with_the_adapter(tmp_path, tiny_model_dir, tiny_tokenizer, folder):
    from safetensors import safe_open

    from cptkit.commands.train import run

    out = tmp_path / "lora"
    run(make_cfg(out, tiny_model_dir, folder, mode="lora", embedding_lr=5e-2))
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        deltas = {k: f.get_tensor(k) for k in f.keys() if "trainable_tokens" in k}
    assert len(deltas) == 2  # embed_tokens and the untied lm_head
    assert all(d.shape[0] == len(WORDS) and d.abs().sum() > 0 for d in deltas.values())


def test_a_base_the_vocabulary_was_not_extended_from_is_refused(
    tmp_path, tiny_model_dir, tiny_tokenizer, folder, extended
):
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    write_vocabulary(other, vocabulary(tiny_tokenizer, extended, base_fingerprint="0123456789abcdef"))
    from cptkit.commands.train import run

    with pytest.raises(CptkitError, match="extended from tiny \\(fingerprint 0123456789abcdef\\)"):
        run(make_cfg(tmp_path / "out", tiny_model_dir, other))


def test_an_embedding_matrix_smaller_than_the_tokenizer_is_refused(
    tmp_path, tiny_model_dir, tiny_tokenizer, folder
):
    from cptkit.commands.train import run

    short = tmp_path / "short"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    config["vocab_size"] = len(tiny_tokenizer) - 8
    (short / "config.json").write_text(json.dumps(config))
    (short / "model.safetensors").write_bytes(b"not loaded")  # refused before any weight is read
    n = len(tiny_tokenizer)
    with pytest.raises(CptkitError, match=f"embedding matrix has {n - 8} rows but its tokenizer {n} tokens"):
        run(make_cfg(tmp_path / "out", short, folder))

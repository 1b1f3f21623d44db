"""A domain vocabulary end to end with `cptkit run` on a tiny Llama: prepare learns the extension and
tokenizes with it, train grows and trains the new rows (LoRA, the new rows only), merge writes a model
with the extended vocabulary and tokenizer that plain transformers loads, eval scores base and merged
(different tokenizers: bits per byte) and the report shows fertility before and after."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from cptkit.cli import main as cli
from cptkit.data.vocabulary_file import read_vocabulary


@pytest.fixture(scope="module")
def extended_run(tmp_path_factory, tiny_model_dir):
    from test_run import pipeline_config  # the pipeline test's corpus and settings

    root = tmp_path_factory.mktemp("vocabulary")
    config = pipeline_config(root, tiny_model_dir)
    config["data"]["vocabulary"] = {"extend": 24, "min_frequency": 3}
    config["train"]["embedding_lr"] = 1e-2
    path = root / "vocabulary.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["run", str(path)]) == 0
    return root / "run"


def test_the_extended_vocabulary_goes_from_prepare_to_a_merged_model(extended_run, tiny_model_dir):
    vocabulary = read_vocabulary(extended_run / "data")
    assert vocabulary is not None and len(vocabulary.tokens) == 24
    base = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    merged_dir = extended_run / "merged"
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    assert len(tokenizer) == vocabulary.size == len(base) + 24
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert model.config.vocab_size == vocabulary.size
    assert model.get_input_embeddings().weight.shape[0] == vocabulary.size
    text = " ".join(t.text for t in vocabulary.tokens[:8])
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.max() >= len(base)  # the text uses new tokens
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # the new rows were initialised from their pieces and then trained: not the piece means any more
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).get_input_embeddings().weight
    token = vocabulary.tokens[0]
    mean = original[list(token.pieces)].mean(0)
    assert not torch.allclose(model.get_input_embeddings().weight[token.id], mean)


def test_eval_and_report_compare_the_tokenizers(extended_run):
    results = json.loads((extended_run / "eval" / "results.json").read_text())
    by = {(r["model"], r["set"]): r for r in results["results"]}
    assert {("base", "docs"), ("merged", "docs")} <= set(by)
    assert all("bits_per_byte" in r for r in by.values())
    report = (extended_run / "report" / "report.md").read_text()
    assert "Fertility" in report and "->" in report

"""cptkit eval: packed scoring equals one document at a time, numbers equal a hand computation,
bits per byte counts UTF-8 bytes, the default model list and the deltas, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cptkit.commands import eval as eval_cmd
from cptkit.commands import merge
from cptkit.config import Config, build_config
from cptkit.config.evaluate import EvalModel
from cptkit.errors import CptkitError
from cptkit.eval.packing import packed_batches, windows
from cptkit.eval.perplexity import score_documents
from cptkit.eval.results import (
    HEADLINE_WORDING,
    REPORT_WORDING,
    RESULTS_WORDING,
    deltas,
    markdown,
    results_record,
    verdict,
)
from cptkit.eval.score import nf4_base
from cptkit.testing.stages import make_lora_adapter, write_prepared
from cptkit.testing.tiny import sample_texts

RESULT_KEYS = {"model", "set", "role", "loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents"}
DELTA_KEYS = {
    "model",
    "set",
    "role",
    "loss_delta",
    "perplexity_before",
    "perplexity_after",
    "perplexity_change",
    "perplexity_change_interval",
    "bpb_delta",
}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


def hand_nats(model, ids: list[int], seq_length: int) -> tuple[float, int]:
    """-sum log p of every token after the first, each window of seq_length (overlapping by one) on its own."""
    nats, tokens = 0.0, 0
    for start in range(0, max(len(ids) - 1, 1), seq_length - 1):
        w = torch.tensor(ids[start : start + seq_length])
        with torch.no_grad():
            logp = model(input_ids=w[None], use_cache=False).logits[0].log_softmax(-1)
        nats -= float(logp[:-1].gather(1, w[1:, None]).sum())
        tokens += len(w) - 1
    return nats, tokens


def test_packed_scores_equal_one_document_at_a_time(model):
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 40, 130, 2, 64, 65, 17, 1]
    docs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths]
    scores = score_documents(model, docs, seq_length=64, batch_size=3)
    for ids, nats, tokens in zip(docs, scores.nats, scores.tokens, strict=True):
        expected, expected_tokens = hand_nats(model, ids, 64) if len(ids) > 1 else (0.0, 0)
        assert tokens == expected_tokens == len(ids) - 1 if len(ids) > 1 else tokens == 0
        assert nats == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_rows_pack_several_documents_and_labels_mask_each_start():
    docs = [[1, 2, 3], [4, 5], list(range(10, 30))]
    (batch,) = packed_batches(docs, seq_length=8, batch_size=8)
    assert [len(w) for w in windows(docs[2], 8)] == [8, 8, 6]  # 20 tokens, windows overlap by one
    assert int((batch.labels != -100).sum()) == 2 + 1 + 19  # every token after a document's first, once
    starts = batch.position_ids == 0
    assert bool((batch.labels[starts] == -100).all())
    assert batch.input_ids.shape[0] < 5  # 3 + 2 + 8 + 8 + 6 tokens packed into fewer rows than windows


def test_eval_equals_hand_computation_and_bits_per_byte_counts_utf8_bytes(
    tmp_path, tiny_model_dir, tiny_tokenizer, model
):
    texts = [
        "naïve café: déjà vu — 日本語のテキスト, ünïcödé ✓",
        "plain ascii text about SQL tables and indexes",
        "Größe ≠ size",
    ]
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps({"body": t}) + "\n" for t in texts), encoding="utf-8"
    )
    cfg = build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "eval": {
                "models": [{"name": "base", "path": str(tiny_model_dir)}],
                "seq_length": 32,
                "batch_size": 2,
                "extra_texts": [
                    {
                        "name": "mixed",
                        "path": str(tmp_path / "texts.jsonl"),
                        "text_field": "body",
                        "role": "general",
                    }
                ],
            },
        },
    )
    result = eval_cmd.run(cfg)
    (row,) = result["results"]
    nats = tokens = 0
    for t in texts:
        ids = tiny_tokenizer(t)["input_ids"] + [tiny_tokenizer.eos_token_id]
        n, k = hand_nats(model, ids, 32)
        nats, tokens = nats + n, tokens + k
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert num_bytes > sum(len(t) for t in texts)  # the test text really is multi-byte
    assert row["bytes"] == num_bytes and row["tokens"] == tokens and row["documents"] == 3
    assert row["loss"] == pytest.approx(nats / tokens, rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
    assert row["bits_per_byte"] == pytest.approx(nats / (math.log(2) * num_bytes), rel=1e-5)
    assert RESULT_KEYS <= set(row) and row["role"] == "general"
    assert (tmp_path / "run/eval/results.md").read_text().count("| base | mixed |") == 1


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A run folder as prepare, train (a LoRA adapter) and merge leave it."""
    run = tmp_path_factory.mktemp("run")
    texts = [t[:400] for t in sample_texts(12)]
    write_prepared(
        run / "data", {"pydocs": ("domain", texts[:4]), "prose": ("general", texts[4:8])}, tiny_tokenizer
    )
    make_lora_adapter(tiny_model_dir, run / "train", scale=0.1)
    tiny_tokenizer.save_pretrained(run / "train")
    merge.run(
        build_config(
            Config,
            {
                "run_dir": str(run),
                "model": {"name_or_path": str(tiny_model_dir)},
                "merge": {"dtype": "float32"},
            },
        )
    )
    return run


def test_default_models_results_and_deltas(run_dir, tiny_model_dir):
    cfg = build_config(
        Config,
        {"run_dir": str(run_dir), "model": {"name_or_path": str(tiny_model_dir)}, "eval": {"batch_size": 4}},
    )
    result = eval_cmd.run(cfg)
    saved = json.loads((run_dir / "eval/results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    rows = {(r["model"], r["set"]): r for r in saved["results"]}
    assert set(rows) == {(m, s) for m in ("base", "adapted", "merged") for s in ("pydocs", "prose")}
    assert all(RESULT_KEYS <= set(r) for r in saved["results"])
    assert {r["role"] for r in saved["results"] if r["set"] == "prose"} == {"general"}
    for s in ("pydocs", "prose"):  # the merged model is the adapter on the base
        assert rows[("merged", s)]["loss"] == pytest.approx(rows[("adapted", s)]["loss"], rel=1e-4)
        assert rows[("adapted", s)]["loss"] != pytest.approx(rows[("base", s)]["loss"], rel=1e-4)
    assert len(saved["deltas"]) == 4 and all(set(d) == DELTA_KEYS for d in saved["deltas"])
    d = next(d for d in saved["deltas"] if d["model"] == "adapted" and d["set"] == "prose")
    assert d["loss_delta"] == pytest.approx(
        rows[("adapted", "prose")]["loss"] - rows[("base", "prose")]["loss"]
    )
    md = (run_dir / "eval/results.md").read_text()
    assert "## Against the base model" in md and ("forgetting" in md)


def test_missing_heldout_set_is_an_error_before_any_model_loads(tmp_path, tiny_model_dir, tiny_tokenizer):
    import shutil

    write_prepared(
        tmp_path / "run/data",
        {"a": ("domain", ["some text here"]), "b": ("general", ["more text"])},
        tiny_tokenizer,
    )
    shutil.rmtree(tmp_path / "run/data/heldout/b")
    cfg = build_config(
        Config, {"run_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_model_dir)}}
    )
    with pytest.raises(CptkitError, match="heldout/b listed in manifest.json but missing"):
        eval_cmd.run(cfg)
    assert not (tmp_path / "run/eval").exists()


def test_model_folder_without_weights_is_an_error(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "t.txt").write_text("a document")
    cfg = build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "eval": {
                "models": [{"name": "base", "path": str(empty)}],
                "extra_texts": [{"name": "t", "path": str(tmp_path / "t.txt")}],
            },
        },
    )
    with pytest.raises(CptkitError, match="without weights"):
        eval_cmd.run(cfg)
    assert not (tmp_path / "run/eval").exists()


@pytest.mark.parametrize(
    "wording, domain, general",
    [
        (RESULTS_WORDING, ("domain gain", "domain got worse"), ("forgetting", "improved")),
        (REPORT_WORDING, ("gain", "got worse"), ("forgetting", "improved")),
        (HEADLINE_WORDING, ("learned", "got worse"), ("forgot", "improved")),
    ],
    ids=["results", "report", "headline"],
)
def test_each_place_words_the_verdict_its_own_way(wording, domain, general):
    """An interval wholly below 0 is a gain on a domain set (improvement on a general one), wholly above
    is worse (forgetting); one across 0 is within the noise, whatever the sign of the change."""
    below, above, across = [-0.05, -0.01], [0.01, 0.04], [-0.02, 0.03]
    assert [verdict("domain", c, wording, i) for c, i in ((-0.1, below), (0.1, above))] == list(domain)
    assert [verdict("general", c, wording, i) for c, i in ((0.1, above), (-0.1, below))] == list(general)
    assert verdict("domain", -0.1, wording, across) == "no change within noise (±2.5%)"
    assert verdict("general", -0.1, wording, across) == "no measurable forgetting (interval [-2.0%, +3.0%])"
    # without an interval only the direction is said, and marked as such; no change is no change
    assert verdict("general", -0.1, wording) == f"{general[1]} (no noise estimate)"
    assert verdict("domain", -0.1, wording) == f"{domain[0]} (no noise estimate)"
    assert verdict("domain", 0.0, wording) == verdict("general", 0.0, wording) == "no change"


def test_results_markdown_reads_each_delta():
    """Each delta with its perplexity change, the interval over documents and what it reads as: a change
    the old reading called forgetting (+5% on the set) is within the noise of two unlike documents."""
    rows = [
        {
            "model": m,
            "set": s,
            "role": r,
            "loss": sum(nats) / 100,
            "perplexity": math.exp(sum(nats) / 100),
            "bits_per_byte": sum(nats) / 300,
            "doc_nats": nats,
            "doc_tokens": [50, 50],
        }
        | {"tokens": 100, "bytes": 400, "documents": 2}
        for m, s, r, nats in [
            ("base", "sql", "domain", [100.0, 100.0]),
            ("base", "prose", "general", [75.0, 75.0]),
            ("adapted", "sql", "domain", [78.0, 82.0]),
            ("adapted", "prose", "general", [74.0, 81.0]),
        ]
    ]
    md = markdown(rows, deltas(rows)).splitlines()
    assert "| adapted | sql | domain | 1.6000 | 4.953 | 0.5333 | 100 | 400 | 2 |" in md
    assert (
        "| adapted | sql | domain | -0.4000 | 7.389 -> 4.953 | -0.1333 | -33.0% [-35.6%, -30.2%] | domain gain |"
        in md
    )
    assert (
        "| adapted | prose | general | +0.0500 | 4.482 -> 4.711 | +0.0167 | +5.1% [-2.0%, +12.7%] | "
        "no measurable forgetting (interval [-2.0%, +12.7%]) |" in md
    )
    assert md[md.index("## Against the base model") + 3] == "|---|---|---|---:|---:|---:|---:|---|"
    # results.json keeps the rows' documented shape: the per-document numbers are not written
    record = results_record(rows, [], [], 64, "cpu", "float32", resamples=200)
    assert all("doc_nats" not in r and "doc_tokens" not in r for r in record["results"])
    assert record["bootstrap"]["resamples"] == 200
    assert all(d["perplexity_change_interval"] is not None for d in record["deltas"])


def test_a_qlora_adapter_is_evaluated_on_the_nf4_base_unless_told_not_to(tmp_path):
    recorded = {"bits": 4, "quant_type": "nf4", "double_quant": False, "compute_dtype": "float16"}
    for name, meta in (("qlora", {"mode": "qlora", "quantization": recorded}), ("lora", {"mode": "lora"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_meta.json").write_text(json.dumps(meta))
    qlora, lora = str(tmp_path / "qlora"), str(tmp_path / "lora")
    expected = {"quant_type": "nf4", "double_quant": False, "dtype": torch.float16}
    assert nf4_base(EvalModel(name="a", path="base", adapter=qlora)) == expected
    assert nf4_base(EvalModel(name="a", path="base", adapter=qlora, nf4_base=False)) is None
    assert nf4_base(EvalModel(name="a", path="base", adapter=lora)) is None
    assert nf4_base(EvalModel(name="a", path="base", adapter=lora, nf4_base=True))["dtype"] == torch.bfloat16
    assert nf4_base(EvalModel(name="a", path="base")) is None

"""Sample generations: greedy continuations of domain and general prompts from every evaluated model, in
results.json and the report (with the chat probe, through `cptkit eval` and `cptkit report`)."""

from __future__ import annotations

import json

import pytest
import torch

from cptkit import presets
from cptkit.commands import eval as evaluate
from cptkit.commands import report
from cptkit.config import Config, build_config
from cptkit.config.evaluate import EvalModel, SamplesConfig
from cptkit.data.self_replay import read_prompts
from cptkit.eval.samples import PROMPT_WORDS, generate_samples, markdown_lines, sample_prompts
from cptkit.eval.sets import EvalSet
from cptkit.paths import resolve
from cptkit.testing.stages import write_prepared
from cptkit.testing.tiny import make_tiny_llama, sample_texts, train_tokenizer, with_chat_template

DOCS = [t for t in sample_texts(30) if len(t.split()) > 40][:4]


def _set(name: str, role: str, texts: list[str]) -> EvalSet:
    return EvalSet(name, role, texts, [len(t.encode()) for t in texts])


def test_default_prompts_are_held_out_openings_and_the_shipped_neutral_prompts():
    sets = [_set("general", "general", ["not a domain text"]), _set("docs", "domain", DOCS)]
    prompts = sample_prompts(SamplesConfig(count=2), sets)
    assert prompts[:2] == [("domain", " ".join(d.split()[:PROMPT_WORDS])) for d in DOCS[:2]]
    assert prompts[2:] == [("general", p) for p in read_prompts(None)[:2]]
    mine = SamplesConfig(count=2, domain_prompts=["def f():"], general_prompts=["Once upon a time"])
    assert sample_prompts(mine, sets) == [
        ("domain", "def f():"),
        ("domain", " ".join(DOCS[0].split()[:PROMPT_WORDS])),
        ("general", "Once upon a time"),
    ]


def test_every_model_continues_every_prompt_greedily(tiny_model_dir):
    models = [
        EvalModel(name="base", path=str(tiny_model_dir)),
        EvalModel(name="again", path=str(tiny_model_dir)),
    ]
    cfg = SamplesConfig(count=2, max_new_tokens=5)
    sets = [_set("docs", "domain", DOCS)]
    samples = generate_samples(cfg, models, sets, torch.device("cpu"), torch.float32)
    assert [(s["model"], s["role"]) for s in samples] == [
        (m, r) for m in ("base", "again") for r in ("domain", "domain", "general", "general")
    ]
    assert all(s["text"] for s in samples)
    assert [s["text"] for s in samples[:4]] == [
        s["text"] for s in samples[4:]
    ]  # greedy: the same model agrees
    assert generate_samples(SamplesConfig(), models, sets, torch.device("cpu"), torch.float32) is None


def test_the_report_shows_each_prompt_then_each_models_continuation():
    samples = [
        {"model": "base", "role": "general", "prompt": "The weather", "text": "is fine |\n today"},
        {"model": "merged", "role": "general", "prompt": "The weather", "text": "word " * 200},
    ]
    lines = markdown_lines(samples)
    assert lines[0] == "general prompt: `The weather`"
    assert "| base | is fine \\| today |" in lines
    merged = next(line for line in lines if line.startswith("| merged |"))
    assert merged.endswith(" ... |") and len(merged) < 340


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    tokenizer = with_chat_template(train_tokenizer(sample_texts(60)))
    root = tmp_path_factory.mktemp("chat-models")
    return [
        make_tiny_llama(root / name, tokenizer=tokenizer, seed=seed) for name, seed in (("a", 0), ("b", 1))
    ]


def test_eval_writes_samples_and_the_chat_probe_and_the_report_shows_them(tmp_path, chat_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_models[0])
    general = ["The river runs through the valley and the town lies beside it."] * 2
    prepared = write_prepared(
        tmp_path / "prepared", {"docs": ("domain", DOCS[:2]), "own": ("general", general[:1])}, tokenizer
    )
    cfg = build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(chat_models[0])},
            "eval": {
                "models": [
                    {"name": "base", "path": str(chat_models[0])},
                    {"name": "merged", "path": str(chat_models[1])},
                ],
                "dataset": str(prepared),
                "device": "cpu",
                "samples": {"count": 1, "max_new_tokens": 4},
                "chat_probe": {"path": str(presets.path("chat_probe.jsonl")), "max_examples": 6},
            },
        },
        source="test",
    )
    evaluate.run(cfg)
    results = json.loads(resolve(cfg).eval_results.read_text())
    assert [(s["model"], s["role"]) for s in results["samples"]] == [
        ("base", "domain"),
        ("base", "general"),
        ("merged", "domain"),
        ("merged", "general"),
    ]
    probe = results["chat_probe"]
    assert set(probe) == {"base", "merged"} and probe["base"]["examples"] == 6
    assert probe["base"]["loss"] != probe["merged"]["loss"]  # different weights, different answers
    report.run(resolve(cfg))
    text = resolve(cfg).report_md.read_text()
    assert "## Chat behaviour" in text and "- **merged**: answer loss" in text and "->" in text
    assert "## Sample generations" in text and "general prompt: `The history of the old harbour" in text

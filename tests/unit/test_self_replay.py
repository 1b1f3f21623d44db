"""Self-replay sources: the base model writes general documents before tokenization (seeded, cached by
model, prompts and settings), which then go through prepare like any source."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from cptkit.config import Config, build_config
from cptkit.config.data import DataConfig, FilterConfig, SelfReplayConfig, SourceConfig
from cptkit.config.load import ConfigError
from cptkit.data.prepare import prepare
from cptkit.data.self_replay import PREFIX, read_prompts, shipped_prompts, source_inputs
from cptkit.errors import CptkitError
from cptkit.generate import vllm_installed
from cptkit.testing.tiny import sample_texts

LENIENT = FilterConfig(min_chars=1, min_words=1, max_non_text_fraction=1.0)


@pytest.fixture
def model(tmp_path, tiny_model_dir):
    """A copy of the tiny model this test may damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def replay_data(tmp_path, model, filters=LENIENT, dedup="exact", **spec) -> DataConfig:
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_texts(12)), encoding="utf-8")
    spec = {"documents": 6, "max_new_tokens": 8, **spec}
    own = SelfReplayConfig(model=str(model), **spec)
    return DataConfig(
        tokenizer=str(model),
        sources=[
            SourceConfig(name="domain", path=str(domain)),
            SourceConfig(name="own", type="self_replay", role="general", weight=0.3, self_replay=own),
        ],
        seq_length=64,
        heldout_fraction=0.0,
        filters=filters,
        dedup=dedup,
        num_proc=1,
    )


def generated_files(out):
    return sorted((out / "store" / "own").glob(f"{PREFIX}*.jsonl"))


def generated_texts(out) -> list[str]:
    (file,) = generated_files(out)
    return [json.loads(line)["text"] for line in file.read_text(encoding="utf-8").splitlines()]


def test_the_model_writes_the_documents_deterministically_by_seed(tmp_path, model):
    first = prepare(replay_data(tmp_path, model), tmp_path / "a")
    again = prepare(replay_data(tmp_path, model), tmp_path / "b")
    other = prepare(replay_data(tmp_path, model, seed=7), tmp_path / "c")
    texts = generated_texts(tmp_path / "a")
    assert len(texts) == 6 and all(texts)
    assert generated_texts(tmp_path / "b") == texts
    assert generated_texts(tmp_path / "c") != texts
    # shipped prompts taken in turn: each document starts with its prompt
    prompts = read_prompts(None)
    assert all(t.startswith(prompts[i].split()[0]) for i, t in enumerate(texts))
    record = first.manifest["sources"]["own"]["self_replay"]
    assert record["documents_written"] == 6 and record["model"] == str(model)
    assert record["max_new_tokens"] == 8 and record["temperature"] == 0.8 and record["prompts"] == "shipped"
    assert record["engine_used"] == "transformers" and 0 < record["tokens_written"] <= 6 * 8
    assert first.manifest["sources"]["own"]["documents"] == 6
    assert again.manifest["sources"]["own"]["tokens"] == first.manifest["sources"]["own"]["tokens"]
    assert other.manifest["sources"]["own"]["self_replay"]["seed"] == 7


def test_a_second_prepare_reuses_the_documents_without_loading_the_model(tmp_path, model):
    data = replay_data(tmp_path, model)
    prepare(data, tmp_path / "out")
    (file,) = generated_files(tmp_path / "out")
    written = file.read_bytes()
    # the weights become unreadable, their size and modification time unchanged: a load would fail
    weights = model / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"\0" * stat.st_size)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepare(data, tmp_path / "out", force=True)
    assert generated_files(tmp_path / "out") == [file] and file.read_bytes() == written
    assert again.manifest["sources"]["own"]["self_replay"]["documents_written"] == 6


def test_a_changed_setting_writes_the_documents_again(tmp_path, model):
    prepare(replay_data(tmp_path, model), tmp_path / "out")
    before = generated_texts(tmp_path / "out")
    prepare(replay_data(tmp_path, model, max_new_tokens=4), tmp_path / "out")
    files = generated_files(tmp_path / "out")
    assert len(files) == 2  # the old entry stays until data.prune_cache removes it
    data = replay_data(tmp_path, model, max_new_tokens=4)
    data.prune_cache = True
    prepare(data, tmp_path / "out", force=True)
    after = generated_texts(tmp_path / "out")
    assert after != before and all(len(a) <= len(b) for a, b in zip(after, before, strict=True))


def test_a_token_budget_stops_the_writing(tmp_path, model):
    prepared = prepare(replay_data(tmp_path, model, documents=20, max_tokens=10), tmp_path / "out")
    record = prepared.manifest["sources"]["own"]["self_replay"]
    assert 2 <= record["documents_written"] < 20 and record["tokens_written"] >= 10
    assert len(generated_texts(tmp_path / "out")) == record["documents_written"]


def test_generated_documents_are_filtered_and_deduplicated_like_any_source(tmp_path, model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three four five six seven eight nine ten\n\nhi\n", encoding="utf-8")
    filters = FilterConfig(min_chars=1, min_words=8, max_non_text_fraction=1.0)
    data = replay_data(
        tmp_path, model, filters=filters, prompts=str(prompts), temperature=0.0, documents=6, max_new_tokens=2
    )
    data.sources[0].path = str(tmp_path / "domain-long.jsonl")
    long_docs = [t for t in sample_texts(40) if len(t.split()) >= 8][:12]
    (tmp_path / "domain-long.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in long_docs))
    own = prepare(data, tmp_path / "out").manifest["sources"]["own"]
    # greedy: the 3 documents of the long prompt are one text twice repeated; "hi" has too few words
    assert own["read"] == 6 and sum(own["drops"].values()) == 3
    assert own["duplicates"] == 2 and own["documents"] == 1


def test_the_prompts_are_a_file_one_a_line(tmp_path):
    file = tmp_path / "p.txt"
    file.write_text("first prompt\n\n   \nsecond prompt  \n", encoding="utf-8")
    assert read_prompts(str(file)) == ["first prompt", "second prompt"]
    shipped = read_prompts(None)
    assert len(shipped) >= 100 and len(set(shipped)) == len(shipped)
    assert shipped[0] == "The history of the old harbour town begins"
    file.write_text("\n \n", encoding="utf-8")
    with pytest.raises(CptkitError, match="holds no prompt"):
        read_prompts(str(file))


def test_the_stage_inputs_of_a_self_replay_source_are_its_model_and_prompts():
    source = SourceConfig(name="own", type="self_replay")
    assert source_inputs(source, "base-model") == ["base-model", str(shipped_prompts())]
    source.self_replay.model, source.self_replay.prompts = "writer", "p.txt"
    assert source_inputs(source, "base-model") == ["writer", "p.txt"]


def _config(tmp_path, own: dict, model: bool = True) -> Config:
    data = {
        "run_dir": str(tmp_path / "run"),
        "data": {"tokenizer": "tok", "sources": [{"name": "own", "type": "self_replay", **own}]},
    }
    if model:
        data["model"] = {"name_or_path": "base-model"}
    return build_config(Config, data, source="test")


def test_bad_self_replay_settings_are_refused_before_anything_loads(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ConfigError) as found:
        _config(tmp_path, {}, model=False)
    assert "data.sources[0].self_replay.model" in str(found.value)
    assert "model.name_or_path" in str(found.value)
    assert _config(tmp_path, {}).data.sources[0].self_replay.model is None  # the base model writes it
    bad = {
        "path": str(tmp_path),
        "self_replay": {"prompts": str(empty), "documents": 0, "top_p": 1.5, "temperature": -1},
    }
    with pytest.raises(ConfigError) as found:
        _config(tmp_path, bad)
    message = str(found.value)
    for where in ("path", "self_replay.prompts", "self_replay.documents", "self_replay.top_p"):
        assert f"data.sources[0].{where}" in message
    assert "self_replay.temperature" in message and "holds no prompt" in message


def test_a_prepare_without_any_model_for_the_source_is_refused(tmp_path, model):
    data = replay_data(tmp_path, model)
    data.sources[1].self_replay.model = None
    with pytest.raises(CptkitError, match=r"data.sources\[1\].self_replay.model"):
        prepare(data, tmp_path / "out")


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed here")
def test_engine_vllm_without_vllm_names_the_package(tmp_path, model):
    with pytest.raises(CptkitError, match="pip install vllm"):
        prepare(replay_data(tmp_path, model, engine="vllm"), tmp_path / "out")
    assert not generated_files(tmp_path / "out")


def test_cptkit_runs_prepare_stamp_follows_the_model_that_writes_the_text(tmp_path):
    from cptkit.pipeline.stages import STAGES

    (tmp_path / "docs").mkdir()
    (prepare_stage,) = [s for s in STAGES if s.name == "prepare"]
    cfg = _config(tmp_path, {})
    cfg.data.sources.insert(0, SourceConfig(name="docs", path=str(tmp_path / "docs")))
    assert prepare_stage.inputs(cfg) == [str(tmp_path / "docs"), "base-model", str(shipped_prompts())]

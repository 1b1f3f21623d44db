"""`cptkit plan`: every shipped preset plans on a CPU without weights; a prepared folder gives exact
counts, an unprepared corpus an estimate close to what prepare then counts; each warning fires on a
config made to trigger it and not on a plain one; an unknown GPU is refused with the list."""

from __future__ import annotations

import json

import pytest
import yaml

from cptkit import cli, presets
from cptkit.config import Config, load_config
from cptkit.data.prepare import prepare
from cptkit.testing.shapes import LLAMA3_8B
from cptkit.testing.tiny import sample_texts


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two folders of real text: a third of Python's reference topics as general text, the rest as domain."""
    root = tmp_path_factory.mktemp("corpora")
    for role in ("domain", "general"):
        (root / role).mkdir()
    for i, text in enumerate(sample_texts()):
        (root / ("general" if i % 3 == 0 else "domain") / f"{i:04d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def llama3_8b_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3-8b") / "config.json"
    path.write_text(json.dumps(LLAMA3_8B), encoding="utf-8")
    return path


def plain_config(tmp_path, corpora, model_dir, **train) -> str:
    """A plain LoRA run on the tiny model: 70% domain, 30% general, cptkit's defaults otherwise."""
    path = tmp_path / "run.yaml"
    text = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "tokenizer": str(model_dir),
            "seq_length": 128,
            "num_proc": 1,
            "sources": [
                {"name": "domain", "path": str(corpora / "domain"), "weight": 0.7},
                {"name": "general", "path": str(corpora / "general"), "weight": 0.3, "role": "general"},
            ],
        },
        "train": {"mode": "lora", **train},
    }
    path.write_text(yaml.safe_dump(text), encoding="utf-8")
    return str(path)


def plan_json(tmp_path, capsys, *args) -> dict:
    out = tmp_path / "plan.json"
    assert cli.main(["plan", *args, "--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text(encoding="utf-8"))


def warned(plan: dict) -> set[str]:
    return {w["where"] for w in plan["warnings"]}


@pytest.mark.parametrize("name", presets.names())
def test_every_shipped_preset_plans_on_a_cpu_from_its_model_config(
    name, tmp_path, capsys, corpora, llama3_8b_config
):
    sources = yaml.safe_load(presets.path(name).read_text())["data"]["sources"]
    paths = [f"data.sources[{i}].path={corpora / 'domain'}" for i, s in enumerate(sources) if "path" in s]
    plan = plan_json(
        tmp_path, capsys, name, f"run_dir={tmp_path}", *paths, "--model-config", str(llama3_8b_config)
    )
    printed = capsys.readouterr().out
    assert "Data (estimated from" in printed and "GPU h200" in printed and "predicted peak" in printed
    assert plan["model"]["params"] == 8_030_261_248
    assert plan["steps"]["optimizer_steps"] >= 1 and plan["data"]["trained_tokens"] > 0
    assert plan["gpus"][0]["auto"]["predicted_peak_bytes"] > 0


def test_a_hub_model_not_on_disk_is_refused_saying_what_to_pass(tmp_path, capsys, corpora):
    paths = [f"data.sources[{i}].path={corpora / 'domain'}" for i in range(2)]
    assert cli.main(["plan", "lora-all-linear-8b", f"run_dir={tmp_path}", *paths]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path: meta-llama/Meta-Llama-3-8B is not on disk" in err and "--model-config" in err


def test_an_unknown_gpu_is_refused_with_the_list(tmp_path, capsys, corpora, tiny_model_dir):
    assert cli.main(["plan", plain_config(tmp_path, corpora, tiny_model_dir), "--gpu", "h300"]) == 2
    err = capsys.readouterr().err
    assert "--gpu h300: not a GPU cptkit knows" in err
    assert all(name in err for name in ("h100-80gb", "a100-40gb", "rtx4090", "l40s"))


def test_a_prepared_dataset_gives_the_manifest_counts(tmp_path, capsys, corpora, tiny_model_dir):
    config = plain_config(tmp_path, corpora, tiny_model_dir)
    prepared = prepare(load_config(Config, config).data, tmp_path / "run" / "data")
    plan = plan_json(tmp_path, capsys, config)
    data = plan["data"]
    assert data["exact"] and data["origin"].startswith("from the prepared manifest")
    assert data["rows"] == prepared.totals["rows"]
    assert data["trained_tokens"] == prepared.totals["trained_tokens"]
    for name, source in prepared.sources.items():
        assert data["sources"][name]["tokens"] == source["tokens"]
        assert data["sources"][name]["mixed_tokens"] == source["mixed_tokens"]


@pytest.mark.parametrize("chunking", ["packing", "chars", "sentences"])
def test_an_unprepared_corpus_is_estimated_within_a_fifth_of_what_prepare_counts(
    chunking, tmp_path, capsys, corpora, tiny_model_dir
):
    config = plain_config(tmp_path, corpora, tiny_model_dir)
    chunked = f"data.chunking={chunking}"
    plan = plan_json(tmp_path, capsys, config, chunked, "--sample-mb", "0.15")  # about a third of the corpus
    data = plan["data"]
    assert not data["exact"] and data["origin"].startswith("estimated from 0.")
    prepared = prepare(load_config(Config, config, [chunked]).data, tmp_path / "run" / "data")
    assert data["trained_tokens"] == pytest.approx(prepared.totals["trained_tokens"], rel=0.2)
    assert data["rows"] == pytest.approx(prepared.totals["rows"], rel=0.2)
    for name, source in prepared.sources.items():
        assert data["sources"][name]["tokens"] == pytest.approx(source["tokens"], rel=0.2)
        assert data["sources"][name]["documents"] == pytest.approx(source["documents"], rel=0.2)


def test_a_plain_config_has_no_warning(tmp_path, capsys, corpora, tiny_model_dir):
    plan = plan_json(tmp_path, capsys, plain_config(tmp_path, corpora, tiny_model_dir))
    assert plan["warnings"] == []
    assert "Warnings: none" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        (["data.sources[1].weight=0.005"], "data.sources"),  # replay under 1%
        (["data.sources[1].role=domain"], "data.sources"),  # no replay at all
        (["data.sources[0].weight=0.05", "data.sources[1].weight=0.95"], "data.sources[*].weight"),
        (["train.hf.learning_rate=1e-4"], "train.hf.learning_rate"),
        (["train.hf.max_steps=500"], "train.hf.max_steps"),  # more steps than one epoch holds
        (["train.hf.num_train_epochs=5"], "data.sources[0].weight"),  # domain text seen 5 times
        (["train.hf.max_steps=4", "train.schedule.warmup=10"], "train.schedule.warmup"),
        (["train.lora.dropout=0.05"], "train.lora.dropout"),
        (["train.memory_budget=1MiB"], "train.memory_budget"),  # the plan does not fit
        (["train.gradient_checkpointing=true"], "train.gradient_checkpointing"),  # slower than auto
    ],
)
def test_each_warning_fires_on_a_config_made_to_trigger_it(
    overrides, where, tmp_path, capsys, corpora, tiny_model_dir
):
    plan = plan_json(tmp_path, capsys, plain_config(tmp_path, corpora, tiny_model_dir), *overrides)
    assert where in warned(plan), plan["warnings"]
    line = next(w for w in plan["warnings"] if w["where"] == where)
    assert line["what"] and line["todo"]


def test_sharded_weights_split_the_weights_over_the_gpus(tmp_path, capsys, corpora, llama3_8b_config):
    paths = [f"data.sources[{i}].path={corpora / 'domain'}" for i in range(2)]
    args = ["full-zero3-8b", f"run_dir={tmp_path}", *paths, "--model-config", str(llama3_8b_config)]
    one = plan_json(tmp_path, capsys, *args)["gpus"][0]["auto"]["estimate"]
    eight = plan_json(tmp_path, capsys, *args, "--num-gpus", "8", "--sharded")["gpus"][0]["auto"]["estimate"]
    assert eight["weights"] == one["weights"] // 8 and eight["optimizer"] == one["optimizer"] // 8

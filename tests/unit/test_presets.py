"""Every shipped config loads and validates (torchtune style), and the seed preset keeps the seed's values."""

from __future__ import annotations

import pytest

from cptkit import presets
from cptkit.config import Config, load_config
from cptkit.config.load import read_yaml


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_preset(name: str, root):
    """Load a preset as a user would, with the folders it names created under `root`."""
    data, _ = read_yaml(presets.path(name))
    for source in (data.get("data") or {}).get("sources", []):
        if "path" in source:  # a self_replay source has none
            (root / source["path"]).mkdir(parents=True, exist_ok=True)
    return load_config(Config, presets.path(name))


def test_presets_are_shipped():
    assert {"demo", "demo-gpu", "seed-llama3-8b-qlora", "lora-all-linear-8b", "full-zero3-8b"} <= set(
        presets.names()
    )


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_loads_and_validates(name, in_tmp):
    cfg = load_preset(name, in_tmp)
    assert cfg.data is not None and cfg.model is not None and cfg.train is not None
    assert cfg.stage_dir("train").name == "train"


def test_seed_preset_reproduces_run_7b_cpt(in_tmp):
    cfg = load_preset("seed-llama3-8b-qlora", in_tmp)
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert (cfg.data.chunking, cfg.data.chunk_chars, cfg.data.seq_length) == ("chars", 512, 512)
    assert cfg.train.mode == "qlora" and cfg.train.quantization.quant_type == "nf4"
    assert (cfg.train.lora.r, cfg.train.lora.alpha) == (32, 8)
    assert (cfg.train.schedule.type, cfg.train.schedule.warmup) == ("cosine", 0.1)
    hf = cfg.train.hf
    assert float(hf["learning_rate"]) == 2e-5 and hf["per_device_train_batch_size"] == 4
    assert hf["num_train_epochs"] == 1 and hf["logging_steps"] == 1 and hf["bf16"] is True


def test_demo_mixes_domain_and_general_at_70_30(in_tmp):
    cfg = load_preset("demo", in_tmp)
    weights = {s.role: s.weight for s in cfg.data.sources}
    assert weights == {"domain": 0.7, "general": 0.3}


@pytest.mark.parametrize("name", ["demo", "demo-gpu"])
def test_demo_checks_a_forgetting_budget_on_its_general_set_with_a_checkpoint_per_evaluation(name, in_tmp):
    cfg = load_preset(name, in_tmp)
    assert cfg.train.forgetting_budget == 0.01
    general = [s for s in cfg.data.sources if s.role == "general"]
    assert general and all(s.heldout_fraction > 0 for s in general)  # the budget's general held-out set
    save, every = cfg.train.hf["save_steps"], cfg.train.eval_steps
    assert save % every == 0  # each saved checkpoint has an evaluation that judges it against the budget
    if "max_steps" in cfg.train.hf:
        assert save <= cfg.train.hf["max_steps"]  # at least one checkpoint to name as the best within it


def test_preset_names_resolve_and_unknown_names_are_explained(tmp_path):
    assert presets.resolve("demo").endswith("demo.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("run_dir: x\n")
    assert presets.resolve(str(own)) == str(own)
    with pytest.raises(Exception, match="shipped presets: .*seed-llama3-8b-qlora"):
        presets.path("nope")


def test_example_launch_script_overrides_are_valid_config(in_tmp):
    """examples/run_7b_cpt.sh passes the seed's table as KEY=VALUE overrides: each must be a known key
    of the preset it starts from, with a value of the right type."""
    import re
    from pathlib import Path

    script = (Path(__file__).parents[2] / "examples" / "run_7b_cpt.sh").read_text()
    block = script[script.index("args=(") : script.index("\n)\n", script.index("args=("))]
    (in_tmp / "domain").mkdir()
    values = {
        "output_path": str(in_tmp / "output"),
        "base_model_path": "meta-llama/Meta-Llama-3-8B",
        "sources": f"[{{name: domain, path: '{in_tmp / 'domain'}', role: domain, weight: 1.0}}]",
        "domain_dir": str(in_tmp / "domain"),
    }
    overrides = [
        re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], found)
        for found in re.findall(r'^\s*"([^"]+)"', block, flags=re.M)
    ]
    assert len(overrides) >= 15
    cfg = load_config(Config, presets.path("seed-llama3-8b-qlora"), overrides)
    assert cfg.run_dir == values["output_path"] and cfg.data.sources[0].path == values["domain_dir"]
    assert (cfg.train.lora.r, cfg.train.lora.alpha, cfg.train.hf["learning_rate"]) == (32, 8, 2e-5)

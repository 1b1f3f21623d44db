"""The forgetting controls are checked against the sources when the config loads, before prepare runs:
a budget needs a general held-out set, kl_to_base on replay tokens and EWC need a general source that
trains. Every problem is reported at once with its YAML path."""

from __future__ import annotations

import pytest

from cptkit.config import Config, build_config
from cptkit.errors import ConfigError


def config(tmp_path, sources, **train):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text to train on\n", encoding="utf-8")
    data = {"tokenizer": "tok", "sources": [{"path": str(corpus), **s} for s in sources]}
    return build_config(Config, {"run_dir": str(tmp_path / "run"), "data": data, "train": train})


DOMAIN = {"name": "med", "role": "domain"}
ASKED = {
    "forgetting_budget": 0.01,
    "regularize": {"kl_to_base": {"weight": 1.0}, "ewc": {"weight": 1.0}},
}


def test_forgetting_controls_without_general_sources_are_refused_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError) as info:
        config(tmp_path, [DOMAIN], **ASKED)
    text = str(info.value)
    for where in (
        "train.forgetting_budget",
        "train.regularize.kl_to_base.tokens",
        "train.regularize.ewc.weight",
    ):
        assert where in text
    assert "self_replay" in text


def test_a_general_source_held_out_only_serves_the_budget_but_not_replay_terms(tmp_path):
    held_only = {"name": "web", "role": "general", "weight": 0}
    with pytest.raises(ConfigError) as info:
        config(tmp_path, [DOMAIN, held_only], **ASKED)
    assert "train.forgetting_budget" not in str(info.value)
    assert "kl_to_base.tokens" in str(info.value) and "ewc.weight" in str(info.value)
    kl_on_all = {"forgetting_budget": 0.01, "regularize": {"kl_to_base": {"weight": 1.0, "tokens": "all"}}}
    config(tmp_path, [DOMAIN, held_only], **kl_on_all)  # nothing to refuse


def test_a_general_training_source_satisfies_them_all(tmp_path):
    config(tmp_path, [DOMAIN, {"name": "web", "role": "general", "weight": 0.05}], **ASKED)


def test_a_train_section_on_another_dataset_is_left_to_its_preflight(tmp_path):
    config(tmp_path, [DOMAIN], dataset=str(tmp_path / "elsewhere"), **ASKED)

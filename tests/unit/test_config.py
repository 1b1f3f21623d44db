"""Config loading: every problem at once, with YAML paths and line numbers, overrides, suggestions."""

from __future__ import annotations

import pytest

from cptkit.config import Config, dump_yaml, load_config
from cptkit.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_valid_config_loads_with_defaults(tmp_path):
    (tmp_path / "corpus").mkdir()
    path = write(
        tmp_path,
        f"""
run_dir: {tmp_path}/run
data:
  tokenizer: tok
  seq_length: 512
  sources:
    - {{name: domain, path: {tmp_path}/corpus, weight: 0.7}}
train:
  hf: {{learning_rate: 2e-5}}
""",
    )
    cfg = load_config(Config, path)
    assert cfg.data.sources[0].weight == 0.7
    assert cfg.data.chunking == "packing"
    assert cfg.train.hf["learning_rate"] == 2e-5  # YAML 1.2 float; plain PyYAML would give "2e-5"
    assert str(cfg.stage_dir("prepare")) == f"{tmp_path}/run/data"
    assert "seq_length: 512" in dump_yaml(cfg)


def test_all_problems_reported_together_with_paths_lines_and_suggestions(tmp_path):
    path = write(
        tmp_path,
        """
run_dir: out
data:
  tokenizer: tok
  seq_lenght: 512
  chunking: pack
  near_dedup_threshold: 1.5
  sources:
    - {name: domain, path: /nonexistent/med, weight: abc}
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    problems = "\n".join(info.value.problems)
    assert "data.seq_lenght (line 5): unknown key (did you mean 'seq_length'?)" in problems
    assert "data.chunking (line 6): 'pack' is not one of" in problems
    assert "data.sources[0].weight" in problems and "expected a number" in problems
    # a type error on one field hides nothing else: the missing path and the range are reported too
    assert "data.sources[0].path (line 9): /nonexistent/med does not exist" in problems
    assert "data.near_dedup_threshold (line 7): 1.5 must be in (0, 1]" in problems
    assert len(info.value.problems) == 5
    fixed = path.read_text().replace("seq_lenght", "seq_length").replace("pack\n", "packing\n")
    path.write_text(fixed.replace("weight: abc", "weight: 1").replace("/nonexistent/med", str(tmp_path)))
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert info.value.problems == ["data.near_dedup_threshold (line 7): 1.5 must be in (0, 1]"]


def test_missing_path_is_reported_with_what_was_expected(tmp_path):
    path = write(
        tmp_path, "run_dir: out\ndata:\n  tokenizer: tok\n  sources:\n    - {name: med, path: /no/such/dir}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert (
        "data.sources[0].path (line 5): /no/such/dir does not exist (expected a folder"
        in info.value.problems[0]
    )


def test_overrides_apply_before_validation(tmp_path):
    (tmp_path / "c").mkdir()
    path = write(
        tmp_path,
        f"run_dir: out\ndata:\n  tokenizer: tok\n  sources:\n    - {{name: a, path: {tmp_path}/c}}\n",
    )
    cfg = load_config(
        Config, path, ["data.seq_length=1024", "data.sources[0].weight=0.25", "train.mode=qlora"]
    )
    assert cfg.data.seq_length == 1024 and cfg.data.sources[0].weight == 0.25 and cfg.train.mode == "qlora"
    cfg = load_config(
        Config, path, ["train.hf.learning_rate=1e-4", "train.hf.max_grad_norm=1E+1", "train.hf.run_name=1e4x"]
    )
    assert cfg.train.hf["learning_rate"] == 1e-4 and cfg.train.hf["max_grad_norm"] == 10.0
    assert cfg.train.hf["run_name"] == "1e4x"
    with pytest.raises(ConfigError) as info:
        load_config(Config, path, ["data.seq_length=many", "nonsense"])
    assert any("expected KEY.PATH=VALUE" in p for p in info.value.problems)


def test_hf_keys_owned_by_cptkit_are_redirected(tmp_path):
    path = write(tmp_path, "run_dir: out\ntrain:\n  hf: {lr_scheduler_type: linear}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Config, path)
    assert (
        "train.hf.lr_scheduler_type (line 3): set by cptkit; use train.schedule.type instead"
        in info.value.problems[0]
    )


def test_sft_takes_only_what_sft_reads(tmp_path):
    """sft has its own fields: train's dataset and eval_max_tokens are unknown keys there."""
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    path = write(
        tmp_path,
        f"""
run_dir: {tmp_path}/run
sft:
  data: {data}
  dataset: {tmp_path}/prepared
  eval_max_tokens: 100
  mode: full
""",
    )
    with pytest.raises(ConfigError) as e:
        load_config(Config, path)
    message = str(e.value)
    assert "sft.dataset (line 5): unknown key (did you mean 'data'?)" in message
    assert "sft.eval_max_tokens (line 6): unknown key" in message
    path.write_text(path.read_text().replace(f"  dataset: {tmp_path}/prepared\n  eval_max_tokens: 100\n", ""))
    assert load_config(Config, path).sft.mode == "full"


def test_bare_on_and_off_are_the_choices_they_name_not_booleans(tmp_path):
    """YAML 1.1 reads a bare `off` as false: an auto/on/off choice takes it as the word it is, in a file
    and on the command line alike."""
    from cptkit.config import Config, load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        "run_dir: r\nmodel: {name_or_path: m}\n"
        "train: {fused_cross_entropy: off, kernels: {fast_lora: off, rms_norm: on}}\n"
    )
    cfg = load_config(Config, path, ["train.kernels.swiglu=off"])
    assert cfg.train.fused_cross_entropy == "off"
    assert (cfg.train.kernels.fast_lora, cfg.train.kernels.rms_norm, cfg.train.kernels.swiglu) == (
        "off",
        "on",
        "off",
    )


def test_a_wrong_checkpointing_value_names_the_choices(tmp_path):
    from cptkit.config import Config, load_config
    from cptkit.errors import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("run_dir: r\nmodel: {name_or_path: m}\ntrain: {gradient_checkpointing: sometimes}\n")
    with pytest.raises(ConfigError, match="expected true, false or auto, got 'sometimes'"):
        load_config(Config, path)

"""`cptkit config`: the config as cptkit resolves it, or every problem with exit code 2; and config
problems stop `cptkit train` before anything loads."""

from __future__ import annotations

from cptkit import cli
from cptkit.config import Config, load_config


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def valid(tmp_path):
    (tmp_path / "corpus").mkdir(exist_ok=True)
    return write(
        tmp_path,
        f"""
run_dir: {tmp_path}/run
data:
  tokenizer: tok
  sources: [{{name: domain, path: {tmp_path}/corpus}}]
model: {{name_or_path: m}}
train: {{hf: {{learning_rate: 1.0e-4}}}}
""",
    )


def test_config_prints_defaults_overrides_and_folders_and_runs_as_the_original(tmp_path, capsys):
    path = valid(tmp_path)
    assert cli.main(["config", str(path), "data.seq_length=1024"]) == 0
    out = capsys.readouterr().out
    assert "seq_length: 1024" in out and "chunking: packing" in out and "mode: lora" in out  # filled in
    assert f"train: {tmp_path}/run/train" in out and f"prepared: {tmp_path}/run/data" in out  # folders
    printed = tmp_path / "printed.yaml"
    printed.write_text(out)
    assert load_config(Config, printed) == load_config(Config, path, ["data.seq_length=1024"])


def test_config_expands_a_preset_name(tmp_path, capsys):
    (tmp_path / "domain").mkdir()
    assert cli.main(["config", "seed-llama3-8b-qlora", f"data.sources[0].path={tmp_path}/domain"]) == 0
    out = capsys.readouterr().out
    assert "r: 32" in out and "quant_type: nf4" in out and "mode: qlora" in out


def test_config_lists_every_problem_with_exit_code_2(tmp_path, capsys):
    path = write(
        tmp_path,
        "run_dir: out\ndata:\n  tokenizer: tok\n  sources: []\n  seq_length: x\neval: {batch_size: 0}\n",
    )
    assert cli.main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cptkit config: error: {path}: 3 problem(s):")
    assert "data.sources (line 4): at least one source is needed" in err
    assert "data.seq_length (line 5): expected an integer, got 'x'" in err
    assert "eval.batch_size (line 6): 0 is too small (at least 1)" in err


def test_train_stops_on_a_bad_train_hf_value_before_reading_the_dataset_or_model(tmp_path, capsys):
    """Neither the dataset nor the model exists: the config problem is what the user hears first."""
    path = valid(tmp_path)
    assert cli.main(["train", str(path), "train.hf.per_device_train_batch_size=eight"]) == 2
    err = capsys.readouterr().err
    assert "train.hf.per_device_train_batch_size: expected an integer, got the string 'eight'" in err
    assert "prepared" not in err and "model.name_or_path" not in err

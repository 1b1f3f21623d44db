"""What `cptkit train` checks before loading weights, read through the prepared folder's `Prepared`."""

from __future__ import annotations

import json

import pytest

from cptkit.config.model import ModelConfig
from cptkit.config.train import TrainConfig
from cptkit.errors import CptkitError
from cptkit.model.load import load_model_and_tokenizer
from cptkit.testing.stages import write_prepared
from cptkit.train.checks import preflight


@pytest.fixture
def prepared(tmp_path, tiny_tokenizer):
    return write_prepared(tmp_path / "data", {"docs": ("domain", ["some text"])}, tiny_tokenizer, 64)


def test_preflight_reads_the_prepared_folder_and_its_tokenizer_reaches_the_model(
    tmp_path, prepared, tiny_model_dir
):
    model_cfg, train_cfg = ModelConfig(name_or_path=str(tiny_model_dir)), TrainConfig(mode="full")
    checked = preflight(train_cfg, model_cfg, prepared, tmp_path / "out")
    assert checked["prepared"].seq_length == 64 and checked["resume_from"] is None
    assert checked["manifest_hash"] == checked["prepared"].manifest_hash
    loaded = load_model_and_tokenizer(model_cfg, train_cfg, tokenizer=checked["tokenizer"])
    assert loaded.tokenizer is checked["tokenizer"]  # loaded once, not again by the model loader


def test_preflight_refuses_rows_longer_than_the_model_knows(tmp_path, prepared, tiny_model_dir):
    manifest = json.loads((prepared / "manifest.json").read_text())
    (prepared / "manifest.json").write_text(json.dumps({**manifest, "seq_length": 1 << 20}))
    with pytest.raises(CptkitError, match="data.seq_length: the dataset's rows hold 1048576 tokens"):
        preflight(TrainConfig(), ModelConfig(name_or_path=str(tiny_model_dir)), prepared, tmp_path / "out")


def test_preflight_refuses_a_dataset_made_with_another_tokenizer(tmp_path, tiny_tokenizer, tiny_model_dir):
    from cptkit.testing.store import tokenizer_entry
    from cptkit.testing.store import write_prepared as write_store_folder

    other = {**tokenizer_entry(tiny_tokenizer), "fingerprint": "0" * 16, "name_or_path": "org/other"}
    write_store_folder(tmp_path / "other", {"docs": [tiny_tokenizer("some text")["input_ids"]]}, 64, other)
    with pytest.raises(CptkitError, match="its token store was made with org/other"):
        preflight(
            TrainConfig(), ModelConfig(name_or_path=str(tiny_model_dir)), tmp_path / "other", tmp_path / "out"
        )


def test_the_qlora_check_names_the_section_it_reads():
    import pytest
    import torch

    from cptkit.config.train import QuantizationConfig, TrainingRun
    from cptkit.errors import CptkitError
    from cptkit.train.checks import check_mode

    if torch.cuda.is_available():
        pytest.skip("8-bit runs on a GPU")
    run = TrainingRun(mode="qlora", quantization=QuantizationConfig(bits=8))
    with pytest.raises(CptkitError, match=r"^sft\.quantization\.bits: 8-bit"):
        check_mode(run, section="sft")

"""`cptkit train` on the token store: the Trainer reads `PackedRows` in order, a resumed run reads none of
the rows it skips and continues with the losses of the uninterrupted run, and a store made with another
tokenizer is refused before the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cptkit.config import Config, build_config
from cptkit.data.view import PackedRows
from cptkit.errors import CptkitError
from cptkit.testing.store import tokenizer_entry, write_prepared
from cptkit.testing.tiny import sample_texts

SEQ, BATCH = 64, 4


def tokenized(tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id], np.int32) for t in texts]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("store")
    texts = sample_texts()[:30]
    sources = {
        "domain": tokenized(tiny_tokenizer, texts[::2]),
        "general": tokenized(tiny_tokenizer, texts[1::2]),
    }
    write_prepared(
        out,
        sources,
        SEQ,
        tokenizer_entry(tiny_tokenizer),
        seed=3,
        batch_documents=4,
        roles={"general": "general"},
    )
    return out


def make_cfg(out: Path, model_dir, dataset, **hf) -> Config:
    train = {
        "mode": "full",
        "dataset": str(dataset),
        "output_dir": str(out),
        "report_to": ["none"],
        "eval_steps": 1000,
        "hf": {
            "max_steps": 6,
            "per_device_train_batch_size": BATCH,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 3,
            "dataloader_drop_last": True,
            **hf,
        },
    }
    return build_config(Config, {"model": {"name_or_path": str(model_dir)}, "train": train})


def losses(folder: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["type"] == "train"}


def test_resume_reads_none_of_the_rows_it_skips(tmp_path, tiny_model_dir, folder, monkeypatch):
    from cptkit.commands.train import run

    assert len(PackedRows(folder)) >= 7 * BATCH
    reads: list[int] = []
    gather = PackedRows.__getitems__

    def counted(self, indices):
        reads.extend(int(i) for i in indices)
        return gather(self, indices)

    monkeypatch.setattr(PackedRows, "__getitems__", counted)
    whole = tmp_path / "whole"
    run(make_cfg(whole, tiny_model_dir, folder))
    # the rows in prepare's order, each once (the loader may fetch one batch past the last step)
    assert reads[: 6 * BATCH] == list(range(6 * BATCH)) and len(set(reads)) == len(reads)
    reads.clear()

    part = tmp_path / "part"  # an interrupted run: only the first checkpoint made it to disk
    part.mkdir()
    shutil.copytree(whole / "checkpoint-3", part / "checkpoint-3")
    shutil.copy(whole / "run_meta.json", part / "run_meta.json")
    run(make_cfg(part, tiny_model_dir, folder))
    assert min(reads) == 3 * BATCH  # not one row of the 3 steps trained before the checkpoint
    assert reads[: 3 * BATCH] == list(range(3 * BATCH, 6 * BATCH))
    resumed, plain = losses(part), losses(whole)
    assert set(resumed) == {4, 5, 6}
    for step in resumed:
        assert abs(resumed[step] - plain[step]) < 1e-5, (resumed, plain)


def test_a_store_of_another_tokenizer_is_refused_before_the_model_loads(
    tmp_path, tiny_model_dir, tiny_tokenizer, monkeypatch
):
    from cptkit.commands.train import run

    other = {**tokenizer_entry(tiny_tokenizer, "other-tokenizer"), "fingerprint": "0123456789abcdef"}
    docs = {"domain": tokenized(tiny_tokenizer, sample_texts()[:6])}
    write_prepared(tmp_path / "other", docs, SEQ, other)

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr("cptkit.model.load.load_model_and_tokenizer", no_model)
    with pytest.raises(CptkitError) as e:
        run(make_cfg(tmp_path / "out", tiny_model_dir, tmp_path / "other"))
    message = str(e.value)
    assert "other-tokenizer (tokenizer fingerprint 0123456789abcdef)" in message
    assert "the model's tokenizer has fingerprint" in message and "rerun `cptkit prepare`" in message

"""`Prepared.train_rows()` on what `cptkit prepare` writes gives exactly the rows the Arrow `train/`
dataset of format 2 gave (their sha256, recorded in tests/assets/golden/hashes.json before the token
store existed), and the same rows, source ids included, as an independent reading of the folder by the
contract alone (`cptkit.testing.prepared`)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cptkit.commands import prepare
from cptkit.data.prepared import Prepared
from cptkit.testing.prepared import read_rows

GOLDEN = Path(__file__).with_name("test_golden_prepare.py")
_spec = importlib.util.spec_from_file_location("golden_prepare", GOLDEN)
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


@pytest.mark.parametrize("variant", ["packing", "chars", "near_upsample"])
def test_the_view_gives_the_rows_of_the_old_train_dataset(tmp_path, variant):
    prepare.run(golden._config(golden.ASSETS / "corpus", tmp_path / "run", golden.VARIANTS[variant]))
    folder = tmp_path / "run" / "data"
    rows = Prepared.load(folder).train_rows()
    h = hashlib.sha256()
    for row in rows:
        h.update(
            row["input_ids"].astype("<i4").tobytes() + b"|" + row["position_ids"].astype("<i4").tobytes()
        )
    assert h.hexdigest() == json.loads(golden.HASHES.read_text())[variant]["train"]
    independent = list(read_rows(folder))
    assert len(rows) == len(independent)
    for row, (input_ids, position_ids, source_ids) in zip(rows, independent, strict=True):
        assert np.array_equal(row["input_ids"], input_ids)
        assert np.array_equal(row["position_ids"], position_ids)
        assert np.array_equal(row["source_ids"], source_ids)


def test_an_upsampled_mix_holds_more_tokens_than_its_store_and_loads(tmp_path):
    """Upsampling repeats segments: the rows may hold more tokens than the store files do."""
    overrides = ["data.mix=upsample", "data.sources[1].weight=3", "data.sources[0].weight=0.1"]
    prepare.run(golden._config(golden.ASSETS / "corpus", tmp_path / "run", overrides))
    folder = tmp_path / "run" / "data"
    index = json.loads((folder / "train" / "index.json").read_text())
    assert index["tokens"] > sum(s["tokens"] for s in index["shards"])  # the case this test is about
    rows = Prepared.load(folder).train_rows()
    assert sum(len(r["input_ids"]) for r in rows) == index["tokens"]


def test_a_damaged_store_file_is_tokenized_again(tmp_path):
    """A store file cut short next to its stats file (a crash before it reached the disk, a damaged
    disk) is not whole: the next prepare tokenizes that shard again instead of failing on it."""
    cfg = golden._config(golden.ASSETS / "corpus", tmp_path / "run", [])
    prepare.run(cfg)
    folder = tmp_path / "run" / "data"
    victim = sorted((folder / "store").glob("sqlite/*.arrow"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    again = golden._config(golden.ASSETS / "corpus", tmp_path / "run", ["data.seq_length=128"])
    prepare.run(again)
    fresh = golden._config(golden.ASSETS / "corpus", tmp_path / "fresh", ["data.seq_length=128"])
    prepare.run(fresh)
    pairs = zip(read_rows(folder), read_rows(tmp_path / "fresh" / "data"), strict=True)
    assert all(np.array_equal(a, b) for x, y in pairs for a, b in zip(x, y, strict=True))


def test_a_cap_that_keeps_no_document_says_so(tmp_path):
    from cptkit.errors import CptkitError

    cfg = golden._config(golden.ASSETS / "corpus", tmp_path / "run", ["data.sources[0].max_tokens=3"])
    with pytest.raises(CptkitError, match=r"data.sources\[0\] \(sqlite\): its caps \(max_tokens 3\) keep no"):
        prepare.run(cfg)

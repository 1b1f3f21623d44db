"""Sources by HF dataset name (`type: hub`), offline, on a local folder in the hub layout that the test
writes: a README.md whose YAML header declares two configurations, each with train/test data files."""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cptkit.commands import prepare
from cptkit.config import Config, build_config
from cptkit.config.data import HubConfig
from cptkit.data.document import Ledger
from cptkit.data.hub import plan_hub, read_hub_shard
from cptkit.data.plan import make_plan
from cptkit.data.prepare import prepare as prepare_data
from cptkit.data.prepared import Prepared
from cptkit.data.shards import open_shard, tokenize_shard
from cptkit.errors import CptkitError

README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
- config_name: other
  data_files:
  - split: train
    path: other/train-*.parquet
  - split: test
    path: other/test-*.parquet
---
# A tiny dataset in the hub layout
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and no hub: what HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 set at start-up."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # for processes started here
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def write_parquet(path, texts, **columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **columns}), path)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def hub_folder(tmp_path, paragraphs):
    """The dataset, and which texts each configuration and split holds (train of `default`: 3 files)."""
    root = tmp_path / "tiny-dataset"
    root.mkdir()
    (root / "README.md").write_text(README, encoding="utf-8")
    texts = {
        ("default", "train"): paragraphs[:90],
        ("default", "test"): paragraphs[90:100],
        ("other", "train"): paragraphs[100:130],
        ("other", "test"): paragraphs[130:135],
        ("extra", "train"): paragraphs[135:150],
    }
    for i in range(3):
        write_parquet(root / f"data/train-{i:05d}.parquet", texts["default", "train"][30 * i : 30 * (i + 1)])
    write_parquet(root / "data/test-00000.parquet", texts["default", "test"])
    half = len(texts["other", "train"]) // 2
    write_parquet(root / "other/train-00000.parquet", texts["other", "train"][:half], n=list(range(half)))
    write_parquet(root / "other/train-00001.parquet", texts["other", "train"][half:], n=list(range(half)))
    write_parquet(root / "other/test-00000.parquet", texts["other", "test"], n=[0] * 5)
    write_jsonl(
        root / "extra/rows.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts["extra", "train"])]
    )
    return root, texts


def read_all(plan, text_field="text", ledger=None):
    ledger = ledger if ledger is not None else Ledger()
    return [
        d.text for i in range(plan.hub.num_shards) for d in read_hub_shard(plan.hub, i, text_field, ledger)
    ]


@pytest.mark.parametrize(
    "name, split, data_files",
    [(None, "train", None), ("default", "test", None), ("other", "train", None), ("other", "test", None)]
    + [(None, "train", "extra/*.jsonl")],
)
def test_name_split_and_data_files_choose_the_rows(hub_folder, name, split, data_files):
    root, texts = hub_folder
    hub = HubConfig(path=str(root), name=name, split=split, data_files=data_files)
    plan = plan_hub(hub, "text", "data.sources[0]")
    assert read_all(plan) == texts["extra" if data_files else (name or "default"), split]
    assert plan.hub.local and plan.hub.sha is None
    assert [p.name for p in plan.files] == [f.rsplit("/", 1)[-1] for f in plan.hub.files]
    assert plan.hub.num_shards == len(plan.files)  # one shard a data file: one task each


def test_mistakes_are_named_before_any_work(hub_folder, tmp_path):
    root, _ = hub_folder

    def planned(text_field="text", **hub):
        with pytest.raises(CptkitError) as e:
            plan_hub(HubConfig(path=str(root), **{"split": "train"} | hub), text_field, "data.sources[0]")
        return str(e.value)

    assert "data.sources[0].hub.name: 'nope'" in (msg := planned(name="nope")) and "default, other" in msg
    assert "data.sources[0].hub.split: 'validation'" in (msg := planned(split="validation"))
    assert "splits: train, test" in msg
    msg = planned(text_field="body", name="other")
    assert "data.sources[0].text_field: 'body'" in msg and "columns: text, n" in msg
    assert "holds" in planned(text_field="n", name="other")  # a column of numbers is not text
    assert "data.sources[0].hub.data_files" in planned(data_files="missing/*.jsonl")
    with pytest.raises(CptkitError) as e:
        plan_hub(HubConfig(path="someone/not-downloaded"), "text", "data.sources[0]")
    assert "no network, and not in the local cache" in str(e.value)
    # a folder has no revisions; a streamed split has no slices: both refused when the config loads
    for hub, where in [
        ({"revision": "main"}, "hub.revision"),
        ({"split": "train[:10%]"}, "hub.split"),
    ]:
        with pytest.raises(CptkitError) as e:
            build_config(Config, {"data": data_section(tmp_path, {"path": str(root)} | hub)})
        assert f"data.sources[0].{where}" in str(e.value)


def test_rows_without_text_are_counted_and_named(tmp_path):
    root = tmp_path / "holes"
    write_parquet(root / "data/train-00000.parquet", ["a text", None, "more text"])
    ledger = Ledger()
    texts = read_all(plan_hub(HubConfig(path=str(root)), "text", "data.sources[0]"), ledger=ledger)
    assert texts == ["a text", "more text"]
    assert ledger.drops == {"no_text_field": 1}
    assert ledger.examples["no_text_field"].endswith("train-00000.parquet:2")


def data_section(tmp_path, hub: dict, tokenizer="unused", **source) -> dict:
    return {
        "tokenizer": str(tokenizer),
        "seq_length": 64,
        "num_proc": 1,
        "sources": [{"name": "dom", "type": "hub", "hub": hub} | source],
    }


def hub_config(tmp_path, tokenizer_dir, hub: dict, **source) -> Config:
    data = data_section(tmp_path, hub, tokenizer_dir, **source)
    return build_config(Config, {"run_dir": str(tmp_path / "run"), "data": data})


def file_config(tmp_path, tokenizer_dir, path) -> Config:
    data = {"tokenizer": str(tokenizer_dir), "seq_length": 64, "num_proc": 1}
    data["sources"] = [{"name": "dom", "path": str(path)}]
    return build_config(Config, {"run_dir": str(tmp_path / "run"), "data": data})


def store_ids(cfg: Config) -> list[list[int]]:
    """Every document's stored ids, shard after shard, as assembly reads them (a capped source's shards
    never read have no file)."""
    plan = make_plan(cfg.data, cfg.stage_dir("prepare"))
    files = [sh for sh in plan.shards["dom"] if sh.path(plan.cache_dir).is_file()]
    return [ids for sh in files for ids in open_shard(sh, plan.cache_dir)["input_ids"].to_pylist()]


def rows(cfg: Config) -> list[list[int]]:
    train = Prepared.load(cfg.stage_dir("prepare")).train_rows()
    return [list(train[i]["input_ids"]) for i in range(len(train))]


def counting_calls(calls):
    def executor(tasks, progress):
        for task in tasks:
            calls.append(task.shard.index)
            yield tokenize_shard(task, progress)

    return executor


def test_a_hub_folder_prepares_as_the_same_rows_in_a_jsonl_file(tmp_path, tiny_tokenizer_dir, hub_folder):
    root, texts = hub_folder
    cfg = hub_config(tmp_path / "hub", tiny_tokenizer_dir, {"path": str(root)})
    calls = []
    manifest = prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=counting_calls(calls)).manifest
    assert calls == [0, 1, 2]  # one task per data file of the split

    write_jsonl(tmp_path / "same.jsonl", [{"text": t} for t in texts["default", "train"]])
    same = file_config(tmp_path / "jsonl", tiny_tokenizer_dir, tmp_path / "same.jsonl")
    reference = prepare.run(same)
    assert store_ids(cfg) == store_ids(same)
    assert rows(cfg) == rows(same)
    held = Prepared.load(cfg.stage_dir("prepare")).heldout_set("dom")
    assert held["input_ids"] == Prepared.load(same.stage_dir("prepare")).heldout_set("dom")["input_ids"]
    got, want = manifest["sources"]["dom"], reference["sources"]["dom"]
    for key in ("read", "documents", "tokens", "train_tokens", "heldout_documents", "drops", "duplicates"):
        assert got[key] == want[key], key
    assert manifest["totals"] == reference["totals"]

    inputs = manifest["inputs"]
    assert [i["path"] for i in inputs] == [str(root / f"data/train-{i:05d}.parquet") for i in range(3)]
    for entry in inputs:
        assert entry["sha256"] == hashlib.sha256(open(entry["path"], "rb").read()).hexdigest()
        assert entry["hub"] | {"path": None} == {
            "path": None,
            "name": None,
            "split": "train",
            "revision": None,
            "sha": None,
            "data_files": None,
            "local": True,
            "shards": 3,
        }


def test_hub_shards_are_cached_by_their_files(tmp_path, tiny_tokenizer_dir, hub_folder, paragraphs, caplog):
    root, texts = hub_folder
    cfg = hub_config(tmp_path, tiny_tokenizer_dir, {"path": str(root), "name": "other"})
    calls = []
    run = counting_calls(calls)
    first = prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=run).manifest
    assert calls == [0, 1]
    with caplog.at_level(logging.INFO):
        assert prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=run).manifest == first
    assert calls == [0, 1] and "nothing to do" in caplog.text
    write_parquet(root / "other/train-00001.parquet", paragraphs[150:170], n=list(range(20)))
    changed = prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=run).manifest
    assert calls == [0, 1, 1]  # only the shard whose file changed is read again
    assert changed["sources"]["dom"]["read"] == 15 + 20


def test_a_remote_dataset_is_keyed_on_the_commit_it_resolves_to(monkeypatch):
    """The hub is faked: `dataset_info` answers with a commit (and the files' sizes and hashes), or
    cannot be reached."""
    from types import SimpleNamespace

    from huggingface_hub import HfApi

    from cptkit.data import hub as hub_mod
    from cptkit.data.shards import _hub_shard

    answer = {"sha": "a" * 40}
    file = SimpleNamespace(rfilename="plain/train-0.parquet", size=123, lfs=SimpleNamespace(sha256="f" * 64))

    def dataset_info(self, path, revision=None, files_metadata=False):
        if answer["sha"] is None:
            raise ConnectionError("no network")
        return SimpleNamespace(sha=answer["sha"], siblings=[file])

    monkeypatch.setattr(HfApi, "dataset_info", dataset_info)
    hub = HubConfig(path="owner/name", revision="main")
    resolved = hub_mod._resolve_commit(hub, "data.sources[0]")
    assert resolved == ("a" * 40, {file.rfilename: 123}, {file.rfilename: "f" * 64})
    answer["sha"] = None
    assert hub_mod._resolve_commit(hub, "data.sources[0]") == (None, {}, {})

    def key(sha, revision="main"):
        url = f"hf://datasets/owner/name@{sha or revision}/{file.rfilename}"
        plan = hub_mod.HubPlan("owner/name", None, "train", revision, None, False, sha, 1, (url,))
        return _hub_shard("dom", plan, 0, {}, {"settings": 1}).key

    assert key("a" * 40) == key("a" * 40, revision=None)  # the commit decides, however it was named
    assert key("b" * 40) != key("a" * 40) and key(None) != key(None, revision="v2")


def test_a_damaged_file_stops_the_run_naming_it_and_the_rerun_resumes_there(
    tmp_path, tiny_tokenizer_dir, hub_folder
):
    root, texts = hub_folder
    damaged = root / "data/train-00002.parquet"
    good = damaged.read_bytes()
    damaged.write_bytes(good[:300])
    cfg = hub_config(tmp_path, tiny_tokenizer_dir, {"path": str(root)})
    calls = []
    with pytest.raises(CptkitError) as e:
        prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=counting_calls(calls))
    assert f"reading shard 2 ({damaged})" in str(e.value) and "damaged file" in str(e.value)
    damaged.write_bytes(good)
    manifest = prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=counting_calls(calls)).manifest
    assert calls == [0, 1, 2, 2] and manifest["sources"]["dom"]["read"] == 90


def test_cptkit_run_stamps_and_plan_know_a_hub_source(tmp_path, tiny_tokenizer_dir, hub_folder):
    from cptkit.data.self_replay import source_inputs
    from cptkit.plan.estimate import estimate_tokens

    root, _ = hub_folder
    cfg = hub_config(tmp_path, tiny_tokenizer_dir, {"path": str(root)})
    assert source_inputs(cfg.data.sources[0], None) == [str(root)]  # the folder's files stamp the stage
    with pytest.raises(CptkitError, match="run cptkit prepare first"):
        estimate_tokens(cfg.data)


def in_a_fresh_process(tasks, progress):
    """Each task in a fresh interpreter, as an engine on another machine runs it: the task crosses as a
    pickle and opens the stream itself."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(tokenize_shard, tasks)


@pytest.mark.slow  # a fresh interpreter imports datasets and torch: about 10 s on 2 cores
def test_hub_shards_run_elsewhere_give_the_same_store(tmp_path, tiny_tokenizer_dir, hub_folder):
    root, _ = hub_folder
    here = hub_config(tmp_path / "here", tiny_tokenizer_dir, {"path": str(root), "name": "other"})
    prepare_data(here.data, here.stage_dir("prepare"))
    elsewhere = hub_config(tmp_path / "elsewhere", tiny_tokenizer_dir, {"path": str(root), "name": "other"})
    prepare_data(elsewhere.data, elsewhere.stage_dir("prepare"), executor=in_a_fresh_process)
    assert store_ids(here) == store_ids(elsewhere) and rows(here) == rows(elsewhere)


def test_a_capped_hub_source_reads_only_the_shards_it_needs(tmp_path, tiny_tokenizer_dir, hub_folder):
    root, texts = hub_folder
    cfg = hub_config(tmp_path, tiny_tokenizer_dir, {"path": str(root)}, max_documents=40)
    calls = []
    manifest = prepare_data(cfg.data, cfg.stage_dir("prepare"), executor=counting_calls(calls)).manifest
    assert calls == [0, 1]  # 30 documents a file: the second reaches 40, the third is never opened
    assert manifest["sources"]["dom"]["read"] == 60 and manifest["sources"]["dom"]["shards"] == 2


def test_a_hub_source_with_nothing_left_is_named(tmp_path, tiny_tokenizer_dir):
    root = tmp_path / "short"
    write_parquet(root / "data/train-00000.parquet", ["tiny", None, "too small"])
    cfg = hub_config(tmp_path, tiny_tokenizer_dir, {"path": str(root)})
    with pytest.raises(CptkitError) as e:
        prepare_data(cfg.data, cfg.stage_dir("prepare"))
    assert f"no documents left from {root} (train) (3 read" in str(e.value)
    assert "no_text_field: 1" in str(e.value) and "too_short: 2" in str(e.value)

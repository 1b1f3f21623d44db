"""Per-source caps (`max_documents`, `max_tokens`): the rule, and tokenization that stops reading a capped
source once its leading documents are all read."""

from __future__ import annotations

import numpy as np
import pytest

from cptkit.config import Config, build_config
from cptkit.data import shards as shards_mod
from cptkit.data.caps import Cap, leading_documents
from cptkit.data.plan import make_plan
from cptkit.data.prepare import prepare
from cptkit.data.prepared import Prepared
from cptkit.data.shards import open_shard, tokenize_shard
from cptkit.testing.tiny import write_jsonl


def leading_by_hand(lengths, max_documents, max_tokens) -> int:
    n, total = 0, 0
    for length in lengths:
        if max_documents is not None and n == max_documents:
            break
        if max_tokens is not None and total + length > max_tokens:
            break
        n, total = n + 1, total + length
    return n


def test_leading_documents_and_where_reading_may_stop():
    rng = np.random.default_rng(0)
    for _ in range(500):
        lengths = rng.integers(1, 50, size=int(rng.integers(0, 40)))
        max_documents = None if rng.random() < 0.3 else int(rng.integers(1, 45))
        max_tokens = None if rng.random() < 0.3 else int(rng.integers(1, 1500))
        want = leading_by_hand(lengths.tolist(), max_documents, max_tokens)
        assert leading_documents(lengths, max_documents, max_tokens) == want
        cap = Cap(max_documents, max_tokens)
        # stopping at the first document after which the cap is reached loses none of the leading ones
        total = np.cumsum(lengths)
        stop = next((k + 1 for k in range(len(lengths)) if cap.reached(k + 1, int(total[k]))), len(lengths))
        assert leading_documents(lengths[:stop], max_documents, max_tokens) == want
        assert stop == len(lengths) or stop >= want


@pytest.fixture
def three_shards(tmp_path, paragraphs, monkeypatch):
    """A folder of 3 files of 20 documents each, one shard each; batches of 4 documents."""
    monkeypatch.setattr(shards_mod, "SHARD_BYTES", 1)
    monkeypatch.setattr(shards_mod, "BATCH_DOCS", 4)
    folder = tmp_path / "capped"
    for i in range(3):
        write_jsonl(folder / f"part-{i}.jsonl", paragraphs[20 * i : 20 * (i + 1)])
    write_jsonl(tmp_path / "free.jsonl", paragraphs[60:100])
    return folder


def config(tmp_path, tokenizer_dir, folder, run="run", **cap) -> Config:
    """The capped source (`folder`) and an uncapped one beside it, prepared into `tmp_path / run`."""
    free = {"name": "free", "path": str(tmp_path / "free.jsonl")}
    sources = [{"name": "capped", "path": str(folder)} | cap, free]
    data = {"tokenizer": str(tokenizer_dir), "seq_length": 64, "num_proc": 1, "sources": sources}
    return build_config(Config, {"run_dir": str(tmp_path / run), "data": data})


def recording(rounds):
    """An executor that records each call's shards as (source, index), and tokenizes them."""

    def executor(tasks, progress):
        rounds.append([(t.shard.source, t.shard.index) for t in tasks])
        for task in tasks:
            yield tokenize_shard(task, progress)

    return executor


def stored(cfg, column="text", source="capped") -> list[list]:
    """Each stored shard's `column`, shard after shard (the shards never read have no file)."""
    plan = make_plan(cfg.data, cfg.stage_dir("prepare"))
    files = [sh for sh in plan.shards[source] if sh.path(plan.cache_dir).is_file()]
    assert [sh.index for sh in files] == list(range(len(files)))
    return [open_shard(sh, plan.cache_dir)[column].to_pylist() for sh in files]


def test_a_capped_source_stops_after_the_shard_that_reaches_its_cap(
    tmp_path, tiny_tokenizer_dir, three_shards, paragraphs
):
    cfg = config(tmp_path, tiny_tokenizer_dir, three_shards, max_documents=30)
    rounds = []
    manifest = prepare(cfg.data, cfg.stage_dir("prepare"), executor=recording(rounds)).manifest
    # round 1: every uncapped shard and the capped source's first; then its next, until the cap is reached
    assert rounds == [[("capped", 0), ("free", 0)], [("capped", 1)]]
    assert stored(cfg) == [paragraphs[:20], paragraphs[20:40]]  # the third file is never read
    assert manifest["sources"]["capped"]["read"] == 40 and manifest["sources"]["capped"]["shards"] == 2

    rounds.clear()  # a rerun finds every shard it needs in the store
    assert prepare(cfg.data, cfg.stage_dir("prepare"), executor=recording(rounds)).manifest == manifest
    assert rounds == []


def test_a_shard_stops_reading_once_it_alone_reaches_the_cap(
    tmp_path, tiny_tokenizer_dir, three_shards, paragraphs
):
    cfg = config(tmp_path, tiny_tokenizer_dir, three_shards, max_documents=6)
    rounds = []
    manifest = prepare(cfg.data, cfg.stage_dir("prepare"), executor=recording(rounds)).manifest
    assert rounds == [[("capped", 0), ("free", 0)]]
    assert stored(cfg) == [paragraphs[:8]]  # two batches of 4: the one that reached 6 is the last read
    assert manifest["sources"]["capped"]["read"] == 8

    for max_tokens in (500, 2500):  # reached inside the first shard; after the first shard
        tokens = config(
            tmp_path, tiny_tokenizer_dir, three_shards, f"tokens-{max_tokens}", max_tokens=max_tokens
        )
        rounds.clear()
        prepare(tokens.data, tokens.stage_dir("prepare"), executor=recording(rounds))
        lengths = [[len(ids) for ids in shard] for shard in stored(tokens, "input_ids")]
        assert len(rounds) == len(lengths) == (1 if max_tokens == 500 else 2)
        before_last = sum(map(sum, lengths[:-1]))
        if len(lengths) == 1:  # it stopped at the batch of 4 that reached the cap
            assert sum(lengths[0][:-4]) < max_tokens <= sum(lengths[0]) and len(lengths[0]) < 20
        else:  # each shard read whole; the one that reached the cap is the last read
            assert before_last < max_tokens <= before_last + sum(lengths[-1])


def test_caps_are_in_the_capped_source_keys_only(tmp_path, tiny_tokenizer_dir, three_shards):
    def keys(**cap):
        plan = make_plan(config(tmp_path, tiny_tokenizer_dir, three_shards, **cap).data, tmp_path / "out")
        return {name: [sh.key for sh in shards] for name, shards in plan.shards.items()}, plan.fingerprint

    (none, fp0), (thirty, fp30), (forty, fp40) = keys(), keys(max_documents=30), keys(max_documents=40)
    assert none["free"] == thirty["free"] == forty["free"]
    assert len({tuple(none["capped"]), tuple(thirty["capped"]), tuple(forty["capped"])}) == 3
    assert len({fp0, fp30, fp40}) == 3


def test_the_prepared_rows_hold_exactly_the_leading_documents(
    tmp_path, tiny_tokenizer_dir, three_shards, paragraphs
):
    cfg = config(tmp_path, tiny_tokenizer_dir, three_shards, max_documents=30)
    manifest = prepare(cfg.data, cfg.stage_dir("prepare")).manifest
    if "capped_documents" not in manifest["sources"]["capped"]:
        pytest.skip("assembly does not apply the caps yet (the store side of prepare)")
    write_jsonl(tmp_path / "leading" / "first.jsonl", paragraphs[:30])
    same = config(tmp_path, tiny_tokenizer_dir, tmp_path / "leading", "same")
    reference = prepare(same.data, same.stage_dir("prepare")).manifest
    assert manifest["sources"]["capped"]["documents"] == reference["sources"]["capped"]["documents"] == 30

    def rows(c):
        train = Prepared.load(c.stage_dir("prepare")).train_rows()
        return [list(train[i]["input_ids"]) for i in range(len(train))]

    assert rows(cfg) == rows(same)

"""`data.executor`: prepare's shard tasks run here or through datatrove's engines (local processes, this
machine's share of several, a Slurm job array, a Ray cluster) give the same prepared folder byte for
byte; a failed shard is retried, then named; shards done are never redone; a worker killed mid-shard
leaves nothing that is used."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli
from cptkit.config.data import ExecutorConfig
from cptkit.data import engines, executors, shards
from cptkit.data.cache import CACHE_DIR, clear_leftovers
from cptkit.data.executors import ShareDone, require_engine
from cptkit.data.manifest import MANIFEST
from cptkit.data.prepare import prepare
from cptkit.errors import CptkitError

sys.path.insert(0, str(Path(__file__).parent))
from test_prepare import config, paragraphs, write_jsonl  # noqa: E402, F401 (paragraphs: a fixture)

SRC = Path(__file__).resolve().parents[2] / "src"
TOKENIZE_SHARD = shards.tokenize_shard
ONE_FILE_A_SHARD = "import cptkit.data.shards as s; s.SHARD_BYTES = 1"  # each input file its own task


@pytest.fixture(autouse=True)
def one_file_a_shard(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", 1)


@pytest.fixture
def sources(tmp_path, paragraphs) -> list[dict]:
    """Two sources of 3 and 2 files: 5 shard tasks."""
    for i in range(3):
        write_jsonl(tmp_path / "corpus" / "dom" / f"part{i}.jsonl", paragraphs[i * 30 : (i + 1) * 30])
    for i in range(2):
        write_jsonl(tmp_path / "corpus" / "gen" / f"part{i}.jsonl", paragraphs[90 + i * 30 : 120 + i * 30])
    return [
        {"name": "dom", "path": str(tmp_path / "corpus" / "dom")},
        {"name": "gen", "path": str(tmp_path / "corpus" / "gen")},
    ]


def cfg_for(tmp_path, tokenizer_dir, sources, name: str, **executor):
    return config(tmp_path / name, tokenizer_dir, sources, executor=executor)


def contents(out: Path) -> dict[str, str]:
    """What a prepared folder holds, file by file (sha256): train/ and heldout/, the cached shards, and
    the manifest without what says when and how it was made (timings, time, the executor settings)."""
    files = [p for sub in ("train", "heldout") for p in (out / sub).rglob("*") if p.is_file()]
    files += (out / CACHE_DIR).glob("*/*.arrow")
    found = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    manifest = json.loads((out / MANIFEST).read_text())
    del manifest["timings"], manifest["created"], manifest["config"]["executor"]
    return found | {MANIFEST: json.dumps(manifest, sort_keys=True)}


class Counting:
    """Wraps `tokenize_shard` in this process: counts the shards tokenized, and fails those asked."""

    def __init__(self, monkeypatch, fail: dict[str, int] | None = None):
        self.calls: list[str] = []
        self.fail = dict(fail or {})  # file name -> times it still fails
        monkeypatch.setattr(shards, "tokenize_shard", self)

    def __call__(self, task, progress=None):
        name = task.shard.files[0].name if task.shard.source == "dom" else "gen/" + task.shard.files[0].name
        self.calls.append(name)
        if self.fail.get(name, 0) > 0:
            self.fail[name] -= 1
            raise ValueError(f"a reader error in {name}")
        return TOKENIZE_SHARD(task, progress)


def test_a_missing_engine_names_the_extra_before_any_work(tmp_path, tiny_tokenizer_dir, sources, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "datatrove" else real(name)
    )
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "x", type="local")
    with pytest.raises(
        CptkitError, match=r'data.executor.type: local runs on datatrove.*pip install "cptkit\[scale\]"'
    ):
        prepare(cfg.data, cfg.stage_dir("prepare"))
    assert not cfg.stage_dir("prepare").exists()  # nothing hashed, nothing written
    require_engine(ExecutorConfig(type="here"))  # here needs nothing


def test_local_workers_and_two_nodes_give_what_here_gives(tmp_path, tiny_tokenizer_dir, sources, capsys):
    here = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "here")
    prepare(here.data, here.stage_dir("prepare"), config=here)
    reference = contents(here.stage_dir("prepare"))
    assert len(list((here.stage_dir("prepare") / CACHE_DIR).glob("*/*.arrow"))) == 5

    local = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "local", type="local", workers=2)
    prepare(local.data, local.stage_dir("prepare"), config=here)
    assert contents(local.stage_dir("prepare")) == reference
    assert len(list((local.stage_dir("prepare") / "executor" / "local" / "completions").iterdir())) == 5

    # two "nodes": two processes at once, each running its share (ranks 0-2 and 3-4) of the same folder
    nodes = []
    for offset, count in ((0, 3), (3, 2)):
        cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "nodes")
        path = tmp_path / f"node{offset}.yaml"
        path.write_text(yaml.safe_dump(node_config(cfg, offset, count)))
        script = f"{ONE_FILE_A_SHARD}; from cptkit.cli import main; raise SystemExit(main(['prepare', {str(path)!r}]))"
        env = os.environ | {"PYTHONPATH": str(SRC)}
        nodes.append(
            subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        )
    said = [n.communicate(timeout=120)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], said
    assert any("this machine's" in s and "run cptkit prepare again on one machine" in s for s in said), said
    out = tmp_path / "nodes" / "run" / "data"
    final = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "nodes")
    prepare(final.data, out, config=here)  # assembles, unless the node that finished last did
    assert contents(out) == reference


def node_config(cfg, offset: int, count: int) -> dict:
    data = {
        "tokenizer": cfg.data.tokenizer,
        "seq_length": cfg.data.seq_length,
        "num_proc": 1,
        "sources": [{"name": s.name, "path": s.path} for s in cfg.data.sources],
        "executor": {"type": "local", "workers": 1, "local_tasks": count, "local_rank_offset": offset},
    }
    return {"run_dir": str(cfg.run_dir), "data": data}


def test_one_share_says_what_is_done_and_assembles_nothing(tmp_path, tiny_tokenizer_dir, sources, capsys):
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "share")
    path = tmp_path / "share.yaml"
    path.write_text(yaml.safe_dump(node_config(cfg, 1, 2)))
    assert cli(["prepare", str(path)]) == 0
    said = capsys.readouterr().out
    assert "this machine's 2 shard(s) are done (ranks 1 to 2); 2 of 5 done; run cptkit prepare again" in said
    out = cfg.stage_dir("prepare")
    assert not (out / "train").exists() and json.loads((out / MANIFEST).read_text())["status"] == "incomplete"
    past = ExecutorConfig(type="local", workers=1, local_tasks=2, local_rank_offset=4)
    with pytest.raises(CptkitError, match="local_rank_offset 4 \\+ local_tasks 2 goes past the 5 shard task"):
        prepare(dataclasses.replace(cfg.data, executor=past), out)


@pytest.mark.parametrize("engine", [{}, {"type": "local", "workers": 1}])
def test_a_failed_shard_is_retried_then_named(tmp_path, tiny_tokenizer_dir, sources, monkeypatch, engine):
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "f", **engine)
    out = cfg.stage_dir("prepare")
    once = Counting(monkeypatch, fail={"part1.jsonl": 1})  # fails once, then the retry succeeds
    prepare(cfg.data, out)
    assert sorted(once.calls) == [
        "gen/part0.jsonl",
        "gen/part1.jsonl",
        "part0.jsonl",
        "part1.jsonl",
        "part1.jsonl",
        "part2.jsonl",
    ]
    assert not list((out / CACHE_DIR).glob("*/*.failed.json"))

    for p in (out / CACHE_DIR).glob("dom/*"):  # a fresh start for dom: its shards tokenize again
        p.unlink()
    always = Counting(monkeypatch, fail={"part0.jsonl": 9, "part2.jsonl": 9})
    shorter = dataclasses.replace(cfg.data, seq_length=32)  # assembles again: tokenizes what is missing
    with pytest.raises(CptkitError) as e:
        prepare(shorter, out)
    message = str(e.value)
    assert message.startswith("2 shard(s) failed to tokenize:")
    assert (
        "dom shard 0 (" in message
        and "part0.jsonl): ValueError: a reader error in part0.jsonl [2 tries" in message
    )
    assert "dom shard 2 (" in message and "part2.jsonl" in message and "run cptkit prepare again" in message
    assert sorted(always.calls) == ["part0.jsonl", "part0.jsonl", "part1.jsonl", "part2.jsonl", "part2.jsonl"]
    records = [json.loads(r.read_text()) for r in (out / CACHE_DIR / "dom").glob("*.failed.json")]
    assert sorted(Path(r["files"][0]).name for r in records) == ["part0.jsonl", "part2.jsonl"]
    assert {r["attempts"] for r in records} == {2} and all("ValueError" in r["error"] for r in records)
    assert len(list((out / CACHE_DIR / "dom").glob("*.arrow"))) == 1  # the shard that worked is kept

    fixed = Counting(monkeypatch)
    again = prepare(shorter, out)
    assert sorted(fixed.calls) == ["part0.jsonl", "part2.jsonl"]  # only the failed ones run again
    assert not list((out / CACHE_DIR).glob("*/*.failed.json")) and again.manifest["status"] == "complete"

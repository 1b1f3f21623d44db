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
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli
from cptkit.config.data import ExecutorConfig
from cptkit.data import engines, shards
from cptkit.data.cache import STORE_DIR, clear_leftovers
from cptkit.data.executors import require_engine
from cptkit.data.manifest import MANIFEST
from cptkit.data.prepare import prepare
from cptkit.errors import CptkitError
from cptkit.train.optional import refusals_for_missing_packages

sys.path.insert(0, str(Path(__file__).parent))
from test_prepare import config, write_jsonl  # noqa: E402

SRC = Path(__file__).resolve().parents[2] / "src"
TOKENIZE_SHARD = shards.tokenize_shard
ONE_FILE_A_SHARD = "import cptkit.data.shards as s; s.SHARD_BYTES = 1"  # each input file its own task


@pytest.fixture(autouse=True)
def one_file_a_shard(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BYTES", 1)


@pytest.fixture
def sources(tmp_path, paragraphs) -> list[dict]:  # noqa: F811 (the fixture)
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
    files += (out / STORE_DIR).glob("*/*.arrow")
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
    assert any("pip install" in n and "datatrove" in n for n in refusals_for_missing_packages(cfg))
    require_engine(ExecutorConfig(type="here"))  # here needs nothing


@pytest.fixture
def reference(tmp_path, tiny_tokenizer_dir, sources):
    """The folder one `here` run makes, and its contents."""
    here = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "here")
    prepare(here.data, here.stage_dir("prepare"), config=here)
    assert len(list((here.stage_dir("prepare") / STORE_DIR).glob("*/*.arrow"))) == 5
    return here, contents(here.stage_dir("prepare"))


def test_local_with_two_workers_gives_what_here_gives(tmp_path, tiny_tokenizer_dir, sources, reference):
    here, expected = reference
    local = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "local", type="local", workers=2)
    prepare(local.data, local.stage_dir("prepare"), config=here)
    assert contents(local.stage_dir("prepare")) == expected
    markers = local.stage_dir("prepare") / "executor" / "local" / "completions"
    assert sorted(p.name for p in markers.iterdir()) == [f"{r:05d}" for r in range(5)]


@pytest.mark.slow
def test_two_nodes_give_what_here_gives(tmp_path, tiny_tokenizer_dir, sources, reference):
    """Two "nodes": two processes at once, each running its share (ranks 0-2 and 3-4) into one folder;
    the first to finish says so, or, where both finish at once, one assembles and the other leaves it
    to that one; then a prepare that assembles (unless a node did)."""
    here, expected = reference
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "nodes")
    nodes = []
    for offset, count in ((0, 3), (3, 2)):
        path = tmp_path / f"node{offset}.yaml"
        path.write_text(yaml.safe_dump(node_config(cfg, offset, count)))
        script = f"{ONE_FILE_A_SHARD}; from cptkit.cli import main; raise SystemExit(main(['prepare', {str(path)!r}]))"
        env = os.environ | {"PYTHONPATH": str(SRC)}
        nodes.append(
            subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        )
    said = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], said
    # the first to finish says what is done, or (both done at once) the one that did not assemble says so
    stopped = ("run cptkit prepare again on one machine", "another cptkit prepare assembles")
    assert any(any(reason in s for reason in stopped) for s in said), said
    prepare(cfg.data, cfg.stage_dir("prepare"), config=here)
    assert contents(cfg.stage_dir("prepare")) == expected


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
    assert not list((out / STORE_DIR).glob("*/*.failed.json"))

    for p in (out / STORE_DIR).glob("dom/*"):  # a fresh start for dom: its shards tokenize again
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
    records = [json.loads(r.read_text()) for r in (out / STORE_DIR / "dom").glob("*.failed.json")]
    assert sorted(Path(r["files"][0]).name for r in records) == ["part0.jsonl", "part2.jsonl"]
    assert {r["attempts"] for r in records} == {2} and all("ValueError" in r["error"] for r in records)
    assert len(list((out / STORE_DIR / "dom").glob("*.arrow"))) == 1  # the shard that worked is kept
    if engine:  # datatrove's markers agree with the cache: the failed ranks (0 and 2) are not complete
        markers = out / "executor" / "local" / "completions"
        assert sorted(p.name for p in markers.iterdir()) == ["00001", "00003", "00004"]

    fixed = Counting(monkeypatch)
    again = prepare(shorter, out)
    assert sorted(fixed.calls) == ["part0.jsonl", "part2.jsonl"]  # only the failed ones run again
    assert not list((out / STORE_DIR).glob("*/*.failed.json")) and again.manifest["status"] == "complete"


def test_shards_done_are_never_redone(tmp_path, tiny_tokenizer_dir, sources, monkeypatch):
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "c", type="local", workers=1)
    out = cfg.stage_dir("prepare")
    first = Counting(monkeypatch)
    prepare(cfg.data, out)
    assert len(first.calls) == 5
    for p in (out / STORE_DIR / "dom").glob("*"):  # dom's shard 1 (rank 1) removed; its marker stays
        if p.suffix == ".arrow" and p.stat().st_size and "part1.jsonl" in _wheres(p):
            p.unlink()
            p.with_suffix(".json").unlink()
    assert (out / "executor" / "local" / "completions" / "00001").exists()
    again = Counting(monkeypatch)
    prepare(dataclasses.replace(cfg.data, seq_length=32), out)
    assert again.calls == ["part1.jsonl"]  # only the one whose cache entry went
    third = Counting(monkeypatch)
    prepare(dataclasses.replace(cfg.data, seq_length=48), out)
    assert third.calls == []


def _wheres(arrow: Path) -> str:
    import pyarrow as pa

    return " ".join(pa.ipc.open_file(pa.memory_map(str(arrow))).read_all().column("where").to_pylist())


KILLED_WORKER = """
import sys, time
{patch}
from cptkit.config import Config, build_config
from cptkit.data import shards
from cptkit.data.plan import make_plan
import yaml

cfg = build_config(Config, yaml.safe_load(open(sys.argv[1])))
task = make_plan(cfg.data, cfg.stage_dir("prepare")).tasks()[0]
read = shards.read_documents

def slow(*args, **kwargs):  # the documents, then a reader that never ends
    yield from read(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(600)

shards.read_documents = slow
shards.BATCH_DOCS = 4  # batches reach the file before the worker is killed
shards.STORE_BATCH_BYTES = 1
shards.tokenize_shard(task)
"""


def test_a_worker_killed_mid_shard_leaves_nothing_that_is_used(
    tmp_path, tiny_tokenizer_dir, sources, reference, monkeypatch
):
    here, expected = reference
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "killed")
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(node_config(cfg, 0, 5)))
    script = KILLED_WORKER.format(patch=ONE_FILE_A_SHARD)
    worker = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        env=os.environ | {"PYTHONPATH": str(SRC)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout.readline().strip() == "writing"
    worker.send_signal(signal.SIGKILL)  # mid-shard: its temporary half written, no stats file
    worker.wait()
    cache = cfg.stage_dir("prepare") / STORE_DIR / "dom"
    leftovers = list(cache.glob("*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert not list(cache.glob("*.json"))

    calls = Counting(monkeypatch)
    prepare(cfg.data, cfg.stage_dir("prepare"), config=here)
    assert "part0.jsonl" in calls.calls  # the killed shard tokenized again, whole
    assert contents(cfg.stage_dir("prepare")) == expected
    assert leftovers[0].exists()  # young: it could be another machine's, still being written
    clear_leftovers(cache.parent, min_age_s=0)
    assert not leftovers[0].exists()

    arrow = next(cache.glob("*.arrow"))  # killed after the rename, before its stats file: a cut entry
    arrow.write_bytes(arrow.read_bytes()[:100])
    arrow.with_suffix(".json").unlink()
    calls = Counting(monkeypatch)
    prepare(dataclasses.replace(cfg.data, seq_length=32), cfg.stage_dir("prepare"), config=here)
    assert len(calls.calls) == 1


FAKE_SLURM = {
    "sbatch": r"""#!/bin/bash
# runs the array tasks of the script here, one after another, in the background; prints a job id
for a in "$@"; do script="$a"; done
state="$FAKE_SLURM_STATE"; mkdir -p "$state"
id=$(( $(ls "$state" | wc -l) + 1001 ))
cp "$script" "$state/job$id.sh"
if grep -q merge_stats "$script"; then echo "Submitted batch job $id"; exit 0; fi
last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$script")
touch "$state/queued$id"
(
  for i in $(seq 0 "$last"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=$id SLURM_NODELIST=localhost RUN_OFFSET=0 bash "$state/job$id.sh"
  done >"$state/log$id" 2>&1
  rm "$state/queued$id"
) </dev/null >/dev/null 2>&1 &
echo "Submitted batch job $id"
""",
    "squeue": """#!/bin/bash
for a in "$@"; do id="$a"; done
[ -e "$FAKE_SLURM_STATE/queued$id" ] && echo "$id_[0-9] cpu cptkit-prepare R 0:01 1 localhost"
exit 0
""",
    "scontrol": """#!/bin/bash
[ "$1" = show ] && echo localhost
exit 0
""",
    "srun": """#!/bin/bash
while [ $# -gt 0 ]; do case "$1" in -n|-N) shift 2;; -*) shift;; *) break;; esac; done
exec "$@"
""",
}


@pytest.mark.slow
def test_slurm_submits_an_array_and_waits_for_its_shards(
    tmp_path, tiny_tokenizer_dir, sources, reference, monkeypatch
):
    """Fake sbatch/squeue/scontrol/srun on PATH run datatrove's generated script here, one array task
    after another; prepare polls the cache until every shard is done, then assembles."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    venv_bin = Path(sys.executable).parent  # launch_pickled_pipeline, datatrove's entry point
    monkeypatch.setenv("PATH", f"{bin_dir}:{venv_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(SRC))
    monkeypatch.setenv("FAKE_SLURM_STATE", str(tmp_path / "fake-slurm"))
    monkeypatch.setattr(engines, "POLL_S", 0.2)
    here, expected = reference
    options = {"partition": "cpu", "time": "00:10:00"}
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "slurm", type="slurm", options=options)
    prepare(cfg.data, cfg.stage_dir("prepare"), config=here)
    assert contents(cfg.stage_dir("prepare")) == expected
    script = (tmp_path / "fake-slurm" / "job1001.sh").read_text()
    assert "#SBATCH --array=0-4" in script and "#SBATCH --partition=cpu" in script
    assert "#SBATCH --cpus-per-task=1" in script

    for p in (cfg.stage_dir("prepare") / STORE_DIR / "gen").glob("*"):  # gen's shards again
        p.unlink()
    prepare(dataclasses.replace(cfg.data, seq_length=32), cfg.stage_dir("prepare"), config=here)
    ranks = json.loads((cfg.stage_dir("prepare") / "executor" / "slurm" / "ranks_to_run.json").read_text())
    assert ranks == [3, 4]  # only the ranks not done were submitted


@pytest.mark.slow
def test_ray_gives_what_here_gives(tmp_path, tiny_tokenizer_dir, sources, reference):
    ray = pytest.importorskip("ray")
    here, expected = reference
    cfg = cfg_for(tmp_path, tiny_tokenizer_dir, sources, "ray", type="ray", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(SRC)}})
    try:
        prepare(cfg.data, cfg.stage_dir("prepare"), config=here)
    finally:
        ray.shutdown()
    assert contents(cfg.stage_dir("prepare")) == expected

"""Output folders: cptkit never deletes what it did not write, one run per folder at a time, and a full
disk is a one-line error with the temporaries gone (and, for training, a run recorded as failed)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from cptkit.config import Config, build_config
from cptkit.data.prepare import prepare
from cptkit.data.shards import tokenize_shard
from cptkit.errors import CptkitError
from cptkit.locks import lock_path
from cptkit.merge.write import atomic_folder
from cptkit.testing.tiny import sample_texts


def data_config(tmp_path: Path, tokenizer_dir, out: Path) -> Config:
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    sources = []
    for name, texts in (("dom", sample_texts()[:12:2]), ("gen", sample_texts()[1:12:2])):
        path = inputs / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        sources.append({"name": name, "path": str(path)})
    data = {"tokenizer": str(tokenizer_dir), "seq_length": 64, "num_proc": 1, "sources": sources}
    return build_config(Config, {"data": {**data, "output_dir": str(out)}})


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- never delete what cptkit did not write ---


def test_prepare_refuses_a_folder_of_the_users_own_files(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "notes.txt").write_text("my notes")
    (out / "heldout").mkdir()
    (out / "heldout" / "x.txt").write_text("x")
    before = files_under(out)
    cfg = data_config(tmp_path, tiny_tokenizer_dir, out)
    with pytest.raises(CptkitError) as e:
        prepare(cfg.data, out)
    message = str(e.value)
    assert "did not write" in message and "heldout/ (1 file)" in message and "train/ (1 file)" in message
    assert "empty or new folder" in message
    assert files_under(out) == before and sorted(p.name for p in out.iterdir()) == ["heldout", "train"]


def test_prepare_refuses_a_manifest_it_did_not_write(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "other-tool"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"files": ["a", "b"]}))
    with pytest.raises(CptkitError, match=r"did not write \(manifest.json\)"):
        prepare(data_config(tmp_path, tiny_tokenizer_dir, out).data, out)
    assert json.loads((out / "manifest.json").read_text()) == {"files": ["a", "b"]}


def test_a_folder_left_by_an_interrupted_prepare_resumes(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "data"
    cfg = data_config(tmp_path, tiny_tokenizer_dir, out)

    def killed_after_first(tasks, progress):
        yield tokenize_shard(tasks[0], progress)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(cfg.data, out, executor=killed_after_first)
    assert json.loads((out / "manifest.json").read_text())["status"] == "incomplete"
    (out / "manifest.json").unlink()  # as a run killed before it claimed the folder leaves it: the store only
    assert [p.name for p in out.iterdir()] == ["store"]
    done = prepare(cfg.data, out)
    assert done.manifest["status"] == "complete" and not lock_path(out).exists()


def test_merge_never_replaces_a_folder_it_did_not_write(tmp_path):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "notes.txt").write_text("keep me")
    with pytest.raises(CptkitError, match=r"merged holds files that cptkit did not write \(notes.txt"):
        with atomic_folder(final):
            pytest.fail("nothing may be written")
    assert (final / "notes.txt").read_text() == "keep me" and not (tmp_path / ".merged.partial").exists()


def test_overwrite_removes_only_what_a_training_run_wrote(tmp_path):
    from cptkit.config.train import TrainConfig
    from cptkit.train.checks import check_output_dir

    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"w")
    for name in ("run_meta.json", "metrics.jsonl", "adapter_model.safetensors", "adapter_config.json"):
        (out / name).write_text(json.dumps({"identity": "another run"}))
    (out / "notes.txt").write_text("keep me")
    # names a run writes too, holding the user's own files: a README of their own, an eval folder of
    # their notes, a config.json that is no model's
    (out / "README.md").write_text("# my experiment notes\n")
    (out / "eval").mkdir()
    (out / "eval" / "ideas.md").write_text("try a lower rate")
    (out / "config.json").write_text(json.dumps({"my": "settings"}))
    (out / "runs").mkdir()
    (out / "runs" / "events.out.tfevents.1.host").write_bytes(b"logged")
    train_cfg = TrainConfig(overwrite_output_dir=True)
    assert check_output_dir(out, "this run", train_cfg) is True
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "eval", "notes.txt"]


# --- one run per folder ---


def test_prepare_and_train_refuse_a_folder_in_use(tmp_path, tiny_tokenizer_dir):
    from cptkit.commands import train

    out = tmp_path / "data"
    lock = lock_path(out)
    lock.write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "cptkit prepare"})
    )
    with pytest.raises(CptkitError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"):
        prepare(data_config(tmp_path, tiny_tokenizer_dir, out).data, out)
    assert not out.exists() and lock.exists()
    busy = tmp_path / "train"
    lock_path(busy).write_text(lock.read_text())
    cfg = build_config(
        Config,
        {"model": {"name_or_path": "org/model"}, "train": {"dataset": str(out), "output_dir": str(busy)}},
    )
    with pytest.raises(CptkitError, match="in use by pid"):  # before the dataset is even looked at
        train.run(cfg)


RACER = """
import sys, time
from pathlib import Path
from cptkit.config import Config
from cptkit.config.load import load_config
from cptkit.data.prepare import prepare
from cptkit.errors import CptkitError

cfg_path, me = sys.argv[1], sys.argv[2]
flags = Path(cfg_path).parent / "flags"
(flags / f"ready-{me}").touch()
while len(list(flags.glob("ready-*"))) < 2:  # start together
    time.sleep(0.01)

def wait_for_the_other(phase):
    # the run that got the folder keeps it until the other has been turned away
    if phase == "tokenize":
        deadline = time.time() + 60
        while not any(p.name != f"refused-{me}" for p in flags.glob("refused-*")) and time.time() < deadline:
            time.sleep(0.05)

cfg = load_config(Config, cfg_path)
try:
    prepare(cfg.data, cfg.data.output_dir, on_phase=wait_for_the_other)
except CptkitError as e:
    (flags / f"refused-{me}").write_text(str(e))
    sys.exit(2)
"""


def test_two_prepares_at_once_one_runs_and_one_refuses(tmp_path, tiny_tokenizer_dir):
    import yaml

    from cptkit.config.load import to_dict
    from cptkit.data.prepared import Prepared

    out = tmp_path / "data"
    cfg = data_config(tmp_path, tiny_tokenizer_dir, out)
    (tmp_path / "flags").mkdir()
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"data": to_dict(cfg.data)}))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(cfg_path), name], stderr=subprocess.PIPE, text=True
        )
        for name in ("a", "b")
    ]
    codes = sorted(r.wait(timeout=120) for r in racers)
    assert codes == [0, 2], [r.stderr.read() for r in racers]
    (refusal,) = [p.read_text() for p in (tmp_path / "flags").glob("refused-*")]
    assert "is in use by pid" in refusal and "(cptkit prepare)" in refusal
    assert Prepared.load(out).manifest["status"] == "complete" and not lock_path(out).exists()


# --- full disks ---


def no_space(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


class FullDiskChunker:
    """Wraps a task's chunker: the disk is full when the shard's first batch is to be written, its cache
    file already open (`seen` records that it was there)."""

    def __init__(self, chunker, cache_file: Path):
        self.chunker, self.cache_file, self.seen = chunker, cache_file, []

    def __getattr__(self, name):
        return getattr(self.chunker, name)

    def encode(self, encoder, texts):
        self.seen.extend(self.cache_file.parent.glob(f"{self.cache_file.name}.*.tmp"))
        no_space()


def test_a_full_disk_while_caching_is_one_line_and_leaves_no_temporaries(tmp_path, tiny_tokenizer_dir):
    import dataclasses

    out = tmp_path / "data"
    cfg = data_config(tmp_path, tiny_tokenizer_dir, out)
    chunkers = []

    def full_while_writing(tasks, progress):
        for task in tasks:
            chunkers.append(FullDiskChunker(task.chunker, task.shard.path(task.cache_dir)))
            yield tokenize_shard(dataclasses.replace(task, chunker=chunkers[-1]), progress)

    with pytest.raises(CptkitError) as e:
        prepare(cfg.data, out, executor=full_while_writing)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{out}: the disk is full (no space left on device)")
    assert " free on " in message and "data.output_dir" in message
    assert chunkers[0].seen  # the cache file was being written when the disk filled
    assert not list(out.rglob("*.tmp")) and not list(out.glob(".writing-*"))
    assert not lock_path(out).exists()


def test_the_dataset_write_is_refused_when_it_cannot_fit(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "data"
    cfg = data_config(tmp_path, tiny_tokenizer_dir, out)
    with pytest.raises(
        CptkitError, match=r"not enough disk space: the prepared dataset needs about [\d.]+ KB, 100 B"
    ):
        prepare(cfg.data, out, free_space=lambda path: 100)
    assert not (out / "train").exists() and not list(out.glob(".writing-*"))
    assert prepare(cfg.data, out).manifest["status"] == "complete"  # with room, it finishes from the cache


class FullDiskAtSave(TrainerCallback, ExportableState):
    """Fails a checkpoint half-way: the Trainer asks callbacks for their state after the weights and
    optimizer are written and before trainer_state.json. `error` is how the writer reports it: an
    OSError, or torch.save's RuntimeError (its zip writer does not raise OSError)."""

    def __init__(self, error: BaseException):
        self.error = error

    def state(self) -> dict:
        raise self.error


TORCH_SAVE_FULL = RuntimeError(
    "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: PytorchStreamWriter failed writing "
    "file data/0: file write failed"
)


def _trainer(tmp_path, tiny_model_dir, tiny_tokenizer, **hf):
    from cptkit.data.prepared import Prepared
    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.testing.stages import write_prepared
    from cptkit.train.build import build_trainer

    sets = {"dom": ("domain", sample_texts()[:16])}
    prepared = Prepared.load(write_prepared(tmp_path / "prepared", sets, tiny_tokenizer, seq_length=64))
    hf = {"max_steps": 4, "per_device_train_batch_size": 2, "save_steps": 2, **hf}
    train = {"mode": "lora", "output_dir": str(tmp_path / "train"), "report_to": ["none"], "hf": hf}
    cfg = build_config(Config, {"model": {"name_or_path": str(tiny_model_dir)}, "train": train})
    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    return build_trainer(cfg.train, loaded, prepared.train_rows(), [], tmp_path / "train")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), TORCH_SAVE_FULL])
def test_a_full_disk_at_a_checkpoint_fails_the_run_with_one_line(
    tmp_path, tiny_model_dir, tiny_tokenizer, error
):
    from cptkit.train.fit import fit

    out = tmp_path / "train"
    trainer, callbacks = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer)
    trainer.add_callback(FullDiskAtSave(error))
    with pytest.raises(CptkitError) as e:
        fit(trainer, callbacks, out, {"identity": "x"})
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{out}: the disk is full")
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == message
    assert not (out / "checkpoint-2").exists()  # the half-written checkpoint is not left to fill the disk


def test_training_is_refused_when_a_checkpoint_cannot_fit(tmp_path, tiny_model_dir, tiny_tokenizer):
    from cptkit.train.fit import fit

    out = tmp_path / "train"
    trainer, callbacks = _trainer(tmp_path, tiny_model_dir, tiny_tokenizer)
    with pytest.raises(
        CptkitError, match=r"not enough disk space: a checkpoint of this run needs about [\d.]+ KB"
    ):
        fit(trainer, callbacks, out, {"identity": "x"}, free_space=lambda path: 10)
    assert trainer.state.global_step == 0 and not (out / "run_meta.json").exists()

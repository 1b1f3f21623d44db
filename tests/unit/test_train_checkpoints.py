"""Which checkpoint folders are whole, which one resume takes, what rotation and cleanup may delete,
and metrics.jsonl cut back to a resumed step: on folders of small files, no model."""

from __future__ import annotations

import json
from pathlib import Path

from cptkit.config.train import TrainingRun
from cptkit.train.checkpoints import (
    COMPLETE_MARKER,
    mark_complete,
    mark_diverged,
    remove_unfinished,
    rotate,
    scan_checkpoints,
    set_aside_diverged,
    truncate_metrics,
)
from cptkit.train.checks import resume_checkpoint

WHOLE = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def checkpoint(out: Path, step: int, files=WHOLE, state=True, marked=True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x" * 10)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if marked:
        mark_complete(folder, step, {"learning_rate": 1e-4})
    return folder


def test_resume_takes_the_newest_complete_checkpoint_and_names_the_others(tmp_path, caplog):
    checkpoint(tmp_path, 3)
    six = checkpoint(tmp_path, 6)
    checkpoint(tmp_path, 9, files=WHOLE[:2], state=False, marked=False)  # killed while saving
    (tmp_path / "checkpoint-12").mkdir()  # killed just after the folder was made
    cut = checkpoint(tmp_path, 10)
    (cut / "optimizer.pt").write_bytes(b"x")  # the disk filled: a file shorter than when it was marked
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(TrainingRun(), tmp_path) == str(six)
    said = caplog.text
    assert "checkpoint-9" in said and "checkpoint-12" in said and "did not finish" in said
    assert "checkpoint-10" in said and "optimizer.pt" in said


def test_a_checkpoint_from_before_the_markers_resumes_when_its_files_are_whole(tmp_path):
    old = checkpoint(tmp_path, 4, marked=False)
    checkpoint(tmp_path, 8, files=WHOLE[:1], marked=False)  # no optimizer, scheduler, RNG state
    scan = scan_checkpoints(tmp_path)
    assert scan.newest == old and "optimizer" in scan.skipped[0][1]
    (old / "scheduler.pt").write_bytes(b"")
    assert "scheduler.pt is empty" in dict(scan_checkpoints(tmp_path).skipped)[old]
    # once a checkpoint of the folder carries the marker, one without it is an unfinished save
    (old / "scheduler.pt").write_bytes(b"x")
    checkpoint(tmp_path, 2)
    assert scan_checkpoints(tmp_path).newest == tmp_path / "checkpoint-2"


def test_diverged_checkpoints_are_never_resumed(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 6)
    assert [c.name for c in mark_diverged(tmp_path, after_step=3, since=3, reason="collapse")] == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert resume_checkpoint(TrainingRun(), tmp_path) == str(tmp_path / "checkpoint-2")


def test_only_unfinished_saves_of_checkpoint_files_are_removed(tmp_path):
    checkpoint(tmp_path, 2)
    killed = checkpoint(tmp_path, 4, files=WHOLE[:2], state=False, marked=False)
    mine = checkpoint(tmp_path, 6, files=WHOLE[:1], state=False, marked=False)
    (mine / "notes.txt").write_text("a user's file")
    assert remove_unfinished(tmp_path) == [killed]
    assert (mine / "notes.txt").is_file()


def test_rotation_keeps_the_newest_complete_checkpoints_and_never_an_unfinished_one(tmp_path):
    """transformers' own rotation keeps the highest-numbered folder whatever it holds: a stale
    unfinished checkpoint-9 beside a resumed run's new checkpoints would push out the whole ones."""
    unfinished = checkpoint(tmp_path, 9, files=WHOLE[:1], state=False, marked=False)
    (unfinished / "notes.txt").write_text("kept")
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4)
    newest = checkpoint(tmp_path, 6)
    assert [c.name for c in rotate(tmp_path, 1)] == ["checkpoint-2", "checkpoint-4"]
    assert newest.is_dir() and unfinished.is_dir()
    checkpoint(tmp_path, 7)
    assert rotate(tmp_path, 1, keep=newest) == [] and newest.is_dir()  # the guard's last good one


def test_marker_lists_every_file_with_its_size(tmp_path):
    folder = checkpoint(tmp_path, 5)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["step"] == 5 and marker["optimization"] == {"learning_rate": 1e-4}
    assert marker["files"]["optimizer.pt"] == 10 and COMPLETE_MARKER not in marker["files"]


def test_metrics_keep_each_step_once_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"type": "eval", "step": 0}] + [{"type": "train", "step": s} for s in range(1, 6)]
    lines.append({"type": "eval", "step": 4})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"type": "train", "st')
    assert truncate_metrics(path, 3) == 4
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept == lines[:4]
    assert truncate_metrics(path, -1) == 4 and path.read_text() == ""  # training starts over


def test_a_folder_without_markers_keeps_every_checkpoint(tmp_path):
    """An earlier cptkit's folder (no markers), saved with save_only_model: nothing can tell a killed save
    from a whole one there, so nothing is removed."""
    first = checkpoint(tmp_path, 2, files=WHOLE[:1], marked=False)
    second = checkpoint(tmp_path, 4, files=WHOLE[:1], marked=False)
    assert remove_unfinished(tmp_path) == []
    assert first.is_dir() and second.is_dir()


def test_a_diverged_checkpoint_resumed_on_purpose_stays_where_it_is(tmp_path):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4)
    (diverged,) = mark_diverged(tmp_path, after_step=3, since=3, reason="spike")
    assert set_aside_diverged(tmp_path, resume_from=diverged) == []
    assert (diverged / "trainer_state.json").is_file()
    assert [p.name for p in set_aside_diverged(tmp_path)] == ["diverged-checkpoint-4"]


def test_resuming_with_another_batch_is_refused(tmp_path):
    """The step of a checkpoint is a data position only for the batch it was trained with."""
    import pytest

    from cptkit.errors import CptkitError
    from cptkit.train.checkpoints import check_same_batch

    def settings(batch, accumulation=1, lr=1e-4):
        return {
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "learning_rate": lr,
        }

    saved = checkpoint(tmp_path, 4, marked=False)
    mark_complete(saved, 4, settings(4))
    check_same_batch(saved, settings(4, lr=1e-5))  # another learning rate continues
    with pytest.raises(CptkitError, match="per_device_train_batch_size 4"):
        check_same_batch(saved, settings(2))
    with pytest.raises(CptkitError, match="gradient_accumulation_steps 1"):
        check_same_batch(saved, settings(4, accumulation=2))


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path):
    from cptkit.train.checkpoints import set_aside_newer

    for step in (2, 4, 6):
        checkpoint(tmp_path, step)
    moved = set_aside_newer(tmp_path, tmp_path / "checkpoint-2")
    assert [p.name for p in moved] == ["abandoned-checkpoint-4", "abandoned-checkpoint-6"]
    assert (tmp_path / "abandoned-checkpoint-6" / "trainer_state.json").is_file()  # kept, not deleted
    assert resume_checkpoint(TrainingRun(), tmp_path) == str(tmp_path / "checkpoint-2")
    assert set_aside_newer(tmp_path, tmp_path / "checkpoint-2") == []

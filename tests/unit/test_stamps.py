"""Stage stamps: stable when the schema gains a field at its default; a finished folder recorded by an
earlier cptkit is kept aside, never deleted, when its stage must train again."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from cptkit.pipeline.runner import run_stage
from cptkit.pipeline.stages import Stage
from cptkit.pipeline.stamps import STAMP_VERSION, StageRecords, marker_hash, stamp


@dataclass
class Before:
    lr: float = 1e-4
    steps: int = 10


@dataclass
class After(Before):  # the same section after a release added two fields at their defaults
    embedding_lr: float | None = None
    extra: list[int] = field(default_factory=list)


def test_a_field_added_at_its_default_changes_no_stamp():
    assert stamp({"train": Before(lr=3e-4)}, []) == stamp({"train": After(lr=3e-4)}, [])
    assert stamp({"train": After(lr=3e-4)}, []) != stamp({"train": After(lr=3e-4, embedding_lr=1e-5)}, [])
    assert stamp({"train": Before(lr=3e-4)}, []) != stamp({"train": Before(lr=2e-4)}, [])


def _finished_stage(tmp_path: Path, version: int | None) -> tuple[Stage, StageRecords, Path]:
    folder = tmp_path / "run" / "train"
    folder.mkdir(parents=True)
    marker = folder / "run_meta.json"
    marker.write_text(json.dumps({"status": "complete"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    records = StageRecords(tmp_path / "run")
    records.record("train", status="complete", stamp="old-stamp", marker_hash=marker_hash(marker))
    if version is None:  # as an earlier cptkit wrote it
        del records.records["train"]["stamp_version"]
    stage = Stage(
        name="train",
        why_not=lambda c: None,
        sections=lambda c: {"train": After()},
        inputs=lambda c: [],
        marker=lambda c: marker,
        run=lambda c: (folder.mkdir(exist_ok=True), {"steps": 1})[1],
        describe=lambda r: "trained",
        resumes_from=lambda c: folder,
    )
    return stage, records, folder


def test_a_folder_recorded_by_an_earlier_cptkit_is_kept_aside(tmp_path):
    stage, records, folder = _finished_stage(tmp_path, version=None)
    outcome = run_stage(stage, None, records, False, Console(file=io.StringIO()), "train")
    assert outcome.row["status"] == "done"
    kept = folder.with_name("train.previous")
    assert (kept / "adapter_model.safetensors").read_bytes() == b"weights"
    assert records.records["train"]["stamp_version"] == STAMP_VERSION


def test_a_folder_trained_for_other_settings_starts_over(tmp_path):
    stage, records, folder = _finished_stage(tmp_path, version=STAMP_VERSION)
    run_stage(stage, None, records, False, Console(file=io.StringIO()), "train")
    assert not (folder / "adapter_model.safetensors").exists()
    assert not folder.with_name("train.previous").exists()


def test_a_failed_run_is_never_removed_when_the_settings_change(tmp_path):
    """After a divergence the advice is a lower learning rate: the stamp changes, and the checkpoints
    the rerun continues from must still be there."""
    stage, records, folder = _finished_stage(tmp_path, version=STAMP_VERSION)
    records.record("train", status="failed", stamp="old-stamp", seconds=1.0, error="diverged")
    checkpoint = folder / "checkpoint-4"
    checkpoint.mkdir()
    assert not records.holds_stale_output("train", "new-stamp", stage.marker(None))
    run_stage(stage, None, records, False, Console(file=io.StringIO()), "train")
    assert checkpoint.is_dir() and (folder / "adapter_model.safetensors").is_file()

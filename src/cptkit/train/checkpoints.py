"""Crash-safe checkpoints: which `checkpoint-N` folders are whole, which one a run resumes, and what is
left behind by a save that did not finish.

The Trainer writes a checkpoint file by file (weights, optimizer, scheduler, RNG, trainer state); a kill
or a full disk in between leaves a folder that looks like a checkpoint and is not. After the Trainer has
written every file (every rank its shards), `CheckpointCallback` writes `cptkit_complete.json` last, with
the name and size of each file: a checkpoint is complete when that marker is there and every file it
lists has its size. A folder without the marker counts as complete only when no checkpoint of the folder
carries one (a run from before cptkit marked its checkpoints, or plain transformers) and its files are
whole: a readable trainer_state.json, weights, optimizer, scheduler and RNG state, none empty.
A checkpoint written after a run diverged carries `cptkit_diverged.json` and is never resumed (nor
deleted): see `cptkit.train.guard`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from cptkit.errors import CptkitError
from cptkit.outputs import now, write_json

log = logging.getLogger(__name__)

COMPLETE_MARKER = "cptkit_complete.json"
DIVERGED_MARKER = "cptkit_diverged.json"
PREFIX = "checkpoint-"

# what a transformers/peft/DeepSpeed/FSDP checkpoint folder holds, and cptkit's own files in it
_CHECKPOINT_FILES = (
    "trainer_state.json training_args.bin optimizer.pt optimizer.bin scheduler.pt scaler.pt rng_state*.pth "
    "model.safetensors model-*.safetensors model.safetensors.index.json pytorch_model*.bin "
    "pytorch_model.bin.index.json adapter_model.safetensors adapter_model.bin adapter_config.json README.md "
    "config.json generation_config.json tokenizer* special_tokens_map.json added_tokens.json vocab.* "
    "merges.txt chat_template.* latest zero_to_fp32.py global_step* pytorch_model_fsdp_* optimizer_* "
    "cptkit_*.json *.tmp"
).split()
_WEIGHTS = (
    "model.safetensors model.safetensors.index.json pytorch_model.bin pytorch_model.bin.index.json "
    "adapter_model.safetensors adapter_model.bin global_step* pytorch_model_fsdp_*"
).split()
_OPTIMIZER = "optimizer.pt optimizer.bin optimizer_* global_step*".split()


def checkpoint_step(folder: Path) -> int | None:
    """N of a `checkpoint-N` folder, None for any other name."""
    number = folder.name[len(PREFIX) :]
    return int(number) if folder.name.startswith(PREFIX) and number.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, oldest step first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def _files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative name -> size in bytes), cptkit's marker left out."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel != COMPLETE_MARKER:
                sizes[rel] = path.stat().st_size
    return sizes


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def markers_in_use(output_dir: str | Path) -> bool:
    """Whether a checkpoint of `output_dir` carries the completion marker: then one without it is a
    save that did not finish."""
    return any((f / COMPLETE_MARKER).is_file() for f in list_checkpoints(output_dir))


def why_incomplete(checkpoint: Path, marked: bool | None = None) -> str | None:
    """Why `checkpoint` cannot be resumed (missing or damaged files, diverged), or None when it is whole.
    `marked`: `markers_in_use` of its folder (looked up when None)."""
    if marked is None:
        marked = markers_in_use(checkpoint.parent)
    diverged = _read_json(checkpoint / DIVERGED_MARKER)
    if diverged is not None:
        return f"written after the run diverged at step {diverged.get('since', '?')} ({DIVERGED_MARKER})"
    marker = _read_json(checkpoint / COMPLETE_MARKER)
    if marker is not None:
        for name, size in marker.get("files", {}).items():
            path = checkpoint / name
            if not path.is_file() or path.stat().st_size != size:
                return f"{name} is missing or not the size it was saved with"
        return None
    if marked:
        return f"no {COMPLETE_MARKER}: the save did not finish"
    names = [p.name for p in checkpoint.iterdir()]
    state = _read_json(checkpoint / "trainer_state.json")
    if not isinstance(state, dict) or "global_step" not in state:
        return "no readable trainer_state.json: the save did not finish"
    for what, patterns in (
        ("weights", _WEIGHTS),
        ("optimizer state", _OPTIMIZER),
        ("scheduler state", ["scheduler.pt", "global_step*"]),
        ("RNG state", ["rng_state*.pth"]),
    ):
        if not any(_matches(n, patterns) for n in names):
            return f"no {what}: the save did not finish"
    empty = [n for n, size in _files(checkpoint).items() if size == 0]
    if empty:
        return f"{empty[0]} is empty"
    return None


@dataclass(frozen=True)
class CheckpointScan:
    """The checkpoints of an output folder: the newest complete one and the newer ones that are not."""

    newest: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    complete: list[Path] = field(default_factory=list)


def scan_checkpoints(output_dir: str | Path) -> CheckpointScan:
    """Sort `output_dir`'s checkpoints into complete ones and the newer incomplete ones (with why)."""
    marked = markers_in_use(output_dir)
    complete, skipped = [], []
    for folder in list_checkpoints(output_dir):
        reason = why_incomplete(folder, marked)
        if reason is None:
            complete.append(folder)
            skipped = []  # only the ones newer than the newest complete checkpoint are news
        else:
            skipped.append((folder, reason))
    return CheckpointScan(complete[-1] if complete else None, skipped, complete)


def mark_complete(checkpoint: Path, step: int, settings: dict[str, Any] | None = None) -> None:
    """Write the completion marker: every file of the checkpoint with its size, and the optimisation
    settings it was trained with (see `CptTrainer`, which starts a fresh optimizer when they change)."""
    (checkpoint / DIVERGED_MARKER).unlink(missing_ok=True)  # a save over a diverged one replaced it
    record = {"step": step, "saved": now(), "optimization": settings, "files": _files(checkpoint)}
    write_json(checkpoint / COMPLETE_MARKER, record)


def mark_diverged(output_dir: str | Path, after_step: int, since: int, reason: str) -> list[Path]:
    """Mark every checkpoint saved after `after_step` (the last good logged step) as diverged, so
    resume never picks one; they are kept. Returns the marked ones."""
    marked = [c for c in list_checkpoints(output_dir) if checkpoint_step(c) > after_step]
    for checkpoint in marked:
        write_json(checkpoint / DIVERGED_MARKER, {"since": since, "reason": reason, "at": now()})
    return marked


def set_aside_diverged(output_dir: str | Path, resume_from: str | Path | None = None) -> list[Path]:
    """Rename each diverged `checkpoint-N` to `diverged-checkpoint-N` before a rerun trains past N, so
    the new save of step N does not land in it (it is kept, under a name no resume looks at). The
    checkpoint the run resumes from (`train.resume` may name a diverged one on purpose) stays."""
    moved = []
    resumed = Path(resume_from).resolve() if resume_from else None
    for checkpoint in list_checkpoints(output_dir):
        if checkpoint.resolve() == resumed:
            continue
        if (checkpoint / DIVERGED_MARKER).is_file():
            target = _free_name(checkpoint, "diverged")
            checkpoint.rename(target)
            log.info("%s diverged: kept as %s", checkpoint, target.name)
            moved.append(target)
    return moved


def set_aside_newer(output_dir: str | Path, resume_from: str | Path | None) -> list[Path]:
    """Resuming an older checkpoint on purpose (`train.resume: .../checkpoint-500` beside a 1000 and a
    1500) starts another trajectory from it: the newer checkpoints of the old one are renamed
    `abandoned-checkpoint-N`, so neither a later `resume: auto` nor the rotation mixes the two."""
    step = checkpoint_step(Path(resume_from)) if resume_from else None
    if step is None or Path(resume_from).resolve().parent != Path(output_dir).resolve():
        return []
    moved = []
    for checkpoint in list_checkpoints(output_dir):
        if checkpoint_step(checkpoint) > step:
            target = _free_name(checkpoint, "abandoned")
            checkpoint.rename(target)
            log.info("%s is newer than the checkpoint resumed: kept as %s", checkpoint, target.name)
            moved.append(target)
    return moved


def _free_name(checkpoint: Path, prefix: str) -> Path:
    target = checkpoint.with_name(f"{prefix}-{checkpoint.name}")
    n = 1
    while target.exists():
        target = checkpoint.with_name(f"{prefix}-{checkpoint.name}-{n}")
        n += 1
    return target


def holds_only_checkpoint_files(folder: Path) -> bool:
    return all(_matches(p.name, _CHECKPOINT_FILES) for p in folder.iterdir())


def remove_unfinished(output_dir: str | Path) -> list[Path]:
    """Remove the checkpoints whose save did not finish (newer than the newest complete one, without
    a marker, holding nothing but checkpoint files: what a killed save of this run left); a folder
    holding anything else is left where it is. Returns the removed ones."""
    removed = []
    scan = scan_checkpoints(output_dir)
    if not markers_in_use(Path(output_dir)):
        return removed  # a folder of an earlier cptkit: whether a save finished cannot be told, keep all
    newest = checkpoint_step(scan.newest) if scan.newest is not None else -1
    for folder, reason in scan.skipped:
        ours = not (folder / DIVERGED_MARKER).exists() and not (folder / COMPLETE_MARKER).exists()
        if ours and checkpoint_step(folder) > newest and holds_only_checkpoint_files(folder):
            log.info("removing %s, a checkpoint whose save did not finish (%s)", folder, reason)
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def rotate(
    output_dir: str | Path, limit: int | None, keep: Path | Sequence[Path | None] | None = None
) -> list[Path]:
    """Keep the `limit` most recently saved complete checkpoints (and `keep`: one or several) and delete
    older complete ones; incomplete and diverged checkpoints are never counted nor deleted, so an
    unfinished save can never push out the last whole one. Returns the deleted ones."""
    if not limit or limit <= 0:
        return []
    complete = scan_checkpoints(output_dir).complete
    complete.sort(
        key=lambda c: (c / COMPLETE_MARKER).stat().st_mtime if (c / COMPLETE_MARKER).exists() else 0
    )
    kept = {keep} if isinstance(keep, Path) else set(keep or ())
    deleted = [c for c in complete[:-limit] if c not in kept]
    for checkpoint in deleted:
        log.info("deleting %s (train.hf.save_total_limit: %d)", checkpoint, limit)
        shutil.rmtree(checkpoint, ignore_errors=True)
    return deleted


KeepHook = Callable[[str | Path], Path | None]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointCallback(TrainerCallback):
    """Marks each checkpoint complete once every rank has written it, then applies `save_total_limit`
    (cptkit rotates instead of the Trainer, which would count an unfinished folder as the newest).
    A save at a step whose folder already exists first drops that folder's marker, so a kill during
    the new save cannot leave old and new files passing for one checkpoint."""

    def __init__(
        self,
        settings: dict[str, Any],
        save_total_limit: int | None,
        keep: KeepHook | Sequence[KeepHook] | None = None,
    ):
        self.settings = settings
        self.save_total_limit = save_total_limit
        # output_dir -> a checkpoint rotation must not delete (the guard's last good one, the best one
        # within the forgetting budget)
        self.keep = [keep] if callable(keep) else list(keep or ())

    def on_step_end(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if control.should_save and state.is_world_process_zero:
            (folder / COMPLETE_MARKER).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # every rank has written its part of the checkpoint
        folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            mark_complete(folder, state.global_step, self.settings)
            rotate(args.output_dir, self.save_total_limit, keep=[hook(args.output_dir) for hook in self.keep])


def truncate_metrics(path: str | Path, through_step: int) -> int:
    """Keep the lines of metrics.jsonl up to step `through_step` (train and eval), so a resumed run
    logs each later step once; a half-written last line goes too. Atomic. Returns the lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = int(record.get("step", 0)) <= through_step
        except (ValueError, TypeError, AttributeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


# what fixes the data position of a step: with another batch, resuming at the same step would replay
# or skip rows (the Trainer skips step x batch rows of the new size)
BATCH_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def saved_settings(checkpoint: str | Path | None) -> dict[str, Any] | None:
    """The optimisation settings a checkpoint's completion marker records (None: not recorded)."""
    marker = _read_json(Path(checkpoint) / COMPLETE_MARKER) if checkpoint else None
    return marker.get("optimization") if isinstance(marker, dict) else None


def check_same_batch(checkpoint: str | Path | None, settings: dict[str, Any] | None) -> None:
    """Refuse to resume `checkpoint` with another batch: its step would land at another data position."""
    saved = saved_settings(checkpoint)
    if saved is None or settings is None:
        return
    changed = [k for k in BATCH_SETTINGS if k in saved and saved[k] != settings.get(k)]
    if changed:
        was = ", ".join(f"{k} {saved[k]}" for k in changed)
        now_ = ", ".join(f"{k} {settings.get(k)}" for k in changed)
        raise CptkitError(
            f"{checkpoint} was trained with {was}; this run has {now_}: resumed at the same step it would "
            "replay or skip training rows. Keep the batch settings to continue it, or train anew into "
            "another output_dir (or set train.resume: never)"
        )

"""Disk space for a training run: a checkpoint that cannot fit is refused before training starts, and a
disk that fills during training ends the run as `failed` in run_meta.json with a one-line error, the
half-written checkpoint removed so the disk is not left full."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cptkit.disk import FreeSpace, check_free_space, disk_full_message, free_bytes, is_disk_full
from cptkit.errors import CptkitError
from cptkit.train.meta import write_run_meta

log = logging.getLogger(__name__)

HINT = "free some space, or set save_total_limit in train.hf or another output_dir"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint


def checkpoint_bytes(model: Any) -> int:
    """About what one checkpoint takes: the trainable weights and AdamW's two moments, 4 bytes each."""
    return 3 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_checkpoint_space(trainer: Any, output_dir: str | Path, free_space: FreeSpace = free_bytes) -> None:
    """Refuse to start training when the disk cannot hold even one checkpoint."""
    check_free_space(
        output_dir, checkpoint_bytes(trainer.model), "a checkpoint of this run", HINT, free_space
    )


@contextlib.contextmanager
def failing_on_full_disk(trainer: Any, output_dir: str | Path) -> Iterator[None]:
    """A full disk inside the block: the half-written checkpoint removed, run_meta.json `failed` with
    the error (main process), and a one-line CptkitError."""
    try:
        yield
    except Exception as e:  # narrowed at once: only a full disk is caught (torch.save raises RuntimeError)
        if not is_disk_full(e):
            raise
        output_dir = Path(output_dir)
        message = disk_full_message(output_dir, e, HINT)
        if trainer.args.process_index == 0:
            _remove_partial_checkpoint(output_dir / f"checkpoint-{trainer.state.global_step}")
            try:
                write_run_meta(output_dir, status="failed", error=message)
            except OSError as again:  # even a small file does not fit: the message still says why
                log.error("could not record the failure in %s: %s", output_dir, again)
        raise CptkitError(message) from None


def _remove_partial_checkpoint(folder: Path) -> None:
    if folder.is_dir() and not (folder / TRAINER_STATE).is_file():
        log.warning("removing the half-written checkpoint %s", folder)
        shutil.rmtree(folder, ignore_errors=True)

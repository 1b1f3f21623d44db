"""The pickled files of a training checkpoint, checked the way the Trainer will load them on resume.

The Trainer reads a checkpoint's optimizer, scheduler, scaler and RNG states (and `.bin` weights) with
`torch.load(weights_only=True)`, which refuses a file that holds more than tensors and plain data (it
could run code). Checking them first turns that refusal, deep in the Trainer, into one message that
names the file, before the run is marked as running. Tensors are memory-mapped, not read, so even an
8B model's optimizer state costs no more than its pickle's few kilobytes.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from cptkit.errors import CptkitError, is_pickle_refusal, pickle_refusal

_PATTERNS = ("*.pt", "*.pth", "*.bin")
_NEVER_LOADED = {"training_args.bin"}  # the Trainer writes it for the record; resuming never reads it
_RESUME_ADVICE = (
    "resuming from it is refused for safety. If you wrote this checkpoint yourself, resave it with "
    "plain tensors; otherwise delete the checkpoint or start afresh (resume: never in the train or sft "
    "section)"
)


def check_resumable(checkpoint: str | Path | None) -> None:
    """Raise a CptkitError naming the file when resuming from `checkpoint` would fail to load one of its
    pickled files; nothing to do for None (a fresh start)."""
    if checkpoint is None:
        return
    folder = Path(checkpoint)
    files = sorted(
        {p for pattern in _PATTERNS for p in folder.glob(pattern)} - {folder / n for n in _NEVER_LOADED}
    )
    for path in files:
        try:
            _load_as_trainer_does(path)
        except pickle.UnpicklingError as e:
            if not is_pickle_refusal(e):
                raise _damaged(path, e) from None
            raise pickle_refusal(f"checkpoint file {path}", e, _RESUME_ADVICE) from None
        except (RuntimeError, OSError, EOFError) as e:  # a cut or corrupt file
            raise _damaged(path, e) from None


def _damaged(path: Path, e: BaseException) -> CptkitError:
    return CptkitError(
        f"checkpoint file {path} cannot be read ({type(e).__name__}: {e}); the checkpoint is damaged: "
        "delete it to resume from the one before, or start afresh (resume: never)"
    )


def _load_as_trainer_does(path: Path) -> None:
    """torch.load(weights_only=True) as the Trainer calls it (numpy allowed in RNG states only), the
    tensors memory-mapped instead of read where the file's format allows it."""
    from contextlib import nullcontext

    from transformers.trainer_pt_utils import safe_globals

    with safe_globals() if path.name.startswith("rng_state") else nullcontext():
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format

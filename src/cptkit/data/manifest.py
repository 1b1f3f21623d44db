"""The prepared dataset's contract: its folder layout, its manifest, and the tokenizer it was made with.

Layout of a folder written by `cptkit prepare`:
    manifest.json            counts, inputs, tokenizer, resolved config (see `read_manifest`)
    config.yaml              the resolved config
    train/                   datasets.save_to_disk: input_ids, position_ids (int32 lists, rows of at most
                             seq_length tokens, unpadded; position_ids restart at 0 at every document start)
    heldout/<source>/        datasets.save_to_disk: text, input_ids (whole document, BOS as the tokenizer
                             adds it, EOS at the end), num_bytes (UTF-8 bytes of text)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.paths import MANIFEST

FORMAT_VERSION = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash that changes whenever the tokenizer would produce different ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation and padding are call settings (a saved tokenizer.json may carry them, and prepare
        # turns them off): they do not change the id of any token
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:  # slow tokenizers: the vocabulary is what matters
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    # BOS and EOS go into the stored ids; padding is added later, by the collator, and never trained on
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id")}
    h.update(json.dumps(specials, sort_keys=True).encode())
    return h.hexdigest()[:16]


def read_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Load a prepared folder's manifest, or say plainly why this is not a prepared folder."""
    folder = Path(prepared_dir)
    path = folder / MANIFEST
    if not folder.exists():
        raise CptkitError(f"{folder}: no such folder; run `cptkit prepare CONFIG.yaml` first")
    if not path.is_file():
        raise CptkitError(
            f"{folder}: not a dataset made by `cptkit prepare` (no {MANIFEST}); run `cptkit prepare CONFIG.yaml`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CptkitError(f"{path}: unreadable ({e}); run `cptkit prepare` again") from None
    if manifest.get("status") != "complete":
        raise CptkitError(f"{folder}: preparation did not finish; rerun `cptkit prepare` to resume it")
    return manifest

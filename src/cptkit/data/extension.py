"""Prepare's vocabulary step (`data.vocabulary.extend > 0`): read the sample, learn the extension (or
reuse the one in the prepared folder when its inputs and settings are unchanged), and save it.

The sample is read through the same readers, normaliser and filters as tokenization, from the named
sources (default: every source of role domain), their first documents in reading order. The learnt
extension is keyed on those sources' file hashes, the base tokenizer's fingerprint and the settings;
`OUT/tokenizer/` and `OUT/vocabulary.json` are reused while the key matches, so a rerun learns nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.config.data import DataConfig
from cptkit.data import normalize as normalize_mod
from cptkit.data.document import Ledger
from cptkit.data.filters import build_filters
from cptkit.data.hashing import digest
from cptkit.data.readers import SourcePlan, read_documents
from cptkit.data.steps import run_steps
from cptkit.data.tokenize import describe, load_tokenizer
from cptkit.data.vocabulary_file import TOKENIZER_DIR, Vocabulary, read_vocabulary, write_vocabulary
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)


@dataclass
class Extended:
    """The extended tokenizer a plan tokenizes with, its record, and whether it still has to be saved."""

    tokenizer: Any
    vocabulary: Vocabulary
    base_info: dict[str, Any]  # the base tokenizer's manifest entry
    learnt: bool  # False: reused from the prepared folder

    def summary(self) -> dict[str, Any]:
        """The manifest's `vocabulary` entry."""
        v = self.vocabulary
        return {
            "extend": v.settings["extend"],
            "added": len(v.tokens),
            "base_size": v.base_size,
            "size": v.size,
            "min_frequency": v.settings["min_frequency"],
            "sample": {"documents": v.sample["documents"], "characters": v.sample["characters"]},
            "fertility": v.fertility,
        }


def learning_sources(data: DataConfig) -> list[str]:
    """The sources the extension learns from; CptkitError when none (or an unknown one) is named."""
    names = [s.name for s in data.sources]
    chosen = data.vocabulary.sources
    if chosen is None:
        chosen = [s.name for s in data.sources if s.role == "domain"]
        if not chosen:
            raise CptkitError(
                "data.vocabulary.sources: no source of role domain to learn new tokens from; give one "
                "source role: domain or name the sources in data.vocabulary.sources"
            )
    for i, name in enumerate(chosen):
        if name not in names:
            raise CptkitError(f"data.vocabulary.sources[{i}]: no source named {name!r} (sources: {names})")
    for name in chosen:
        source = next(s for s in data.sources if s.name == name)
        if source.type == "hub":
            raise CptkitError(
                f"data.vocabulary.sources: {name} is a hub dataset; the extension learns from local "
                "sources only: name local sources in data.vocabulary.sources"
            )
    return chosen


def extension_for(
    data: DataConfig,
    out: Path,
    base: Any,
    sources: dict[str, SourcePlan],
    sha256: dict[Path, str | None],
) -> Extended:
    """The extension `data.vocabulary` asks for: reused from `out` when its key matches, else learnt."""
    from cptkit.data.vocabulary import learn_extension

    chosen = learning_sources(data)
    base_info = describe(base, data.tokenizer)
    settings = dataclasses.asdict(data.vocabulary) | {"sources": chosen}
    key = digest(
        [[str(p), sha256.get(p)] for name in chosen for p in sources[name].files],
        base_info["fingerprint"],
        settings,
        dataclasses.asdict(data.filters),
        [next(s.text_field for s in data.sources if s.name == n) for n in chosen],
        normalize_mod.VERSION,
    )
    reused = _reusable(out, key, data.trust_remote_code)
    if reused is not None:
        log.info("reusing the vocabulary extension in %s (same inputs, base tokenizer and settings)", out)
        return Extended(reused[0], reused[1], base_info, learnt=False)
    start = time.perf_counter()
    texts = {name: _sample_texts(data, name, sources[name]) for name in chosen}
    ext = learn_extension(
        base, texts, data.vocabulary.extend, data.vocabulary.min_frequency, data.vocabulary.sample_chars
    )
    log.info(
        "learnt %d new tokens on %s characters in %.1f s",
        len(ext.tokens),
        f"{ext.sample['characters']:,}",
        time.perf_counter() - start,
    )
    info = describe(ext.tokenizer, str(out / TOKENIZER_DIR))
    vocabulary = Vocabulary(
        base_name=data.tokenizer,
        base_fingerprint=base_info["fingerprint"],
        base_size=ext.base_size,
        size=len(ext.tokenizer),
        fingerprint=info["fingerprint"],
        tokens=ext.tokens,
        settings=settings | {"key": key},
        sample=ext.sample,
        fertility=ext.fertility,
    )
    return Extended(ext.tokenizer, vocabulary, base_info, learnt=True)


def save_extension(out: Path, extended: Extended | None) -> None:
    """Write (or, with no extension asked, remove) `out/tokenizer/` and `out/vocabulary.json`."""
    from cptkit.data.vocabulary_file import VOCABULARY

    folder = out / TOKENIZER_DIR
    if extended is None:
        shutil.rmtree(folder, ignore_errors=True)
        (out / VOCABULARY).unlink(missing_ok=True)
        return
    if not extended.learnt:
        return
    shutil.rmtree(folder, ignore_errors=True)
    extended.tokenizer.save_pretrained(folder)
    write_vocabulary(out, extended.vocabulary)


def _reusable(out: Path, key: str, trust_remote_code: bool) -> tuple[Any, Vocabulary] | None:
    from cptkit.data.manifest import tokenizer_fingerprint

    try:
        vocabulary = read_vocabulary(out)
    except CptkitError:
        return None
    folder = out / TOKENIZER_DIR
    if vocabulary is None or vocabulary.settings.get("key") != key or not folder.is_dir():
        return None
    try:
        tok = load_tokenizer(str(folder), trust_remote_code, local_files_only=True)
    except CptkitError:
        return None
    return (tok, vocabulary) if tokenizer_fingerprint(tok) == vocabulary.fingerprint else None


def _sample_texts(data: DataConfig, name: str, plan: SourcePlan) -> Iterator[str]:
    """The source's documents as tokenization sees them: read, normalised, filtered, in order."""
    source = next(s for s in data.sources if s.name == name)
    steps = [normalize_mod.normalize, *build_filters(data.filters)]
    ledger = Ledger()
    docs = read_documents(plan, plan.files, source.text_field, ledger)
    try:
        for doc in run_steps(steps, docs, ledger):
            yield doc.text
    finally:
        docs.close()

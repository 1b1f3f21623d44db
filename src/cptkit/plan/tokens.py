"""Tokens per source and in the training mix: read from a prepared folder's manifest (exact), or
estimated from the corpus before it is prepared (`cptkit.plan.estimate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cptkit.config import Config
from cptkit.config.data import DataConfig
from cptkit.data.prepared import Prepared
from cptkit.errors import CptkitError
from cptkit.paths import MANIFEST, resolve


@dataclass(frozen=True)
class SourceTokens:
    """One source: what it holds after filtering (and dedup), what is held out, what trains and how
    much of it the mix takes (repeated or dropped segments)."""

    name: str
    role: str
    weight: float
    documents: int
    tokens: int
    heldout_tokens: int
    train_tokens: int
    mixed_tokens: int

    @property
    def sampling_factor(self) -> float:
        """Mixed over available training tokens: above 1 the source repeats, below 1 it is cut."""
        return self.mixed_tokens / self.train_tokens if self.train_tokens else 0.0


@dataclass(frozen=True)
class DataTokens:
    """The training data of a run, as `cptkit prepare` counts it (or would)."""

    sources: dict[str, SourceTokens]
    seq_length: int
    rows: int
    packing_efficiency: float
    origin: str  # where the numbers come from, in one line
    exact: bool  # True: from the prepared manifest
    notes: tuple[str, ...] = field(default=())

    @property
    def trained_tokens(self) -> int:
        """Tokens in the training rows (every source's mixed tokens)."""
        return sum(s.mixed_tokens for s in self.sources.values())

    def share(self, name: str) -> float:
        """The source's share of the training tokens."""
        total = self.trained_tokens
        return self.sources[name].mixed_tokens / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "exact": self.exact,
            "seq_length": self.seq_length,
            "rows": self.rows,
            "trained_tokens": self.trained_tokens,
            "packing_efficiency": self.packing_efficiency,
            "sources": {
                n: asdict(s) | {"share": self.share(n), "sampling_factor": s.sampling_factor}
                for n, s in self.sources.items()
            },
            "notes": list(self.notes),
        }


def from_manifest(prepared: Prepared) -> DataTokens:
    """The exact counts of a prepared folder."""
    sources = {
        name: SourceTokens(
            name=name,
            role=s.get("role", "domain"),
            weight=float(s.get("weight", 1.0)),
            documents=int(s.get("documents", 0)),
            tokens=int(s.get("tokens", 0)),
            heldout_tokens=int(s.get("heldout_tokens", 0)),
            train_tokens=int(s.get("train_tokens", 0)),
            mixed_tokens=int(s.get("mixed_tokens", 0)),
        )
        for name, s in prepared.sources.items()
    }
    totals = prepared.totals
    return DataTokens(
        sources=sources,
        seq_length=prepared.seq_length,
        rows=int(totals.get("rows", 0)),
        packing_efficiency=float(totals.get("packing_efficiency", 0.0)),
        origin=f"from the prepared manifest ({prepared.folder})",
        exact=True,
    )


def data_tokens(cfg: Config, sample_bytes: int) -> DataTokens:
    """The counts of the prepared folder the run trains on when it holds this config's data; else
    estimated from the corpus (`cptkit.plan.estimate`), with a note of why."""
    from cptkit.plan.estimate import estimate_tokens

    folder = resolve(cfg).prepared
    why = None
    if folder is not None and (folder / MANIFEST).is_file():
        try:
            prepared = Prepared.load(folder)
        except CptkitError as e:
            why = f"the prepared folder cannot be used ({e})"
        else:
            why = _other_settings(prepared, cfg.data)
            if why is None:
                return from_manifest(prepared)
    if cfg.data is None:
        raise CptkitError(
            f"train.dataset: {folder} is not a finished prepared dataset and the config has no data section to "
            "estimate from; run `cptkit prepare` or add the data section"
        )
    estimate = estimate_tokens(cfg.data, sample_bytes)
    return replace(estimate, notes=(*estimate.notes, why)) if why else estimate


def _other_settings(prepared: Prepared, data: DataConfig | None) -> str | None:
    """Why the prepared folder is not what `data` would prepare now (None: it is, as far as the
    manifest tells: sources, weights and sequence length)."""
    if data is None:
        return None
    now = {s.name: float(s.weight) for s in data.sources}
    then = {n: float(s.get("weight", 1.0)) for n, s in prepared.sources.items()}
    if now != then:
        return (
            f"{prepared.folder} was prepared from other sources or weights: estimated for this config instead"
        )
    if prepared.seq_length != data.seq_length:
        return (
            f"{prepared.folder} was prepared at seq_length {prepared.seq_length}, the config says "
            f"{data.seq_length}: estimated for this config instead"
        )
    return None

"""The prepared dataset's manifest as readable tables (for `cptkit prepare` and `cptkit inspect`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _n(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


_SOURCE_ROWS = (
    ("role", "role"),
    ("weight", "weight"),
    ("documents read", "read"),
    ("documents kept", "documents"),
    ("dropped", None),
    ("duplicates", "duplicates"),
    ("tokens kept", "tokens"),
    ("held-out documents", "heldout_documents"),
    ("held-out tokens", "heldout_tokens"),
    ("train tokens", "train_tokens"),
    ("sampling factor", "sampling_factor"),
    ("mixed tokens", "mixed_tokens"),
    ("share of mix", "mixed_share"),
)


def sources_table(manifest: dict[str, Any]) -> Table:
    """One column per source, one row per count (reads well for the usual handful of sources)."""
    t = Table(title=f"sources (chunking: {manifest['chunking']}, seq_length: {manifest['seq_length']})")
    t.add_column("")
    names = list(manifest["sources"])
    for name in names:
        t.add_column(name, justify="right")
    near = any(s.get("near_duplicates") for s in manifest["sources"].values())
    for label, key in _SOURCE_ROWS:
        if near and key == "duplicates":
            label = "duplicates (near)"
        cells = []
        for name in names:
            s = manifest["sources"][name]
            if key is None:
                cells.append(_n(sum(s["drops"].values())))
            elif key == "mixed_share":
                cells.append(f"{s.get(key, 0):.2%}")
            elif key == "sampling_factor":
                cells.append(f"{s[key]:.4f}")
            elif near and key == "duplicates":
                cells.append(f"{_n(s[key])} ({_n(s.get('near_duplicates', 0))})")
            else:
                cells.append(_n(s.get(key, "")))
        t.add_row(label, *cells)
    return t


def skips_table(manifest: dict[str, Any]) -> Table | None:
    """Every drop and repair by reason, with the first place it happened (file:line)."""
    t = Table(title="skipped or repaired (first example of each reason)")
    for col in ("source", "reason", "count", "example"):
        t.add_column(col, justify="right" if col == "count" else "left", overflow="fold")
    rows = 0
    for name, s in manifest["sources"].items():
        examples = s.get("examples", {})
        for kind, counts in (("dropped", s["drops"]), ("repaired", s.get("repairs", {}))):
            for reason, count in sorted(counts.items()):
                t.add_row(name, f"{reason} ({kind})", _n(count), examples.get(reason, ""))
                rows += 1
        if s.get("ignored_files"):
            t.add_row(
                name,
                "ignored_file (not .txt/.md/.rst/.jsonl/.json/.parquet/.csv)",
                _n(s["ignored_files"]),
                examples.get("ignored_file", ""),
            )
            rows += 1
        near = s.get("near_duplicates", 0)
        if s["duplicates"] - near:
            t.add_row(
                name, "duplicate (dropped)", _n(s["duplicates"] - near), "exact copy of an earlier document"
            )
            rows += 1
        if near:
            t.add_row(
                name,
                "near duplicate (dropped)",
                _n(near),
                "shares most word 5-grams with an earlier document",
            )
            rows += 1
    return t if rows else None


def totals_table(manifest: dict[str, Any]) -> Table:
    tot = manifest["totals"]
    t = Table(title=f"training set: {manifest['train_dir']}/")
    t.add_column("rows", justify="right")
    t.add_column("trained tokens", justify="right")
    t.add_column("padding (to seq_length)", justify="right")
    t.add_column("packing efficiency", justify="right")
    t.add_row(
        _n(tot["rows"]),
        _n(tot["trained_tokens"]),
        _n(tot["padding_tokens"]),
        f"{tot['packing_efficiency']:.2%}",
    )
    return t


def heldout_table(manifest: dict[str, Any]) -> Table:
    t = Table(title="held-out sets")
    for col in ("set", "role", "dir", "documents", "tokens", "bytes"):
        t.add_column(col, justify="left" if col in ("set", "role", "dir") else "right")
    for name, h in manifest["heldout"].items():
        t.add_row(name, h["role"], h["dir"], _n(h["documents"]), _n(h["tokens"]), _n(h["bytes"]))
    return t


def print_summary(manifest: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    tok = manifest["tokenizer"]
    console.print(
        f"tokenizer: {tok['name_or_path']} (vocab {tok['vocab_size']:,}, fingerprint {tok['fingerprint']})"
    )
    console.print(sources_table(manifest))
    skips = skips_table(manifest)
    if skips is not None:
        console.print(skips)
    console.print(heldout_table(manifest))
    console.print(totals_table(manifest))

"""The prepared dataset's manifest as readable tables (for `cptkit prepare` and `cptkit inspect`)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cptkit.data.fertility import before_after
from cptkit.data.mix import mix_warning


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


# beyond this many sources, one column per source no longer fits a terminal: one row per source instead
WIDE_SOURCES = 4
# counts per table in the one-row-per-source layout: each table fits 80 columns with 13-digit counts
_PER_TABLE = (5, 4, 4)


def sources_tables(manifest: dict[str, Any]) -> list[Table]:
    """The per-source counts: one table with a column per source for a handful of sources, else a few
    narrow tables with a row per source, so that no number is cut short on a terminal."""
    if len(manifest["sources"]) <= WIDE_SOURCES:
        return [sources_table(manifest)]
    title = f"sources (chunking: {manifest['chunking']}, seq_length: {manifest['seq_length']})"
    near = _has_near(manifest)
    tables, start = [], 0
    for part, size in enumerate(_PER_TABLE):  # the same counts as sources_table, in that order
        rows = _SOURCE_ROWS[start : start + size]
        start += size
        t = Table(title=title if part == 0 else None, box=box.SIMPLE_HEAD)
        t.add_column("source", overflow="fold", min_width=min(24, max(map(len, manifest["sources"]))))
        for label, key in rows:
            t.add_column(_label(label, key, near), justify="right")  # labels wrap, numbers do not
        for name, s in manifest["sources"].items():
            t.add_row(name, *(Text(_cell(s, key, near), no_wrap=True) for _, key in rows))
        tables.append(t)
    return tables


def sources_table(manifest: dict[str, Any]) -> Table:
    """One column per source, one row per count (reads well for the usual handful of sources)."""
    t = Table(title=f"sources (chunking: {manifest['chunking']}, seq_length: {manifest['seq_length']})")
    t.add_column("")
    names = list(manifest["sources"])
    for name in names:
        t.add_column(name, justify="right")
    near = _has_near(manifest)
    for label, key in _SOURCE_ROWS:
        t.add_row(_label(label, key, near), *(_cell(manifest["sources"][n], key, near) for n in names))
    return t


def _has_near(manifest: dict[str, Any]) -> bool:
    return any(s.get("near_duplicates") for s in manifest["sources"].values())


def _label(label: str, key: str | None, near: bool) -> str:
    return "duplicates (near)" if near and key == "duplicates" else label


def _cell(s: dict[str, Any], key: str | None, near: bool) -> str:
    if key is None:
        return _n(sum(s["drops"].values()))
    if key == "mixed_share":
        return f"{s.get(key, 0):.2%}"
    if key == "sampling_factor":
        return f"{s[key]:.4f}"
    if near and key == "duplicates":
        return f"{_n(s[key])} ({_n(s.get('near_duplicates', 0))})"
    return _n(s.get(key, ""))


def mix_note(manifest: dict[str, Any]) -> str | None:
    """The warning of `cptkit.data.mix.mix_warning` for this dataset, if its mix dropped most tokens."""
    sources = manifest["sources"]
    return mix_warning(
        {n: s.get("train_tokens", 0) for n, s in sources.items()},
        {n: s.get("mixed_tokens", 0) for n, s in sources.items()},
        {n: s.get("weight", 0) for n, s in sources.items()},
        manifest.get("mix", "downsample"),
    )


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


def fertility_table(manifest: dict[str, Any]) -> Table | None:
    """Tokens the tokenizer spends per source's text (per 1k characters, per word or, for a script
    without spaces, per character), so a domain that costs more than general text shows before
    training; with a vocabulary extension, its tokens per 1k characters before -> after too. None
    for a manifest made before fertility was counted."""
    sources = manifest["sources"]
    if not any(s.get("fertility") for s in sources.values()):
        return None
    vocabulary = manifest.get("vocabulary")
    changes = {name: before_after(vocabulary, name) for name in sources}
    t = Table(title="fertility (tokens the tokenizer spends on each source's kept text)")
    t.add_column("source", overflow="fold")
    for col in ("role", "tokens / 1k chars", "tokens / word", "tokens / char"):
        t.add_column(col, justify="left" if col == "role" else "right", no_wrap=col != "role")
    extended = any(changes.values())
    if extended:
        t.add_column("tokens / 1k chars: base -> extended vocabulary", justify="right")
    for name, s in sources.items():
        f = s.get("fertility") or {}
        per_word = f.get("tokens_per_word")
        if f.get("unit") == "character":
            word_cell = "- (no spaces)"
        else:
            word_cell = "-" if per_word is None else f"{per_word:.3f}"
        cells = [name, str(s.get("role", "")), _fixed(f.get("tokens_per_1k_chars"), 1), word_cell]
        cells.append(_fixed(f.get("tokens_per_char"), 4))
        if extended:
            cells.append(changes[name] or "-")
        t.add_row(*cells)
    return t


def _fixed(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


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
    """Each held-out set's size, with the held-out fraction and the floor it was asked to meet."""
    config = manifest.get("config") or {}
    fraction = f" (fraction {config['heldout_fraction']})" if "heldout_fraction" in config else ""
    t = Table(title=f"held-out sets{fraction}")
    floors = manifest.get("heldout_floor")  # absent from manifests made before held-out floors
    for col in ("set", "role", "dir"):
        t.add_column(col, overflow="fold")  # names wrap; counts stay whole
    for col in ("documents", "tokens", "bytes"):
        t.add_column(col, justify="right", no_wrap=True)
    if floors is not None:
        t.add_column("floor (documents / tokens)", justify="right")
    for name, h in manifest["heldout"].items():
        cells = [name, h["role"], h["dir"], _n(h["documents"]), _n(h["tokens"]), _n(h["bytes"])]
        if floors is not None:
            cells.append(_floor_cell(floors.get(name)))
        t.add_row(*cells)
    return t


def _floor_cell(floor: dict[str, Any] | None) -> Text:
    if floor is None:
        return Text("none")
    text = f"{_n(floor['min_documents'])} / {_n(floor['min_tokens'])}"
    return Text(text) if floor["met"] else Text(f"{text} not met", style="yellow")


def print_summary(manifest: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    tok = manifest["tokenizer"]
    console.print(
        f"tokenizer: {tok['name_or_path']} (vocab {tok['vocab_size']:,}, fingerprint {tok['fingerprint']})"
    )
    for table in sources_tables(manifest):
        console.print(table)
    fertility = fertility_table(manifest)
    if fertility is not None:
        console.print(fertility)
    skips = skips_table(manifest)
    if skips is not None:
        console.print(skips)
    console.print(heldout_table(manifest))
    console.print(totals_table(manifest))
    note = mix_note(manifest)
    if note:
        console.print(Text(f"warning: {note}", style="yellow"))

"""Result rows, deltas against the base model, what each delta reads as, and the tables built from them
(results.md, report.md's evaluation tables, the terminal summary).

A delta reads as the user asks it: on a domain set a lower loss is the gain the training bought, on a
general set a higher loss is what it forgot; each is said only when the bootstrap interval over the
set's documents (`cptkit.eval.bootstrap`) is clear of 0, so a change within the noise is called that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.eval.bootstrap import LEVEL, RESAMPLES, SEED, Interval, perplexity_change_interval
from cptkit.outputs import now, versions, write_json
from cptkit.paths import RESULTS, RESULTS_MD


def deltas(
    results: list[dict[str, Any]], base: str = "base", resamples: int = RESAMPLES
) -> list[dict[str, Any]]:
    """Every non-base model's change against the model named `base`, per set, with the bootstrap interval
    of the perplexity change where both rows carry per-document numbers (`doc_nats`, `doc_tokens`)."""
    before = {r["set"]: r for r in results if r["model"] == base}
    out = []
    for r in results:
        b = before.get(r["set"])
        if r["model"] == base or b is None:
            continue
        interval = _paired_interval(b, r, resamples)
        out.append(
            {
                "model": r["model"],
                "set": r["set"],
                "role": r["role"],
                "loss_delta": r["loss"] - b["loss"],
                "perplexity_before": b["perplexity"],
                "perplexity_after": r["perplexity"],
                "perplexity_change": math.expm1(r["loss"] - b["loss"]),
                "perplexity_change_interval": interval.as_list() if interval else None,
                "bpb_delta": r["bits_per_byte"] - b["bits_per_byte"],
            }
        )
    return out


PER_DOCUMENT = ("doc_nats", "doc_tokens")  # a row's numbers per document, in the set's order


def _paired_interval(before: dict[str, Any], after: dict[str, Any], resamples: int) -> Interval | None:
    """The interval of a delta, when both rows scored the same documents one by one."""
    if (
        "doc_nats" not in before
        or "doc_nats" not in after
        or len(before["doc_nats"]) != len(after["doc_nats"])
    ):
        return None
    return perplexity_change_interval(
        before["doc_nats"], before["doc_tokens"], after["doc_nats"], after["doc_tokens"], resamples
    )


@dataclass(frozen=True)
class Wording:
    """The words a verdict uses. On a domain set: learned, got worse, or neither within the noise; on a
    general set: forgot, improved, or no forgetting that the interval can show."""

    gain: str
    worse: str
    forgetting: str
    improved: str


RESULTS_WORDING = Wording("domain gain", "domain got worse", "forgetting", "improved")  # results.md
REPORT_WORDING = Wording("gain", "got worse", "forgetting", "improved")  # report.md
HEADLINE_WORDING = Wording("learned", "got worse", "forgot", "improved")  # the demo's headline


def verdict(
    role: str, change: float, wording: Wording = RESULTS_WORDING, interval: Sequence[float] | None = None
) -> str:
    """What a change on a set of this role means. `interval` is the bootstrap interval of the perplexity
    change (fractions): a gain, a loss or forgetting is said only when the whole interval is on one side
    of 0, and otherwise the noise it is within. Without an interval (too few documents, no per-document
    numbers) the direction of `change` (after minus before of the loss, or of any measure that moves
    with it) is said, marked as such."""
    good, bad = (wording.gain, wording.worse) if role == "domain" else (wording.improved, wording.forgetting)
    if interval is None:
        if change == 0:
            return "no change"
        return f"{good if change < 0 else bad} (no noise estimate)"
    low, high = interval
    if high < 0:
        return good
    if low > 0:
        return bad
    if role == "domain":
        return f"no change within noise (±{(high - low) / 2 * 100:.1f}%)"
    return f"no measurable forgetting (interval [{low * 100:+.1f}%, {high * 100:+.1f}%])"


def delta_verdict(d: dict[str, Any], wording: Wording = RESULTS_WORDING) -> str:
    """`verdict` of one delta of results.json."""
    return verdict(d["role"], d["loss_delta"], wording, d.get("perplexity_change_interval"))


def perplexity_change(before: float, after: float) -> float:
    """The change of perplexity in percent (0 when there is no perplexity before)."""
    return (after / before - 1) * 100 if before else 0.0


@dataclass(frozen=True)
class Column:
    """One column of a results table: the row's key, its header (`short` on the terminal), its format."""

    key: str
    header: str
    fmt: str = ""
    short: str | None = None

    @property
    def numeric(self) -> bool:
        return self.key not in ("model", "set", "role")

    def cell(self, row: dict[str, Any]) -> str:
        return format(row[self.key], self.fmt)


RESULT_COLUMNS = (
    Column("model", "model"),
    Column("set", "set"),
    Column("role", "role"),
    Column("loss", "loss", ".4f"),
    Column("perplexity", "perplexity", ".3f", short="ppl"),
    Column("bits_per_byte", "bits/byte", ".4f"),
    Column("tokens", "tokens"),
    Column("bytes", "bytes"),
    Column("documents", "documents"),
)
SUMMARY_KEYS = ("model", "set", "role", "loss", "perplexity", "bits_per_byte", "tokens")  # report, terminal


def _columns(keys: tuple[str, ...] | None) -> list[Column]:
    return [c for c in RESULT_COLUMNS if keys is None or c.key in keys]


def markdown_table(headers: list[str], rows: list[list[str]], numeric: list[bool]) -> list[str]:
    """A markdown table, numeric columns right-aligned."""
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
    ]


def results_table(results: list[dict[str, Any]], keys: tuple[str, ...] | None = None) -> list[str]:
    """The result rows as markdown lines: every column, or those named in `keys` (in table order)."""
    columns = _columns(keys)
    return markdown_table(
        [c.header for c in columns],
        [[c.cell(r) for c in columns] for r in results],
        [c.numeric for c in columns],
    )


def interval_text(interval: Sequence[float] | None) -> str:
    """A perplexity-change interval in percent, e.g. `[-2.1%, +0.4%]` ("-" when there is none)."""
    return "-" if interval is None else f"[{interval[0] * 100:+.1f}%, {interval[1] * 100:+.1f}%]"


def _change_cell(d: dict[str, Any]) -> str:
    """A delta's perplexity change and its interval, e.g. `-4.1% [-6.0%, -2.2%]`."""
    return f"{math.expm1(d['loss_delta']) * 100:+.1f}% {interval_text(d.get('perplexity_change_interval'))}"


def deltas_table(delta_rows: list[dict[str, Any]]) -> list[str]:
    """Each delta against the base model as a markdown line, with the interval and its verdict."""
    headers = [
        "model",
        "set",
        "role",
        "loss delta",
        "perplexity before -> after",
        "bits/byte delta",
        f"perplexity change ({LEVEL:.0%} interval)",
        "reading",
    ]
    rows = [
        [
            d["model"],
            d["set"],
            d["role"],
            f"{d['loss_delta']:+.4f}",
            f"{d['perplexity_before']:.3f} -> {d['perplexity_after']:.3f}",
            f"{d['bpb_delta']:+.4f}",
            _change_cell(d),
            delta_verdict(d),
        ]
        for d in delta_rows
    ]
    return markdown_table(headers, rows, [False] * 3 + [True] * 4 + [False])


def markdown(results: list[dict[str, Any]], delta_rows: list[dict[str, Any]]) -> str:
    """results.md: every result row, then every delta against the base model."""
    lines = [
        "# Evaluation",
        "",
        "Token-weighted loss (nats per predicted token), perplexity = exp(loss), and "
        "bits per byte = total nats / (ln 2 x UTF-8 bytes), comparable across tokenizers. "
        f"Each change against the base model carries a {LEVEL:.0%} interval from a paired bootstrap over "
        "the set's documents; a gain or forgetting is said only when the interval is clear of 0.",
        "",
        *results_table(results),
    ]
    if delta_rows:
        lines += ["", "## Against the base model", "", *deltas_table(delta_rows)]
    return "\n".join(lines) + "\n"


def results_record(
    rows: list[dict[str, Any]],
    models: list[Any],
    notes: list[str],
    seq_length: int,
    device: Any,
    dtype: Any,
    resamples: int = RESAMPLES,
) -> dict[str, Any]:
    """results.json's content: the rows, their deltas against `base` (with `resamples` bootstrap
    resamples for each interval), and how they were measured. The per-document numbers the intervals
    come from are left out of the rows written."""
    return {
        "results": [{k: v for k, v in r.items() if k not in PER_DOCUMENT} for r in rows],
        "deltas": deltas(rows, resamples=resamples),
        "bootstrap": {"resamples": resamples, "level": LEVEL, "seed": SEED, "over": "documents"},
        "seq_length": seq_length,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "models": [vars(m) for m in models],
        "notes": notes,
        "created": now(),
        "versions": versions(),
    }


def write_results(folder: Path, record: dict[str, Any]) -> None:
    """results.json and results.md into `folder`."""
    write_json(folder / RESULTS, record)
    (folder / RESULTS_MD).write_text(markdown(record["results"], record["deltas"]), encoding="utf-8")


def print_summary(results: list[dict[str, Any]], delta_rows: list[dict[str, Any]]) -> None:
    """The results as a rich table on the terminal (stderr, so stdout stays clean for pipes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cptkit eval")
    columns = _columns(SUMMARY_KEYS)
    for c in columns:
        table.add_column(c.short or c.header, justify="right" if c.numeric else "left")
    table.add_column("Δ loss vs base", justify="right")
    table.add_column(f"Δ ppl ({LEVEL:.0%} interval)", justify="right")
    table.add_column("reading")
    by_key = {(d["model"], d["set"]): d for d in delta_rows}
    for r in results:
        d = by_key.get((r["model"], r["set"]))
        cells = [f"{d['loss_delta']:+.4f}", _change_cell(d), delta_verdict(d)] if d else ["", "", ""]
        table.add_row(*(c.cell(r) for c in columns), *cells)
    Console(stderr=True).print(table)

"""Result rows, deltas against the base model, what each delta reads as, and the tables built from them
(results.md, report.md's evaluation tables, the terminal summary).

A delta reads as the user asks it: on a domain set a lower loss is the gain the training bought, on a
general set a higher loss is what it forgot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.outputs import now, versions, write_json
from cptkit.paths import RESULTS, RESULTS_MD


def deltas(results: list[dict[str, Any]], base: str = "base") -> list[dict[str, Any]]:
    """Every non-base model's change against the model named `base`, per set."""
    before = {r["set"]: r for r in results if r["model"] == base}
    out = []
    for r in results:
        b = before.get(r["set"])
        if r["model"] == base or b is None:
            continue
        out.append(
            {
                "model": r["model"],
                "set": r["set"],
                "role": r["role"],
                "loss_delta": r["loss"] - b["loss"],
                "perplexity_before": b["perplexity"],
                "perplexity_after": r["perplexity"],
                "bpb_delta": r["bits_per_byte"] - b["bits_per_byte"],
            }
        )
    return out


@dataclass(frozen=True)
class Wording:
    """The words a verdict uses: on a domain set (gain or not), on a general set (forgetting or not)."""

    gain: str
    no_gain: str
    forgetting: str
    no_forgetting: str


RESULTS_WORDING = Wording("domain gain", "no domain gain", "forgetting", "no forgetting")  # results.md
REPORT_WORDING = Wording("gain", "no gain", "forgetting", "no forgetting")  # report.md
HEADLINE_WORDING = Wording("learned", "no gain", "forgot", "no forgetting")  # the demo's headline


def verdict(role: str, change: float, wording: Wording = RESULTS_WORDING) -> str:
    """What a change on a set of this role means. `change` is after minus before of the loss, or of any
    measure that moves with it (perplexity, its change in percent): only its sign counts."""
    if role == "domain":
        return wording.gain if change < 0 else wording.no_gain
    return wording.forgetting if change > 0 else wording.no_forgetting


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


def deltas_table(delta_rows: list[dict[str, Any]]) -> list[str]:
    """Each delta against the base model as a markdown line, with its verdict."""
    headers = [
        "model",
        "set",
        "role",
        "loss delta",
        "perplexity before -> after",
        "bits/byte delta",
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
            verdict(d["role"], d["loss_delta"]),
        ]
        for d in delta_rows
    ]
    return markdown_table(headers, rows, [False] * 3 + [True] * 3 + [False])


def markdown(results: list[dict[str, Any]], delta_rows: list[dict[str, Any]]) -> str:
    """results.md: every result row, then every delta against the base model."""
    lines = [
        "# Evaluation",
        "",
        "Token-weighted loss (nats per predicted token), perplexity = exp(loss), and "
        "bits per byte = total nats / (ln 2 x UTF-8 bytes), comparable across tokenizers.",
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
) -> dict[str, Any]:
    """results.json's content: the rows, their deltas against `base`, and how they were measured."""
    return {
        "results": rows,
        "deltas": deltas(rows),
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
    by_key = {(d["model"], d["set"]): d for d in delta_rows}
    for r in results:
        d = by_key.get((r["model"], r["set"]))
        change = f"{d['loss_delta']:+.4f} ({verdict(d['role'], d['loss_delta'])})" if d else ""
        table.add_row(*(c.cell(r) for c in columns), change)
    Console(stderr=True).print(table)

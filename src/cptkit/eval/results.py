"""Result rows, deltas against the base model, and their tables (results.md, the terminal summary).

A delta reads as the user asks it: on a domain set a lower loss is the gain the training bought, on a
general set a higher loss is what it forgot.
"""

from __future__ import annotations

from typing import Any


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


def verdict(delta: dict[str, Any]) -> str:
    d = delta["loss_delta"]
    if delta["role"] == "domain":
        return "domain gain" if d < 0 else "no domain gain"
    return "forgetting" if d > 0 else "no forgetting"


def markdown(results: list[dict[str, Any]], delta_rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Evaluation",
        "",
        "Token-weighted loss (nats per predicted token), perplexity = exp(loss), and "
        "bits per byte = total nats / (ln 2 x UTF-8 bytes), comparable across tokenizers.",
        "",
        "| model | set | role | loss | perplexity | bits/byte | tokens | bytes | documents |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['model']} | {r['set']} | {r['role']} | {r['loss']:.4f} | {r['perplexity']:.3f} | "
        f"{r['bits_per_byte']:.4f} | {r['tokens']} | {r['bytes']} | {r['documents']} |"
        for r in results
    ]
    if delta_rows:
        lines += [
            "",
            "## Against the base model",
            "",
            "| model | set | role | loss delta | perplexity before -> after | bits/byte delta | reading |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        lines += [
            f"| {d['model']} | {d['set']} | {d['role']} | {d['loss_delta']:+.4f} | {d['perplexity_before']:.3f}"
            f" -> {d['perplexity_after']:.3f} | {d['bpb_delta']:+.4f} | {verdict(d)} |"
            for d in delta_rows
        ]
    return "\n".join(lines) + "\n"


def print_summary(results: list[dict[str, Any]], delta_rows: list[dict[str, Any]]) -> None:
    """The results as a rich table on the terminal (stderr, so stdout stays clean for pipes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cptkit eval")
    for col in ("model", "set", "role", "loss", "ppl", "bits/byte", "tokens", "Δ loss vs base"):
        table.add_column(col, justify="right" if col not in ("model", "set", "role") else "left")
    by_key = {(d["model"], d["set"]): d for d in delta_rows}
    for r in results:
        d = by_key.get((r["model"], r["set"]))
        table.add_row(
            r["model"],
            r["set"],
            r["role"],
            f"{r['loss']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['bits_per_byte']:.4f}",
            str(r["tokens"]),
            f"{d['loss_delta']:+.4f} ({verdict(d)})" if d else "",
        )
    Console(stderr=True).print(table)

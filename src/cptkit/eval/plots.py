"""The report's PNG plots (matplotlib, Agg backend: no display needed). Each returns the file it wrote,
or None when there is nothing to plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path.name


def training(train: dict[str, Any], folder: Path) -> str | None:
    """Training loss (left axis) and learning rate (right axis) over steps."""
    pts = [
        (s, x, lr)
        for s, x, lr in zip(train["steps"], train["loss"], train["learning_rate"], strict=True)
        if x is not None
    ]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss", color="tab:blue")
    lr = [(p[0], p[2]) for p in pts if p[2] is not None]
    if lr:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in lr], [p[1] for p in lr], color="tab:orange", label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("training loss and learning rate")
    return _save(fig, folder / "training.png")


def heldout(train: dict[str, Any], folder: Path) -> str | None:
    """Held-out loss per set over steps: domain sets solid (should fall), general dashed (should stay)."""
    sets = train.get("heldout") or {}
    if not sets:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, s in sets.items():
        ax.plot(
            s["steps"],
            s["loss"],
            "-" if s["role"] == "domain" else "--",
            marker="o",
            label=f"{name} ({s['role']})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_title("held-out loss: domain (solid) and general (dashed)")
    ax.legend()
    return _save(fig, folder / "heldout.png")


def throughput(train: dict[str, Any], folder: Path) -> str | None:
    """Trained tokens per second and peak GPU memory over steps."""
    pts = [
        (s, t, m)
        for s, t, m in zip(train["steps"], train["tokens_per_second"], train["peak_memory_gb"], strict=True)
        if t is not None
    ]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:green")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s", color="tab:green")
    mem = [(p[0], p[2]) for p in pts if p[2] is not None]
    if mem:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in mem], [p[1] for p in mem], color="tab:red")
        ax2.set_ylabel("peak memory (GB)", color="tab:red")
    ax.set_title("throughput and memory")
    return _save(fig, folder / "throughput.png")


def perplexity(results: list[dict[str, Any]], folder: Path) -> str | None:
    """Perplexity per set, one bar per model (base vs adapted side by side)."""
    if not results:
        return None
    plt = _plt()
    sets = list(dict.fromkeys(r["set"] for r in results))
    models = list(dict.fromkeys(r["model"] for r in results))
    value = {(r["model"], r["set"]): r["perplexity"] for r in results}
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sets) * len(models) / 2 + 3), 3.5))
    for i, m in enumerate(models):
        xs = [j + i * width for j in range(len(sets))]
        ax.bar(xs, [value.get((m, s), 0) for s in sets], width, label=m)
    roles = {r["set"]: r["role"] for r in results}
    ax.set_xticks(
        [j + width * (len(models) - 1) / 2 for j in range(len(sets))], [f"{s}\n({roles[s]})" for s in sets]
    )
    ax.set_ylabel("perplexity")
    ax.set_title("held-out perplexity per set")
    ax.legend()
    return _save(fig, folder / "perplexity.png")

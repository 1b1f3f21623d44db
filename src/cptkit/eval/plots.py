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


def _over_steps(train: dict[str, Any], left: str, right: str) -> list[tuple[Any, Any, Any]]:
    """(step, left value, right value) of every logged step where the left value is known."""
    return [
        (s, a, b) for s, a, b in zip(train["steps"], train[left], train[right], strict=True) if a is not None
    ]


def _twin_axes(
    pts: list[tuple[Any, Any, Any]], left: tuple[str, str], right: tuple[str, str], title: str, path: Path
) -> str:
    """The left series over steps on the left axis, the right one (where known) on a second axis;
    `left` and `right` are (label, colour)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=left[1], label=left[0])
    ax.set_xlabel("step")
    ax.set_ylabel(left[0], color=left[1])
    second = [(p[0], p[2]) for p in pts if p[2] is not None]
    if second:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in second], [p[1] for p in second], color=right[1], label=right[0])
        ax2.set_ylabel(right[0], color=right[1])
    ax.set_title(title)
    return _save(fig, path)


def training(train: dict[str, Any], folder: Path) -> str | None:
    """Training loss (left axis) and learning rate (right axis) over steps."""
    pts = _over_steps(train, "loss", "learning_rate")
    if not pts:
        return None
    labels = ("train loss", "tab:blue"), ("learning rate", "tab:orange")
    return _twin_axes(pts, *labels, "training loss and learning rate", folder / "training.png")


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
    pts = _over_steps(train, "tokens_per_second", "peak_memory_gb")
    if not pts:
        return None
    labels = ("tokens / s", "tab:green"), ("peak memory (GB)", "tab:red")
    return _twin_axes(pts, *labels, "throughput and memory", folder / "throughput.png")


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


def tradeoff(interpolation: dict[str, Any] | None, folder: Path) -> str | None:
    """eval.interpolate's trade-off curve: domain perplexity change (y) against general change (x), in
    percent, one point per scale, the base at the origin and the forgetting budget as a vertical line."""
    points = [
        p
        for p in (interpolation or {}).get("points", [])
        if p["domain_change"] is not None and p["general_change"] is not None
    ]
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs = [0.0] + [100 * p["general_change"] for p in points]
    ys = [0.0] + [100 * p["domain_change"] for p in points]
    ax.plot(xs, ys, "-o", color="tab:blue")
    for x, y, label in zip(xs, ys, ["base"] + [f"{p['scale']:g}" for p in points], strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4))
    ax.axvline(100 * interpolation["budget"], color="tab:red", linestyle="--", label="forgetting budget")
    best = interpolation.get("best")
    if best is not None:
        ax.plot(
            [100 * best["general_change"]],
            [100 * best["domain_change"]],
            "*",
            ms=14,
            color="tab:green",
            label=f"best (scale {best['scale']:g})",
        )
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("general perplexity change (%)")
    ax.set_ylabel("domain perplexity change (%)")
    ax.set_title("interpolation between base and adapted")
    ax.legend()
    return _save(fig, folder / "tradeoff.png")


def grpo(grpo_block: dict[str, Any] | None, folder: Path) -> str | None:
    """GRPO's mean reward over steps: the weighted total (thick) and each reward function's mean."""
    curve = ((grpo_block or {}).get("train") or {}).get("curve") or {}
    steps = curve.get("steps") or []
    series = {k: v for k, v in curve.items() if k != "steps" and any(x is not None for x in v)}
    if not steps or not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in series.items():
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and s is not None]
        total = name == "reward"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            linewidth=2.5 if total else 1.2,
            label="total (weighted)" if total else name,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("GRPO: mean reward of the sampled completions")
    ax.legend()
    return _save(fig, folder / "grpo.png")

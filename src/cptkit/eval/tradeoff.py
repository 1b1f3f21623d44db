"""What eval.interpolate's points say: each point's domain gain and general change against the base,
whether it stays within the forgetting budget, and the best point (results.json's `interpolation`
block, the console lines and the report's). Plain numbers in, plain numbers out: no model here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cptkit.eval.interpolate import Sweep

NO_BUDGET = "no train.forgetting_budget: 0, general perplexity not above the base's (point estimate)"
POINT_PREFIX = "interpolated@"


def point_name(scale: float) -> str:
    """The model name of one point in results.json: interpolated@0.5."""
    return f"{POINT_PREFIX}{scale:g}"


def is_point(model: str) -> bool:
    """Whether a results.json model name is a point of the sweep (which summaries of models leave out)."""
    return model.startswith(POINT_PREFIX)


def role_change(rows: list[dict[str, Any]], base: str, model: str, role: str) -> float | None:
    """The change of perplexity (a fraction: 0.01 is 1% higher) of `model` against `base` over every set
    of `role` together (token-weighted loss), on the sets both were scored on; None without such sets."""
    before = {r["set"]: r for r in rows if r["model"] == base and r["role"] == role}
    after = {r["set"]: r for r in rows if r["model"] == model and r["set"] in before}
    if not after or not sum(r["tokens"] for r in after.values()):
        return None

    def loss(found: list[dict[str, Any]]) -> float:
        return sum(r["loss"] * r["tokens"] for r in found) / sum(r["tokens"] for r in found)

    return math.expm1(loss(list(after.values())) - loss([before[s] for s in after]))


def sweep_summary(sweep: Sweep, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's `interpolation` block: per point the domain and general perplexity changes against
    the base, whether the general change is within the budget, and the best point: the largest domain
    gain among those within it."""
    points = []
    for scale in sweep.scales:
        domain = role_change(rows, sweep.base.name, point_name(scale), "domain")
        general = role_change(rows, sweep.base.name, point_name(scale), "general")
        points.append(
            {
                "scale": scale,
                "model": point_name(scale),
                "domain_change": domain,
                "general_change": general,
                "within_budget": None if general is None else general <= sweep.budget,
            }
        )
    best, why = _best(points, sweep.budget)
    return {
        "model": sweep.adapted.name,
        "mode": sweep.mode,
        "budget": sweep.budget,
        "budget_from": sweep.budget_from,
        "measure": "perplexity change against the base over every set of the role together, as a fraction",
        "points": points,
        "best": best,
        "why": why,
    }


def _best(points: list[dict[str, Any]], budget: float) -> tuple[dict[str, Any] | None, str]:
    if all(p["general_change"] is None for p in points):
        return None, "no general set: the forgetting budget cannot be checked"
    if all(p["domain_change"] is None for p in points):
        return None, "no domain set: there is no gain to choose by"
    within = [p for p in points if p["within_budget"]]
    if not within:
        least = min(points, key=lambda p: p["general_change"])
        return None, (
            f"no point within the budget ({budget:+.2%}); the least general change is "
            f"{least['general_change']:+.2%} at scale {least['scale']:g}"
        )
    best = min(within, key=lambda p: p["domain_change"])
    return best, f"the largest domain gain with general perplexity within {budget:+.2%} of the base"


def describe_best(block: dict[str, Any]) -> str:
    """One line on the best point, for the console and the report."""
    best = block.get("best")
    if best is None:
        return f"interpolation: no best point ({block['why']})"
    return (
        f"interpolation: best scale {best['scale']:g} (domain perplexity {best['domain_change']:+.2%}, "
        f"general {best['general_change']:+.2%}; budget {block['budget']:+.2%} from {block['budget_from']})"
    )


def print_sweep(block: dict[str, Any]) -> None:
    """The sweep's points and its best one on the terminal (stderr, as cptkit eval's summary)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="cptkit eval: interpolation between base (0) and adapted (1)")
    for header in ("scale", "domain ppl change", "general ppl change", "within budget"):
        table.add_column(header, justify="right")
    for p in block["points"]:
        table.add_row(
            f"{p['scale']:g}",
            _percent(p["domain_change"]),
            _percent(p["general_change"]),
            {True: "yes", False: "no", None: "-"}[p["within_budget"]],
        )
    console = Console(stderr=True)
    console.print(table)
    console.print(describe_best(block))


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2%}"

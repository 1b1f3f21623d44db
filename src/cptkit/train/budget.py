"""The forgetting budget: how much the general held-out perplexity may rise over the base model's while
a run trains (`train.forgetting_budget`, a fraction: 0.01 is 1%), the best checkpoint that stays within
it, and an optional stop at the first crossing.

The base's numbers are the held-out evaluation at step 0, before the first update (the base model in
every mode: for LoRA the adapters start at zero); a resumed run reads them back from metrics.jsonl
rather than scoring the base again. Every later evaluation gives:
- the general change: exp(loss now - loss at step 0) - 1 with the loss token-weighted over all general
  sets together. One number for one budget; pooling by tokens weighs each set by what it holds, so a
  small set's noise does not decide alone (a per-set budget would trip on the noisiest set first);
- its 95% interval (a paired bootstrap over the documents, `cptkit.eval.bootstrap`), logged beside it;
- the domain gain, 1 - exp(loss now - loss at step 0) over the domain sets together.
An evaluation is within the budget when its general change is at most the budget (the measured change,
not the interval: a budget is a limit the user sets, and the interval says how sure the reading is).
The best checkpoint is the one saved at an evaluation within the budget with the largest domain gain
(the latest one when there is no domain set); rotation by `save_total_limit` keeps it (`keep`).
The numbers come from the held-out sample training scores (`train.eval_max_tokens` per set), not the
full sets `cptkit eval` scores.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.eval.bootstrap import pooled_change_interval

log = logging.getLogger(__name__)

MAX_BUDGET = 10.0  # a 1000% rise is no budget; a value this large is a percent given as a fraction


def budget_problems(
    budget: float | None, stop: bool, path: str, save_strategy: Any = "steps"
) -> list[tuple[str, str]]:
    """The config problems of `train.forgetting_budget` and `train.stop_at_forgetting_budget`
    (`save_strategy`: `train.hf.save_strategy`, steps when not set)."""
    if budget is None:
        if stop:
            return [(f"{path}.stop_at_forgetting_budget", "true needs train.forgetting_budget (e.g. 0.01)")]
        return []
    if not (0 < budget < MAX_BUDGET):  # NaN fails too
        return [
            (
                f"{path}.forgetting_budget",
                f"{budget}: must be a fraction above 0 and below {MAX_BUDGET:g} (0.01: general perplexity "
                "may rise at most 1% over the base's)",
            )
        ]
    # the held-out evaluation that judges a checkpoint runs when a step is about to save
    # (HeldoutEvalCallback.on_step_end); a save decided elsewhere (epoch: at the epoch's end) is never judged
    strategy = str(getattr(save_strategy, "value", save_strategy))
    if strategy != "steps":
        return [
            (
                f"{path}.hf.save_strategy",
                f"{strategy}: a forgetting budget judges the checkpoints saved every save_steps; use "
                "save_strategy: steps (the default), or remove train.forgetting_budget",
            )
        ]
    return []


def check_budget_sets(budget: float | None, heldout: dict[str, Any], dataset: Path) -> None:
    """A forgetting budget needs a general held-out set to measure forgetting on (`heldout`: the prepared
    manifest's held-out sets, name -> info with `role` and `documents`)."""
    if budget is None:
        return
    general = [name for name, info in heldout.items() if info.role == "general" and info.documents]
    if not general:
        raise CptkitError(
            f"train.forgetting_budget: {dataset} has no general held-out set to measure forgetting on; add a "
            "general source with held-out documents (data.sources[*].role: general, data.heldout_fraction "
            "above 0) and prepare again, or remove train.forgetting_budget"
        )


@dataclass(frozen=True)
class BudgetCheck:
    """One held-out evaluation judged against the budget (changes as fractions of the base's perplexity)."""

    step: int
    general_change: float
    general_change_interval: list[float] | None
    domain_gain: float | None
    within: bool


def _pooled_loss(results: Sequence[dict[str, Any]]) -> float:
    tokens = sum(r["tokens"] for r in results)
    return sum(r["loss"] * r["tokens"] for r in results) / tokens if tokens else float("nan")


def _of_role(results: Sequence[dict[str, Any]], role: str, names: set[str] | None = None) -> list[dict]:
    return [r for r in results if r["role"] == role and (names is None or r["set"] in names)]


def judge(
    step: int, base: Sequence[dict[str, Any]], now: Sequence[dict[str, Any]], budget: float
) -> BudgetCheck | None:
    """`now`'s held-out results (one dict per set: set, role, loss, tokens, and doc_nats/doc_tokens for the
    interval) against the base's at step 0; None when no general set was scored both times."""
    general, domain = ({r["set"] for r in _of_role(now, role)} for role in ("general", "domain"))
    base_general, now_general = _of_role(base, "general", general), _of_role(now, "general")
    now_general = [r for r in now_general if r["set"] in {b["set"] for b in base_general}]
    if not now_general:
        return None
    change = math.expm1(_pooled_loss(now_general) - _pooled_loss(base_general))
    interval = None
    if all("doc_nats" in r for r in (*base_general, *now_general)):
        found = pooled_change_interval(sorted(base_general, key=_set), sorted(now_general, key=_set))
        interval = found.as_list() if found else None
    base_domain = _of_role(base, "domain", domain)
    now_domain = [r for r in _of_role(now, "domain") if r["set"] in {b["set"] for b in base_domain}]
    gain = -math.expm1(_pooled_loss(now_domain) - _pooled_loss(base_domain)) if now_domain else None
    return BudgetCheck(step, change, interval, gain, change <= budget)


def _set(result: dict[str, Any]) -> str:
    return result["set"]


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.2f}%"


def _interval(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f" (95% interval [{_percent(interval[0])}, {_percent(interval[1])}])"


class ForgettingBudget:
    """The budget's state during a run: the base's numbers, every check, the first crossing, the best
    checkpoint within the budget. Fed by the held-out evaluation callback (`observe`); `restore` reads a
    resumed run's earlier evaluations back from metrics.jsonl."""

    def __init__(self, budget: float, stop: bool = False, max_tokens: int | None = None):
        self.budget = budget
        self.stop = stop
        self.max_tokens = max_tokens
        self.base: list[dict[str, Any]] | None = None
        self.checks: list[BudgetCheck] = []
        self.crossed_at: int | None = None
        self.stopped_at: int | None = None  # the step at which the budget asked the trainer to stop

    def observe(
        self, step: int, results: Sequence[dict[str, Any]], quiet: bool = False
    ) -> BudgetCheck | None:
        """Record one evaluation (every set's result at `step`); step 0 is the base. Returns the check
        (None for the base, or when no general set was scored). A crossing is logged as a WARNING."""
        if step == 0:
            self.base = list(results)
            if not quiet:
                self._announce()
            return None
        if self.base is None:
            return None
        check = judge(step, self.base, results, self.budget)
        if check is None:
            return None
        self.checks.append(check)
        if not check.within and self.crossed_at is None:
            self.crossed_at = step
        if not quiet:
            self._log(check)
        return check

    def _announce(self) -> None:
        """What the budget is checked on: the held-out sample training scores, not the full sets."""
        sample = "the held-out sets"
        if self.max_tokens:
            sample = f"the whole held-out documents that fit in {self.max_tokens} tokens per set (train.eval_max_tokens)"
        log.info(
            "forgetting budget %s: general perplexity checked against the base's at every held-out evaluation "
            "and at every save step, on %s, not the full sets cptkit eval scores",
            _percent(self.budget).lstrip("+"),
            sample,
        )

    def _log(self, check: BudgetCheck) -> None:
        what = (
            f"step {check.step}: general perplexity {_percent(check.general_change)} over the base"
            f"{_interval(check.general_change_interval)}, domain perplexity gain {_percent(check.domain_gain)}"
        )
        budget = _percent(self.budget).lstrip("+")
        if check.within:
            log.info("%s: within the forgetting budget of %s", what, budget)
        else:
            log.warning("%s: crosses the forgetting budget of %s", what, budget)

    def should_stop(self, check: BudgetCheck | None) -> bool:
        """Whether training stops after `check` (`train.stop_at_forgetting_budget` and a crossing); asked
        only where a stop ends training early (not at the final evaluation, nor at max_steps)."""
        if not (self.stop and check is not None and not check.within):
            return False
        self.stopped_at = check.step
        best = self.best()
        log.warning(
            "stopping at step %d: the forgetting budget is crossed (train.stop_at_forgetting_budget); %s",
            check.step,
            f"the best checkpoint within it is from step {best.step}"
            if best
            else "no checkpoint is within it",
        )
        return True

    def restore(self, metrics: Path, through_step: int) -> None:
        """Read back the evaluations of a resumed run (metrics.jsonl, up to `through_step`), the base's
        at step 0 among them, so the base is not scored again and the best checkpoint is still known."""
        by_step: dict[int, list[dict[str, Any]]] = {}
        lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("type") == "eval" and record.get("step", -1) <= through_step:
                by_step.setdefault(record["step"], []).append(record)
        if 0 not in by_step:
            log.warning(
                "%s holds no step-0 evaluation of the base: the forgetting budget is not checked in this run",
                metrics,
            )
            return
        for step in sorted(by_step):
            self.observe(step, by_step[step], quiet=True)
        log.info(
            "forgetting budget: the base's numbers (step 0) and %d later checks read back from %s",
            len(self.checks),
            metrics,
        )
        self._announce()

    def best(self, saved: set[int] | None = None) -> BudgetCheck | None:
        """The check within the budget with the largest domain gain (the latest when there is no domain
        set), among the steps in `saved` (the steps with a complete checkpoint) when given."""
        within = [c for c in self.checks if c.within and (saved is None or c.step in saved)]
        if not within:
            return None
        return max(within, key=lambda c: (c.domain_gain if c.domain_gain is not None else 0.0, c.step))

    def best_saved(self, output_dir: str | Path) -> tuple[Path, BudgetCheck] | None:
        """The best checkpoint within the budget among the complete ones in `output_dir`, and its check."""
        from cptkit.train.checkpoints import checkpoint_step, scan_checkpoints

        complete = {checkpoint_step(c): c for c in scan_checkpoints(output_dir).complete}
        best = self.best(set(complete))
        return (complete[best.step], best) if best else None

    def keep(self, output_dir: str | Path) -> Path | None:
        """The checkpoint rotation must not delete (CheckpointCallback's `keep` hook): the best saved one."""
        found = self.best_saved(output_dir)
        return found[0] if found else None

    def record(self, output_dir: str | Path) -> dict[str, Any]:
        """run_meta.json's `forgetting_budget`: the budget, the best checkpoint within it and its numbers,
        the last evaluation's reading and the first step that crossed it."""
        checkpoint, best = self.best_saved(output_dir) or (None, None)
        last = self.checks[-1] if self.checks else None
        return {
            "budget": self.budget,
            "best_checkpoint": str(checkpoint) if checkpoint else None,
            "best_step": best.step if best else None,
            "domain_gain": best.domain_gain if best else None,
            "general_change": best.general_change if best else None,
            "general_change_interval": best.general_change_interval if best else None,
            "within_budget_at_end": last.within if last else None,
            "crossed_at_step": self.crossed_at,
            "last": asdict(last) if last else None,
            "stopped": self.stopped_at is not None,
            "max_tokens_per_set": self.max_tokens,
        }


def budget_text(record: dict[str, Any]) -> str:
    """Whether a run stayed within its forgetting budget (run_meta.json's record; a crossing it came back
    from is said), in one line, e.g.
    `stayed within its forgetting budget of 1.00%: general perplexity +0.41% at step 60, 95% interval
    [-0.22%, +1.05%]; best checkpoint within it: .../checkpoint-60 (step 60, domain gain +18.20%)`."""
    budget = _percent(record["budget"]).lstrip("+")
    last = record.get("last")
    within = record.get("within_budget_at_end")
    if within is None:
        return f"not checked against its forgetting budget of {budget}: no evaluation after the base"
    if within and record.get("crossed_at_step") is not None:
        text = (
            f"crossed its forgetting budget of {budget} at step {record['crossed_at_step']}, "
            "within again at the end"
        )
    elif within:
        text = f"stayed within its forgetting budget of {budget}"
    else:
        stopped = ", and stopped there" if record.get("stopped") else ""
        text = f"crossed its forgetting budget of {budget} at step {record.get('crossed_at_step')}{stopped}"
    interval = last.get("general_change_interval")
    text += f": general perplexity {_percent(last['general_change'])} at step {last['step']}"
    if interval is not None:
        text += f", 95% interval [{_percent(interval[0])}, {_percent(interval[1])}]"
    if record.get("best_checkpoint"):
        return text + (
            f"; best checkpoint within it: {record['best_checkpoint']} (step {record['best_step']}, "
            f"domain gain {_percent(record.get('domain_gain'))})"
        )
    return text + "; no saved checkpoint is within it"

"""`cptkit run CONFIG.yaml`: every stage the config asks for, in order: prepare -> train -> merge ->
eval -> sft -> eval of the SFT model -> report.

A stage that finished with the same config and inputs is skipped and says so (stamps in
RUN_DIR/.cptkit/stages.json, see `cptkit.pipeline.stamps`); a failed stage stops the run with its
error and keeps what finished. `--from STAGE` reruns from a stage on (earlier ones must be done),
`--only STAGE` reruns one stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.errors import CptkitError
from cptkit.pipeline.runner import plan, run_stage
from cptkit.pipeline.stamps import StageRecords


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args), from_stage=args.from_stage, only_stage=args.only_stage)
    return 0


def run(cfg: Config, from_stage: str | None = None, only_stage: str | None = None) -> dict[str, Any]:
    """Run the configured stages; returns {"stages": [one row per stage], "results": {stage: result}}."""
    from cptkit.eval.tasks import check_tasks
    from cptkit.train.optional import refusals_for_missing_packages

    console = _console()
    wanted = plan(cfg, from_stage, only_stage)
    missing = refusals_for_missing_packages(cfg) if any(s.name in ("train", "sft") for s, _ in wanted) else []
    if missing:  # found before prepare spends its time, not when train starts
        raise CptkitError("; ".join(missing))
    if any(s.name in ("train", "eval", "sft-eval") for s, _ in wanted):
        check_tasks(cfg.eval.tasks if cfg.eval else [])  # a task not found offline, before prepare
    records = StageRecords(cfg.run_dir or ".")
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for number, (stage, forced) in enumerate(wanted, start=1):
        head = f"[{number}/{len(wanted)}] {stage.name:<8}"
        outcome = run_stage(stage, cfg, records, forced, console, head)
        rows.append(outcome.row)
        if outcome.error is not None:
            _summary(console, rows, cfg)
            raise outcome.error
        if outcome.row["status"] == "done":
            results[stage.name] = outcome.result
    _summary(console, rows, cfg)
    return {"stages": rows, "results": results}


def _summary(console: Any, rows: list[dict[str, Any]], cfg: Config) -> None:
    from rich.table import Table

    table = Table(title="cptkit run")
    for column in ("stage", "status", "time", "result"):
        table.add_column(column, justify="right" if column == "time" else "left", overflow="fold")
    colour = {"done": "green", "skipped": "dim", "failed": "red"}
    for row in rows:
        status = f"[{colour[row['status']]}]{row['status']}[/{colour[row['status']]}]"
        table.add_row(row["stage"], status, f"{row['seconds']:.0f} s", row["detail"])
    total = sum(r["seconds"] for r in rows)
    table.add_row("total", "", f"{total:.0f} s", str(Path(cfg.run_dir)) if cfg.run_dir else "")
    console.print(table)
    for line in downstream_lines(cfg):
        console.print(line)


def downstream_lines(cfg: Config) -> list[str]:
    """A line per downstream task and metric of the evaluations this run has written (eval, sft-eval)."""
    from cptkit.eval.task_results import task_summary_lines
    from cptkit.paths import resolve

    paths, lines = resolve(cfg), []
    for stage, results in (("eval", paths.eval_results), ("sft-eval", paths.sft_eval_results)):
        if results is not None and results.is_file():
            record = json.loads(results.read_text(encoding="utf-8"))
            lines += [f"{stage} task {line}" for line in task_summary_lines(record)]
    return lines


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)

"""`cptkit run CONFIG.yaml`: every stage the config asks for, in order: prepare -> train -> merge ->
eval -> sft -> eval of the SFT model -> report.

A stage that finished with the same config and inputs is skipped and says so (stamps in
RUN_DIR/.cptkit/stages.json, see `cptkit.pipeline.stamps`); a failed stage stops the run with its
error and keeps what finished. `--from STAGE` reruns from a stage on (earlier ones must be done),
`--only STAGE` reruns one stage.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.errors import CptkitError
from cptkit.pipeline.stages import NAMES, STAGES, Stage
from cptkit.pipeline.stamps import StageRecords, marker_hash, stamp


def main(args) -> int:
    from cptkit.commands import load_for

    run(load_for(args), from_stage=args.from_stage, only_stage=args.only_stage)
    return 0


def run(cfg: Config, from_stage: str | None = None, only_stage: str | None = None) -> dict[str, Any]:
    """Run the configured stages; returns {"stages": [one row per stage], "results": {stage: result}}."""
    console = _console()
    wanted = plan(cfg, from_stage, only_stage)
    records = StageRecords(cfg.run_dir or ".")
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for number, (stage, forced) in enumerate(wanted, start=1):
        head = f"[{number}/{len(wanted)}] {stage.name:<8}"
        stage_stamp = stamp(stage.sections(cfg), stage.inputs(cfg))
        if not forced and records.is_current(stage.name, stage_stamp, stage.marker(cfg)):
            detail = records.records[stage.name].get("detail", "")
            console.print(f"{head} [dim]skipped: done with the same config and inputs[/dim] {detail}")
            rows.append({"stage": stage.name, "status": "skipped", "seconds": 0.0, "detail": detail})
            continue
        if stage.resumes_from and records.holds_stale_output(stage.name, stage_stamp, stage.marker(cfg)):
            folder = stage.resumes_from(cfg)
            if folder.exists():
                console.print(
                    f"{head} [yellow]settings changed since its last run: starting over in {folder}[/yellow]"
                )
                shutil.rmtree(folder)
        console.print(f"{head} running ...")
        start = time.perf_counter()
        try:
            result = stage.run(cfg)
        except Exception as e:  # any failure is recorded and shown in the summary, then raised as it was
            seconds = time.perf_counter() - start
            records.record(stage.name, status="failed", stamp=stage_stamp, seconds=seconds, error=str(e))
            console.print(f"{head} [red]failed after {seconds:.0f} s[/red]: {e}")
            rows.append({"stage": stage.name, "status": "failed", "seconds": seconds, "detail": str(e)})
            _summary(console, rows, cfg)
            raise
        seconds, detail = time.perf_counter() - start, stage.describe(result or {})
        records.record(
            stage.name,
            status="complete",
            stamp=stage_stamp,
            seconds=seconds,
            detail=detail,
            marker=str(stage.marker(cfg)),
            marker_hash=marker_hash(stage.marker(cfg)),
        )
        console.print(f"{head} [green]done[/green] in {seconds:.0f} s: {detail}")
        rows.append({"stage": stage.name, "status": "done", "seconds": seconds, "detail": detail})
        results[stage.name] = result
    _summary(console, rows, cfg)
    return {"stages": rows, "results": results}


def plan(cfg: Config, from_stage: str | None, only_stage: str | None) -> list[tuple[Stage, bool]]:
    """The stages to run and whether each is forced (rerun even when current)."""
    for flag, name in (("--from", from_stage), ("--only", only_stage)):
        if name is not None and name not in NAMES:
            raise CptkitError(f"{flag} {name}: no such stage; stages are {', '.join(NAMES)}")
    if from_stage and only_stage:
        raise CptkitError("--from and --only together: choose one")
    configured = [s for s in STAGES if s.why_not(cfg) is None]
    target = only_stage or from_stage
    if target and target not in [s.name for s in configured]:
        reason = next(s.why_not(cfg) for s in STAGES if s.name == target)
        raise CptkitError(f"stage {target} is not configured in this file ({reason})")
    if only_stage:
        return [(s, True) for s in configured if s.name == only_stage]
    if from_stage:
        start = [s.name for s in configured].index(from_stage)
        for earlier in configured[:start]:
            if not earlier.marker(cfg).is_file():
                raise CptkitError(
                    f"--from {from_stage}: the earlier stage {earlier.name} has not finished "
                    f"({earlier.marker(cfg)} is missing); run without --from, or --from {earlier.name}"
                )
        return [(s, True) for s in configured[start:]]
    if not configured:
        raise CptkitError("nothing to run: the config has none of the sections data, train, merge, eval, sft")
    return [(s, False) for s in configured]


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


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)

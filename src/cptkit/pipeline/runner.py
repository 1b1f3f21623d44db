"""Running the stage table: which stages a `cptkit run` takes on, and one stage run, skipped, or recorded
as failed, with the one-line row the run's summary shows for it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.errors import CptkitError
from cptkit.pipeline.stages import NAMES, STAGES, Stage
from cptkit.pipeline.stamps import StageRecords, marker_hash, stamp


@dataclass
class Outcome:
    """What one stage did: its summary row, its result when it ran, the error when it failed."""

    row: dict[str, Any]
    result: Any = None
    error: BaseException | None = None


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


def run_stage(
    stage: Stage, cfg: Config, records: StageRecords, forced: bool, console: Any, head: str
) -> Outcome:
    """Skip the stage when it finished with the same config and inputs, else run it and record how it went."""
    stage_stamp = stamp(stage.sections(cfg), stage.inputs(cfg))
    marker = stage.marker(cfg)
    if not forced and records.is_current(stage.name, stage_stamp, marker):
        detail = records.records[stage.name].get("detail", "")
        console.print(f"{head} [dim]skipped: done with the same config and inputs[/dim] {detail}")
        return Outcome({"stage": stage.name, "status": "skipped", "seconds": 0.0, "detail": detail})
    if stage.resumes_from and records.holds_stale_output(stage.name, stage_stamp, marker):
        _start_over(stage.resumes_from(cfg), records.made_by_older_stamps(stage.name), console, head)
    console.print(f"{head} running ...")
    start = time.perf_counter()
    try:
        result = stage.run(cfg)
    except Exception as e:  # any failure is recorded and shown in the summary; the caller raises it as it was
        seconds = time.perf_counter() - start
        records.record(stage.name, status="failed", stamp=stage_stamp, seconds=seconds, error=str(e))
        console.print(f"{head} [red]failed after {seconds:.0f} s[/red]: {e}")
        return Outcome(
            {"stage": stage.name, "status": "failed", "seconds": seconds, "detail": str(e)}, error=e
        )
    seconds, detail = time.perf_counter() - start, stage.describe(result or {})
    records.record(
        stage.name,
        status="complete",
        stamp=stage_stamp,
        seconds=seconds,
        detail=detail,
        marker=str(marker),
        marker_hash=marker_hash(marker),
    )
    console.print(f"{head} [green]done[/green] in {seconds:.0f} s: {detail}")
    return Outcome({"stage": stage.name, "status": "done", "seconds": seconds, "detail": detail}, result)


def _start_over(folder: Path, older_stamps: bool, console: Any, head: str) -> None:
    """Empty a folder this pipeline trained into for other settings, so the stage does not resume it
    (only what a training run writes is removed, never under a run still working there). A record from
    an earlier cptkit cannot tell changed settings from a changed way of stamping them: its folder is
    kept, moved aside, rather than emptied."""
    from cptkit.locks import folder_lock
    from cptkit.train.checks import remove_run

    if not folder.exists():
        return
    aside = folder.with_name(f"{folder.name}.previous")
    if older_stamps and aside.exists():
        raise CptkitError(
            f"{folder} was made by an earlier cptkit and is to be trained again, but {aside} is in the way: "
            "move or remove it, then rerun"
        )
    with folder_lock(folder, "cptkit run"):
        if not older_stamps:
            console.print(
                f"{head} [yellow]settings changed since its last run: starting over in {folder}[/yellow]"
            )
            remove_run(folder)
            return
        folder.rename(aside)
    console.print(
        f"{head} [yellow]{folder} was made by an earlier cptkit, whose records cannot tell whether its "
        f"settings changed: kept as {aside}, training again[/yellow]"
    )

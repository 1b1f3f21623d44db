"""datatrove's executors behind `data.executor`: `local` (worker processes on this machine, or this
machine's share of several), `slurm` (a job array) and `ray` (a Ray cluster), one interface for all.

Each of the plan's shard tasks is one datatrove task: rank r tokenizes the plan's r-th shard (sources in
config order, shards in order), so a rank means the same shard on every machine and in every run.
cptkit's own completion marker is the shard's stats file; datatrove's markers (`completions/<rank>` in
its logging folder) are set from it before and after every run, so datatrove skips exactly the shards
that are done and never one whose store file was removed. Results come back through the store on
disk (stats files, failure records), which every machine must see at the same path.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from cptkit.config.data import ExecutorConfig
from cptkit.data.executors import ShareDone, failure_error, failure_path, read_failure, run_shard
from cptkit.data.readers import Progress
from cptkit.data.shards import ShardStats, ShardTask, cached_stats
from cptkit.data.workers import usable_cores
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

POLL_S = 10.0  # how often prepare looks at the store while a Slurm job runs
ENGINE_DIR = "executor"  # inside the prepared folder: the engines' logs and markers, one folder per type
_SET_BY_CPTKIT = {"pipeline", "tasks", "logging_dir", "workers", "local_tasks", "local_rank_offset"}


class _Tasks:
    """The shard tasks of a run by rank, carried by the pipeline step. Shown as a count in datatrove's
    logs and executor.json, and shared (not copied) when datatrove copies its pipeline per task."""

    def __init__(self, by_rank: dict[int, ShardTask]):
        self.by_rank = by_rank

    def __str__(self) -> str:
        return f"{len(self.by_rank)} shard task(s)"

    def __deepcopy__(self, memo: dict) -> _Tasks:
        return self


class TokenizeShards(PipelineStep):
    """The one step of cptkit's datatrove pipeline: rank r tokenizes its shard, when this run has it."""

    name = "cptkit: tokenize shards"
    type = "🔢 - TOKENIZER"

    def __init__(self, by_rank: dict[int, ShardTask], retries: int):
        super().__init__()
        self.tasks = _Tasks(by_rank)
        self.retries = retries

    def run(self, data: Any = None, rank: int = 0, world_size: int = 1) -> None:
        task = self.tasks.by_rank.get(rank)
        if task is None:  # done before, or not asked for in this run
            return
        stats = run_shard(task, self.retries)  # a failure is recorded beside the shard, not raised: the
        if stats is not None:  # other ranks of a local pool go on, and prepare names it
            self.stat_update("documents", value=stats.kept)
            self.stat_update("tokens", value=stats.tokens)


@dataclass
class Engine:
    """Runs shard tasks through the datatrove executor `config.type` names; `world` is every task of
    the plan in order (ranks), or empty for the tasks of each call."""

    config: ExecutorConfig
    out: Path
    world: list[ShardTask]

    @property
    def logging_dir(self) -> Path:
        return Path(self.config.logging_dir or self.out / ENGINE_DIR / self.config.type)

    def __call__(self, tasks: Sequence[ShardTask], progress: Progress) -> Iterator[ShardStats]:
        world = self.world or list(tasks)
        rank_of = {_identity(t): r for r, t in enumerate(world)}
        unknown = [t.shard.key for t in tasks if _identity(t) not in rank_of]
        if unknown:
            raise ValueError(f"tasks outside the plan's world: {unknown[:3]}")
        share = self._share(len(world))
        mine = {rank_of[_identity(t)]: t for t in tasks if rank_of[_identity(t)] in share}
        cores = self._cores_per_task(len(mine))
        mine = {r: dataclasses.replace(t, num_proc=cores) for r, t in mine.items()}
        _set_markers(self.logging_dir, share, done=lambda r: r not in mine)
        for t in mine.values():
            failure_path(t.shard, t.cache_dir).unlink(missing_ok=True)
        if mine:
            log.info(
                "%s: %d of the plan's %d shard task(s) to run here (ranks %d to %d are this machine's); "
                "logs in %s",
                self.config.type,
                len(mine),
                len(world),
                share.start,
                share.stop - 1,
                self.logging_dir,
            )
            self._run(self._build(TokenizeShards(mine, self.config.retries), len(world), len(mine)), mine)
        _set_markers(self.logging_dir, share, done=lambda r: _done(world[r]))  # they agree with the store
        # a failure record is this run's (they were removed before it): under --force an old stats file
        # may still be there for a shard that failed now
        failed = [t for t in mine.values() if failure_path(t.shard, t.cache_dir).is_file() or not _done(t)]
        if failed:
            raise failure_error([_failure_of(t) for t in failed], self.logging_dir / "logs")
        results = [cached_stats(t.shard, t.cache_dir) for t in tasks]
        if any(s is None for s in results):
            raise ShareDone(self._share_message(world, share))
        for task, stats in zip(tasks, results, strict=True):
            progress(task.shard.bytes)
            yield stats

    def _share(self, total: int) -> range:
        """The ranks this machine runs: all, or local_tasks of them from local_rank_offset."""
        c = self.config
        if c.type != "local" or (c.local_tasks is None and not c.local_rank_offset):
            return range(total)
        count = c.local_tasks if c.local_tasks is not None else total - c.local_rank_offset
        if c.local_rank_offset + count > total or count < 1:
            half = -(-total // 2)
            raise CptkitError(
                f"data.executor: local_rank_offset {c.local_rank_offset} + local_tasks {count} goes past the "
                f"{total} shard task(s) of this plan (ranks 0 to {total - 1}); split the ranks between the "
                f"machines, e.g. for two: local_tasks {half} with local_rank_offset 0 on one, local_tasks "
                f"{total - half} with local_rank_offset {half} on the other"
            )
        return range(c.local_rank_offset, c.local_rank_offset + count)

    def _share_message(self, world: list[ShardTask], share: range) -> str:
        done = sum(_done(t) for t in world)
        return (
            f"this machine's {len(share)} shard(s) are done (ranks {share.start} to {share.stop - 1}); "
            f"{done} of {len(world)} done; run cptkit prepare again on one machine when all have finished, "
            "it assembles"
        )

    def _cores_per_task(self, tasks: int) -> int:
        if self.config.type == "local":  # the machine's cores split between the tasks that run at once
            return max(1, usable_cores() // self._local_workers(tasks))
        return int(self.config.options.get("cpus_per_task", 1))  # what Slurm or Ray gives each task

    def _local_workers(self, tasks: int) -> int:
        return max(1, min(self.config.workers or usable_cores(), tasks))

    def _build(self, step: TokenizeShards, total: int, runnable: int) -> Any:
        c = self.config
        clash = sorted(_SET_BY_CPTKIT & set(c.options))
        if clash:
            raise CptkitError(
                f"data.executor.options: {', '.join(clash)} are set by cptkit (use data.executor.workers, "
                "local_tasks, local_rank_offset, logging_dir)"
            )
        args: dict[str, Any] = {"pipeline": [step], "tasks": total, "logging_dir": str(self.logging_dir)}
        if c.type == "local":
            from datatrove.executor import LocalPipelineExecutor as cls

            share = self._share(total)
            args |= {
                "workers": self._local_workers(runnable),
                "local_tasks": len(share),
                "local_rank_offset": share.start,
            }
        elif c.type == "slurm":
            from datatrove.executor import SlurmPipelineExecutor as cls

            missing = [k for k in ("partition", "time") if k not in c.options]
            if missing:
                raise CptkitError(
                    f"data.executor.options: type slurm needs {' and '.join(missing)} (e.g. options: "
                    "{partition: cpu, time: '04:00:00', cpus_per_task: 8, venv_path: .venv/bin/activate})"
                )
            args |= {"workers": c.workers or -1, "job_name": "cptkit-prepare"}
        else:
            from datatrove.executor.ray import RayPipelineExecutor as cls

            args |= {"workers": c.workers or -1}
        accepted = set(inspect.signature(cls).parameters)
        unknown = sorted(set(c.options) - accepted)
        if unknown:
            raise CptkitError(
                f"data.executor.options: {', '.join(unknown)} not known to datatrove's {cls.__name__} "
                f"(it takes {', '.join(sorted(accepted - _SET_BY_CPTKIT - {'depends'}))})"
            )
        return cls(**(args | c.options))

    def _run(self, engine: Any, mine: dict[int, ShardTask]) -> None:
        if self.config.type == "slurm":
            if "SLURM_ARRAY_TASK_ID" in os.environ:
                raise CptkitError(
                    "data.executor.type: slurm submits a job array: run cptkit prepare on a login node, "
                    "not inside a Slurm array task"
                )
            engine.run()
            if engine.job_id not in (None, -1):
                wait_for_slurm(str(engine.job_id), list(mine.values()))
            return
        if self.config.type == "ray":
            import ray

            if not ray.is_initialized():
                ray.init()  # RAY_ADDRESS names a running cluster; without it, one on this machine
        engine.run()


def wait_for_slurm(job_id: str, tasks: list[ShardTask]) -> None:
    """Poll the store until every task is done or failed, or the job has left the queue."""
    log.info(
        "submitted Slurm job %s for %d shard(s); waiting for it (if this stops, the job goes on: run "
        "cptkit prepare again to pick up its shards)",
        job_id,
        len(tasks),
    )
    last = None
    while True:
        done = sum(_done(t) for t in tasks)
        failed = sum(failure_path(t.shard, t.cache_dir).is_file() for t in tasks)
        line = f"Slurm job {job_id}: {done} of {len(tasks)} shard(s) done, {failed} failed"
        if line != last:
            log.info(line)
            last = line
        if done + failed == len(tasks):
            return
        if not slurm_job_queued(job_id):
            if sum(_done(t) for t in tasks) + failed < len(tasks):  # a last look: it may just have ended
                log.warning("Slurm job %s left the queue with shards unfinished", job_id)
            return
        time.sleep(POLL_S)


def slurm_job_queued(job_id: str) -> bool:
    """Whether Slurm still lists the job (pending or running)."""
    try:
        found = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("squeue failed (%s); taking job %s as still queued", e, job_id)
        return True
    return found.returncode == 0 and bool(found.stdout.strip())


def _identity(task: ShardTask) -> tuple[str, str]:
    return task.shard.source, task.shard.key


def _done(task: ShardTask) -> bool:
    return cached_stats(task.shard, task.cache_dir) is not None


def _failure_of(task: ShardTask) -> dict[str, Any]:
    return read_failure(task.shard, task.cache_dir) or {
        "source": task.shard.source,
        "shard": task.shard.index,
        "files": [str(f) for f in task.shard.files],
        "error": "the worker ended without finishing it or saying why (killed, out of memory, a time limit?)",
    }


def _set_markers(folder: Path, ranks: range, done: Any) -> None:
    """datatrove's completion markers of `ranks`: present exactly where `done(rank)`."""
    markers = folder / "completions"
    markers.mkdir(parents=True, exist_ok=True)
    for rank in ranks:
        marker = markers / f"{rank:05d}"
        if done(rank):
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

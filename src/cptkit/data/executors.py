"""What runs prepare's shard tasks, chosen by `data.executor`: `here` (this process, the default: nothing
to set up) or one of datatrove's engines (`local` worker processes, a `slurm` job array, a `ray`
cluster; `cptkit.data.engines`).

Every executor keeps the same promises. A shard whose stats file is written is done and never redone.
A shard that fails (an exception while tokenizing it) is tried `data.executor.retries` more times; one
that still fails leaves a failure record beside its store file (`<key>.failed.json`: source, files,
error, host), which is how engines running on other machines report back, and prepare stops with one
error naming every failed shard. A worker killed mid-shard leaves only a temporary (or an entry without
its stats file), so the next prepare tokenizes that shard again.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import socket
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.config.data import DataConfig, ExecutorConfig
from cptkit.data import shards
from cptkit.data.readers import Progress
from cptkit.data.shards import Shard, ShardStats, ShardTask
from cptkit.disk import is_disk_full
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

Executor = Callable[[Sequence[ShardTask], Progress], Iterable[ShardStats]]

SCALE_EXTRA = 'pip install "cptkit[scale]"'


class ShareDone(CptkitError):
    """This machine ran its share of the shards (`data.executor.local_tasks`) while others are not done
    yet: nothing to assemble. `cptkit prepare` prints the message and exits 0; a pipeline stops there."""


def require_engine(cfg: ExecutorConfig, path: str = "data.executor") -> None:
    """Refuse, before any work, an executor whose packages are not installed."""
    if cfg.type == "here":
        return
    if importlib.util.find_spec("datatrove") is None:
        raise CptkitError(
            f"{path}.type: {cfg.type} runs on datatrove, which is not installed ({SCALE_EXTRA})"
        )
    if cfg.type == "ray" and importlib.util.find_spec("ray") is None:
        raise CptkitError(f"{path}.type: ray needs ray, which is not installed (pip install ray)")


def executor_for(cfg: DataConfig, out: Path, world: Sequence[ShardTask] = ()) -> Executor:
    """The executor `cfg.executor` asks for, preparing into `out`. `world` is every task of the plan in
    plan order: an engine numbers tasks by it, so a task's rank is the same on every machine whatever
    each one finds done (default: the tasks of each call)."""
    ex = cfg.executor
    require_engine(ex)
    if ex.type == "here":
        return Here(ex.retries)
    from cptkit.data.engines import Engine

    return Engine(ex, Path(out), list(world))


@dataclass
class Here:
    """Each task in turn in this process, on the task's worker threads or processes; a failed task is
    tried `retries` more times, then the others still run (their shards are kept) and one error names
    every shard that failed."""

    retries: int = 1

    def __call__(self, tasks: Sequence[ShardTask], progress: Progress) -> Iterator[ShardStats]:
        failed = []
        for task in tasks:
            stats = run_shard(task, self.retries, progress)
            if stats is None:
                failed.append(task)
            elif not failed:  # results go back in order: none after a failed one
                yield stats
        if failed:
            raise failure_error([read_failure(t.shard, t.cache_dir) or {} for t in failed])


def run_shard(task: ShardTask, retries: int, progress: Progress | None = None) -> ShardStats | None:
    """Tokenize the task's shard, trying `retries` more times after an exception; None when every try
    failed, with the last error recorded beside the shard. A full disk or an interrupt stops at once."""
    path = failure_path(task.shard, task.cache_dir)
    for attempt in range(1, retries + 2):
        try:
            stats = shards.tokenize_shard(task, progress)
        except Exception as e:
            if is_disk_full(e):
                raise
            log.warning(
                "%s shard %d failed (try %d of %d): %s",
                task.shard.source,
                task.shard.index,
                attempt,
                retries + 1,
                _describe(e),
            )
            if attempt > retries:
                _write_failure(path, task.shard, e, attempt)
                return None
        else:
            path.unlink(missing_ok=True)
            return stats
    raise AssertionError("unreachable")


def failure_path(shard: Shard, cache_dir: Path) -> Path:
    """Where a shard that failed leaves its record: `<store>/<source>/<key>.failed.json`."""
    return cache_dir / shard.source / f"{shard.key}.failed.json"


def read_failure(shard: Shard, cache_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(failure_path(shard, cache_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_failure(path: Path, shard: Shard, error: BaseException, attempts: int) -> None:
    from cptkit.outputs import now, write_json

    write_json(
        path,
        {
            "source": shard.source,
            "shard": shard.index,
            "key": shard.key,
            "files": [str(f) for f in shard.files],
            "error": _describe(error),
            "traceback": "".join(traceback.format_exception(error))[-4000:],
            "attempts": attempts,
            "host": socket.gethostname(),
            "time": now(),
        },
    )


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def failure_error(records: list[dict[str, Any]], logs: Path | None = None) -> CptkitError:
    """One error naming every failed shard (its source, files and error) and what to do."""
    lines = []
    for r in records:
        files = r.get("files", [])
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        lines.append(
            f"  - {r.get('source', '?')} shard {r.get('shard', '?')} ({shown or 'files unknown'}): "
            f"{r.get('error', 'no failure record: the worker ended without one')}"
            + (f" [{r['attempts']} tries on {r.get('host', '?')}]" if "attempts" in r else "")
        )
    where = f"; the engine's logs are in {logs}" if logs else ""
    return CptkitError(
        f"{len(records)} shard(s) failed to tokenize:\n"
        + "\n".join(lines)
        + f"\nFix or remove the files named (the error says what went wrong{where}), then run cptkit "
        "prepare again: the shards that are done are kept, only these run again"
    )

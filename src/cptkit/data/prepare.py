"""Raw corpora -> tokenized, chunked, mixed, packed dataset + held-out sets: the prepare pipeline.

read -> normalise -> filter -> tokenize (cached per shard of input files) -> dedup -> held-out split ->
chunk -> mix -> pack -> write. A rerun on unchanged inputs and settings does nothing; a rerun after
changing only what comes after tokenization reuses the cached ids; an interrupted run resumes.

Tokenizing a shard is one task (`ShardTask` -> `tokenize_shard`); an executor runs the tasks that are
not cached yet. `data.executor` chooses it (`cptkit.data.executors`): here, one after another on
`data.num_proc` workers, or through datatrove on worker processes, a Slurm job array or a Ray cluster;
any executor only has to return each task's `ShardStats` in order.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cptkit.config.data import DataConfig
from cptkit.data.cache import clear_leftovers, prune_cache
from cptkit.data.executors import Executor, ShareDone, executor_for, require_engine
from cptkit.data.extension import save_extension
from cptkit.data.manifest import MANIFEST, build_manifest
from cptkit.data.owned import check_writable, mark_started
from cptkit.data.plan import Plan, make_plan
from cptkit.data.prepared import Prepared
from cptkit.data.shards import ShardStats, ShardTask, cached_stats, open_shard
from cptkit.data.workers import PoolKind
from cptkit.disk import FreeSpace, free_bytes, reporting_disk_full
from cptkit.errors import CptkitError
from cptkit.locks import folder_lock

log = logging.getLogger(__name__)


def prepare(
    data: DataConfig,
    out: str | Path,
    force: bool = False,
    *,
    config: Any = None,
    executor: Executor | None = None,
    pool: PoolKind | None = None,
    on_phase: Callable[[str], None] | None = None,
    free_space: FreeSpace = free_bytes,
) -> Prepared:
    """Prepare `data` into `out` (or find it already done); returns the finished folder.

    `force` tokenizes every shard again. `config` is what `out/config.yaml` records (default: `data`).
    `executor` runs the shard tasks not cached yet (default: the one `data.executor` names); `pool`
    forces the workers' kind (threads or processes); `on_phase(name)` is told as each phase (tokenize,
    assemble, write) starts; `free_space(path)` says how many bytes are free where the dataset is written.

    `out` is locked for the whole run (a second prepare into it refuses), is refused when it holds
    files cptkit did not write, and a full disk is a one-line error with the run's temporaries removed.
    One machine's share of several (`data.executor.local_tasks`) locks only that share while it
    tokenizes, and `out` once all shards are done and it assembles; while others are not done, it
    raises `ShareDone` (a CptkitError whose message says what is done), having assembled nothing."""
    out = Path(out)
    if executor is None:
        require_engine(data.executor)  # a missing package before any work
    with ExitStack() as held:
        share = _machine_share(data) if executor is None else None
        held.enter_context(
            folder_lock(out if share is None else out.with_name(out.name + share), "cptkit prepare")
        )
        held.enter_context(reporting_disk_full(out, "free some space or set data.output_dir elsewhere"))
        check_writable(out)
        phase = on_phase or (lambda name: None)
        if share is not None:  # assembling writes `out`: one machine at a time
            phase = _locking_out_to_assemble(held, out, phase)
        return _prepare(data, out, force, config, executor, pool, phase, free_space)


def _locking_out_to_assemble(
    held: ExitStack, out: Path, told: Callable[[str], None]
) -> Callable[[str], None]:
    """`told`, after taking `out`'s lock as assembling starts; when another machine holds it (it found
    every shard done too, and assembles), this one stops: there is nothing left for it to do."""

    def phase(name: str) -> None:
        if name == "assemble":
            try:
                held.enter_context(folder_lock(out, "cptkit prepare"))
            except CptkitError as busy:
                raise ShareDone(
                    f"every shard is done and another cptkit prepare assembles {out}: {busy}"
                ) from None
        told(name)

    return phase


def _machine_share(data: DataConfig) -> str | None:
    """The name suffix of the lock of this machine's share, or None when it runs every shard."""
    ex = data.executor
    if ex.type != "local" or (ex.local_tasks is None and not ex.local_rank_offset):
        return None
    return f".ranks-{ex.local_rank_offset}-{ex.local_tasks if ex.local_tasks is not None else 'end'}"


def _prepare(
    data: DataConfig,
    out: Path,
    force: bool,
    config: Any,
    executor: Executor | None,
    pool: PoolKind | None,
    phase: Callable[[str], None],
    free_space: FreeSpace,
) -> Prepared:
    from cptkit.outputs import write_config, write_json

    plan = make_plan(data, out)
    if executor is None:  # ranks numbered by the whole plan: the same shard on every machine
        executor = executor_for(data, out, plan.tasks(pool))
    current = _finished(out)
    if not force and current is not None and current.manifest.get("fingerprint") == plan.fingerprint:
        if data.prune_cache:
            prune_cache(plan.cache_dir, plan.shard_keys())
        log.info("%s is up to date (same inputs, tokenizer and settings): nothing to do", out)
        return current
    _note_old_cache(out)
    mark_started(out)
    save_extension(out, plan.extended)  # the extended tokenizer beside the data (none: an old one removed)
    timings: dict[str, float] = {}
    phase("tokenize")
    with _timed(timings, "tokenize_s"):
        read = _tokenize(plan, force, executor, pool)
    _check_nonempty(data, read)
    phase("assemble")
    current = _finished(out)  # another machine of several may have assembled it meanwhile
    if not force and current is not None and current.manifest.get("fingerprint") == plan.fingerprint:
        log.info("%s was assembled by another cptkit prepare meanwhile: nothing left to do", out)
        return current
    with _timed(timings, "assemble_s"):
        result = _assemble(plan)
        _check_trainable(data, result.stats)
    phase("write")
    with _timed(timings, "write_s"):
        from cptkit.data.write import write_folder

        written = write_folder(out, result, free_space)
        if data.prune_cache:  # once train/ no longer lists the store files it removes
            prune_cache(plan.cache_dir, plan.shard_keys())
        manifest = build_manifest(plan, read, result, written)
        write_config(out, data if config is None else config)
        manifest["status"] = "complete"
    manifest["timings"] = timings
    write_json(out / MANIFEST, manifest)  # the status "complete" lands last
    totals = manifest["totals"]
    log.info(
        "prepared %s rows (%s tokens) in %s", f"{totals['rows']:,}", f"{totals['trained_tokens']:,}", out
    )
    return Prepared(out, manifest)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[key] = round(time.perf_counter() - start, 3)


def _note_old_cache(out: Path) -> None:
    """An older cptkit's tokenization cache (`cache/`, format 2) is never read again: say what it takes."""
    old = out / "cache"
    if old.is_dir():
        size = sum(f.stat().st_size for f in old.rglob("*") if f.is_file())
        log.warning(
            "%s: the tokenization cache of an older cptkit (%.1f MB) is not used any more (the store is "
            "%s/store); delete it to free the space",
            old,
            size / 1e6,
            out,
        )


def _finished(out: Path) -> Prepared | None:
    try:
        return Prepared.load(out)
    except CptkitError:
        return None


def _tokenize(plan: Plan, force: bool, executor: Executor, pool: PoolKind | None) -> dict[str, ShardStats]:
    """Tokenize every shard not already cached, in rounds of one executor call each: the first round
    runs every shard of the uncapped sources and the first of each capped one; each next round, the
    next shard of each capped source whose shards so far have not reached its cap. The shards a capped
    source did not need are dropped from the plan. Returns each source's merged stats."""
    from tqdm.auto import tqdm

    tasks = plan.tasks(pool)
    capped = {name: deque(t for t in tasks if t.shard.source == name and t.cap) for name in plan.shards}
    firsts = [q.popleft() for q in capped.values() if q]
    batch = [t for t in tasks if t.cap is None or any(t is f for f in firsts)]  # in config order
    stats = {name: ShardStats() for name in plan.shards}
    clear_leftovers(plan.cache_dir)
    found = _cached(batch, plan, force)
    reused = ran = 0
    with tqdm(total=0, unit="B", unit_scale=True, desc="tokenizing", disable=None not in found) as bar:
        while batch:
            todo = [t for t, s in zip(batch, found, strict=True) if s is None]
            reused, ran = reused + len(batch) - len(todo), ran + len(todo)
            bar.total += sum(t.shard.bytes for t in todo)
            bar.refresh()
            results = iter(executor(todo, bar.update) if todo else ())
            for task, cached in zip(batch, found, strict=True):
                got = cached if cached is not None else next(results, None)
                if got is None:
                    raise ValueError(
                        f"the executor returned fewer results than the {len(todo)} task(s) it was given"
                    )
                stats[task.shard.source].add(got)
            batch = [q.popleft() for name, q in capped.items() if q and not _cap_reached(q[0], stats[name])]
            found = _cached(batch, plan, force)
    if reused:
        log.info("reused %d cached tokenized shard(s)%s", reused, "" if ran else ": nothing to tokenize")
    for name, rest in capped.items():
        if rest:  # its cap was reached before its last shard
            used = len(plan.shards[name]) - len(rest)
            log.info(
                "%s: its cap (%s) is reached in its first %d of %d shards; the others are not read",
                name,
                _describe_cap(rest[0]),
                used,
                len(plan.shards[name]),
            )
            plan.shards[name] = plan.shards[name][:used]
    return stats


def _cached(tasks: list[ShardTask], plan: Plan, force: bool) -> list[ShardStats | None]:
    """Each task's stats where its shard is cached (None: to tokenize; `force`: all of them)."""
    return [None if force else cached_stats(t.shard, plan.cache_dir) for t in tasks]


def _cap_reached(task: ShardTask, so_far: ShardStats) -> bool:
    return task.cap is not None and task.cap.reached(so_far.kept, so_far.tokens)


def _describe_cap(task: ShardTask) -> str:
    cap = task.cap
    parts = [f"max_documents {cap.max_documents:,}" if cap.max_documents is not None else ""]
    parts.append(f"max_tokens {cap.max_tokens:,}" if cap.max_tokens is not None else "")
    return ", ".join(p for p in parts if p)


def _assemble(plan: Plan):
    from cptkit.data.assemble import StoreShard, assemble
    from cptkit.data.tokenize import Encoder

    store = {
        name: [
            StoreShard(
                sh.path(plan.cache_dir).relative_to(plan.out).as_posix(),
                open_shard(sh, plan.cache_dir),
                sh.path(plan.cache_dir),
            )
            for sh in shards
        ]
        for name, shards in plan.shards.items()
    }
    return assemble(store, plan.data, Encoder(plan.tokenizer))


def _check_nonempty(data: DataConfig, stats: dict[str, ShardStats]) -> None:
    for i, s in enumerate(data.sources):
        st = stats[s.name]
        if st.kept == 0:
            drops = ", ".join(f"{r}: {n}" for r, n in st.ledger.drops.most_common()) or "none"
            raise CptkitError(
                f"data.sources[{i}] ({s.name}): no documents left from {_what_it_reads(s)} ({st.read} read; dropped: {drops}); "
                f"check the path, text_field ({s.text_field!r}) and data.filters"
            )


def _what_it_reads(source: Any) -> str:
    if source.type == "hub":
        return f"{source.hub.path} ({source.hub.split})"
    return source.path or "the documents its model wrote"


def _check_trainable(data: DataConfig, stats: dict[str, dict[str, Any]]) -> None:
    """A weighted source must give training tokens, or the asked mix silently cannot be met."""
    for i, s in enumerate(data.sources):
        a = stats[s.name]
        if a["documents"] + a["duplicates"] == 0 and a["capped_documents"] > 0:
            caps = ", ".join(
                f"{key} {value:,}"
                for key, value in (("max_documents", s.max_documents), ("max_tokens", s.max_tokens))
                if value is not None
            )
            raise CptkitError(
                f"data.sources[{i}] ({s.name}): its caps ({caps}) keep no document: the first document "
                "alone is longer; raise max_tokens (or remove the cap)"
            )
        if s.weight > 0 and a["train_tokens"] == 0:
            raise CptkitError(
                f"data.sources[{i}] ({s.name}): no training tokens left ({a['duplicates']} document(s) were "
                f"duplicates of earlier documents, {a['heldout_documents']} held out); give it weight 0 "
                "to keep it for held-out evaluation only, or set data.dedup: none"
            )

"""Benchmark prepare's executors: `here` against datatrove's `local` with 1 and 2 workers, and what one
task costs each engine.

    python bench/prepare_workers.py --tokenizer DIR      # >= 100 MB of ../shared/corpora, 2 MB shards

Methods, each a cold `cptkit prepare` (empty folder) in a fresh subprocess, timed from inside it, the
methods interleaved for --rounds rounds (median shown):
  here      the default executor: one shard after another in this process, data.num_proc threads each
  local-1   datatrove's LocalPipelineExecutor, 1 worker (tasks in this process, all cores' threads each)
  local-2   the same with 2 worker processes (each task on cores // 2 threads)
Per-task overhead: K tiny tasks (one short document each) through each executor, K = 4 and 16, the
executor call alone timed; the slope of time over K is the cost of one task, the intercept what a run
costs once (a process pool's start).

The corpus is the shared corpora copied until large enough, each copy's documents changed ("(copy N)"
in front) so that dedup keeps them. Shards are --shard-mb (the default 256 MB would make one task of
100 MB). Prints a table and writes bench/results/prepare_workers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
METHODS = {"here": {}, "local-1": {"type": "local", "workers": 1}, "local-2": {"type": "local", "workers": 2}}


def data_config(tokenizer: Path, corpus: Path, out: Path, executor: dict) -> dict:
    sources = [{"name": p.name, "path": str(p)} for p in sorted(corpus.iterdir()) if p.is_dir()]
    return {
        "tokenizer": str(tokenizer),
        "sources": sources,
        "output_dir": str(out),
        "seq_length": 2048,
        "executor": executor,
    }


def child_prepare(args: argparse.Namespace) -> dict:
    """One cold prepare, timed here (imports excluded)."""
    from cptkit.config import build_config
    from cptkit.config.data import DataConfig
    from cptkit.data import shards
    from cptkit.data.cache import STORE_DIR
    from cptkit.data.prepare import prepare

    shards.SHARD_BYTES = int(args.shard_mb * (1 << 20))
    d = json.loads(args.config)
    load_before = os.getloadavg()[0]  # the machine is shared: how busy it was around the run
    start = time.perf_counter()
    m = prepare(build_config(DataConfig, d), d["output_dir"]).manifest
    wall = time.perf_counter() - start
    t = m["timings"]
    return {
        "wall_s": round(wall, 2),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "plan_s": round(wall - t["tokenize_s"] - t["assemble_s"] - t["write_s"], 2),  # list, hash, load
        "timings": t,
        "shards": len(list((Path(d["output_dir"]) / STORE_DIR).glob("*/*.arrow"))),
        "tokens": sum(s["tokens"] for s in m["sources"].values()),
        "input_bytes": sum(i["bytes"] for i in m["inputs"]),
    }


def child_overhead(args: argparse.Namespace) -> dict:
    """K tiny tasks through each executor: the executor call alone, timed."""
    from cptkit.config import build_config
    from cptkit.config.data import DataConfig
    from cptkit.data import shards
    from cptkit.data.executors import executor_for
    from cptkit.data.plan import make_plan

    shards.SHARD_BYTES = 1  # one file, one task
    d = json.loads(args.config)
    result = {}
    for k in (2, 4, 16):  # 2: a warm-up (first loads and imports), not kept
        corpus = Path(d["output_dir"]).parent / f"tiny{k}"
        for i in range(k):
            (corpus / "t").mkdir(parents=True, exist_ok=True)
            text = f"document {i}: a short text of a few words, for one task that does almost nothing."
            (corpus / "t" / f"{i:03d}.jsonl").write_text(json.dumps({"text": text}) + "\n")
        for name, executor in METHODS.items():
            out = Path(d["output_dir"]).parent / f"tiny{k}-{name}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = build_config(DataConfig, d | {"sources": [{"name": "t", "path": str(corpus / "t")}]})
            cfg.executor = build_config(DataConfig, d | {"executor": executor}).executor
            plan = make_plan(cfg, out)
            tasks = plan.tasks()
            run = executor_for(cfg, out, tasks)
            start = time.perf_counter()
            got = list(run(tasks, lambda n: None))
            result.setdefault(name, {})[k] = time.perf_counter() - start
            assert len(got) == k
    for name, t in result.items():
        del t[2]
        slope = (t[16] - t[4]) / 12
        result[name] = {
            "per_task_s": round(slope, 4),
            "once_s": round(t[4] - 4 * slope, 3),
            "K4_s": round(t[4], 3),
        }
    return result


def model_tokenize_s(name: str, tasks: int, task_s: float, overhead: dict) -> float:
    """The README's model for one machine: ceil(tasks / N) rounds of (task time + overhead), a task on
    cores / N threads taking N times as long as on all of them (a tokenizer that uses every core)."""
    workers = int(name.split("-")[1]) if "-" in name else 1
    return overhead["once_s"] + -(-tasks // workers) * (workers * task_s + overhead["per_task_s"])


def text_bytes(corpus: Path) -> int:
    import gzip

    return sum(len(gzip.open(f, "rb").read()) for f in corpus.rglob("*.jsonl.gz"))


def run_child(mode: str, config: dict, shard_mb: float) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--config",
        json.dumps(config),
        "--shard-mb",
        str(shard_mb),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", type=Path, default=HERE.parent.parent / "shared" / "corpora")
    p.add_argument(
        "--tokenizer", type=Path, default=HERE.parent / "tests" / "assets" / "golden" / "tokenizer"
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/cptkit-bench-workers"))
    p.add_argument("--min-mb", type=float, default=100)
    p.add_argument("--shard-mb", type=float, default=2)
    p.add_argument(
        "--rounds", type=int, default=2, help="each method this many times, interleaved; median shown"
    )
    p.add_argument("--child", choices=["prepare", "overhead"])
    p.add_argument("--config")
    args = p.parse_args()
    if args.child == "prepare":
        print(json.dumps(child_prepare(args)))
        return
    if args.child == "overhead":
        print(json.dumps(child_overhead(args)))
        return

    from prepare import build_corpus  # bench/prepare.py: the corpora copied, each copy's documents changed

    corpus = build_corpus(args.corpora, args.work, args.min_mb)
    rounds: dict[str, list[dict]] = {name: [] for name in METHODS}
    for _ in range(args.rounds):
        for name, executor in METHODS.items():
            out = args.work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            config = data_config(args.tokenizer, corpus, out, executor)
            rounds[name].append(run_child("prepare", config, args.shard_mb))
            print(f"{name}: {rounds[name][-1]['wall_s']} s", file=sys.stderr)
    runs = {name: sorted(rs, key=lambda r: r["wall_s"])[(len(rs) - 1) // 2] for name, rs in rounds.items()}
    overhead = run_child(
        "overhead", data_config(args.tokenizer, corpus, args.work / "tiny", {}), args.shard_mb
    )

    mb = text_bytes(corpus) / 1e6
    print(f"corpus {mb:.1f} MB of text, {runs['here']['tokens']:,} tokens, {runs['here']['shards']} shards")
    here = runs["here"]
    task_s = here["timings"]["tokenize_s"] / here["shards"]  # one task on all cores
    print(
        f"{'method':<9} {'wall s':>7} {'plan s':>6} {'tokenize s':>10} {'model s':>7} {'assemble+write s':>16} "
        f"{'MB/s':>6} {'vs here':>7} {'load':>9}"
    )
    for name, r in runs.items():
        t = r["timings"]
        r["model_tokenize_s"] = round(model_tokenize_s(name, here["shards"], task_s, overhead[name]), 1)
        print(
            f"{name:<9} {r['wall_s']:>7.1f} {r['plan_s']:>6.1f} {t['tokenize_s']:>10.1f} "
            f"{r['model_tokenize_s']:>7.1f} {t['assemble_s'] + t['write_s']:>16.1f} {mb / r['wall_s']:>6.2f} "
            f"{here['wall_s'] / r['wall_s']:>6.2f}x {r['load_before']:>4.1f}-{r['load_after']:<4.1f}"
        )
    print(f"{'executor':<9} {'per task s':>10} {'once s':>7}")
    for name, o in overhead.items():
        print(f"{name:<9} {o['per_task_s']:>10.4f} {o['once_s']:>7.3f}")
    result = {
        "purpose": "prepare's executors: here vs datatrove local with 1 and 2 workers, and per-task overhead",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": os.getloadavg()},
        "corpus_text_mb": round(mb, 1),
        "shard_mb": args.shard_mb,
        "tokenizer": str(args.tokenizer),
        "runs": runs,  # the median round of each
        "rounds": rounds,
        "overhead": overhead,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "prepare_workers.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

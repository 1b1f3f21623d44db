"""Measure `cptkit prepare` at scale: peak memory, time per phase, throughput against the tokenizer's
own batched encode, and packing against all-at-once, on the corpora of bench/scale_corpus.py.

    python bench/prepare_scale.py --label before --multiples 1 4
    python bench/prepare_scale.py --label after --multiples 1 4 16
    python bench/prepare_scale.py --table            # print bench/results/prepare_scale.json

For each multiple K, one after another:
  encode   the tokenizer's own batched encode (`backend_tokenizer.encode_batch_fast`, what prepare calls,
           or --encode-method encode_batch) of the same texts, raw, 1,000 documents a call, on as many
           threads as prepare uses, in a child process: tokens/s per core of the encode calls alone,
           and the child's RSS after loading the tokenizer (the tokenizer's own memory) and after
           importing cptkit's prepare (the floor of a prepare process).
  prepare  `cptkit prepare` (the code of the checkout this script is in) in a child process, cold (its
           output folder removed first): domain = the K x corpus, general = the small general source,
           weights in proportion to their text with mix: upsample (every domain token is trained; the
           general source, which loses a sixth of its tokens to its held-out floor, repeats a few
           segments to its share), seq_length 2048, chunking packing, defaults otherwise. The child's process tree's memory is read every 0.2 s
           from /proc/PID/status: RSS, and apart RssAnon (memory allocated) and RssFile + RssShmem
           (pages of mapped files, such as a memory-mapped token store: counted in RSS, yet not
           allocated, and the kernel drops them under pressure). Phases are the manifest's timings.
  packing  the trained segments (the prepared folder's segment lengths: train/segment_lengths.bin, or
           where position_ids restart at 0 in a format-2 train/) packed best-fit decreasing all at once:
           the efficiency prepare's own packing is compared with.

A child whose tree allocates more than --max-anon-gb, or that leaves the machine less than --min-free-gb
available, is stopped (the machine has no swap: the alternative is the kernel's OOM killer) and recorded as stopped.
Other work on the machine is recorded with each run: the load average, and the CPU cores others used
on average while it ran (the machine's busy CPU time minus the child's); a run where others used more
than --clean-cores is marked as under load, since its throughput is then not the code's own.
Results go to bench/results/prepare_scale.json, per --label and multiple (other entries are kept).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its sibling modules
from process_tree import GB, proc_memory, run_measured  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "prepare_scale.json"
CONFIG = "prepare_scale.yaml"  # written into each run folder: marks it as this script's to remove
TARGETS = {
    "rss_flat": "peak RSS within 10% from the smallest to the largest multiple",
    "rss_over_tokenizer": "peak RSS at most 1.5 GB beyond the tokenizer's own",
    "throughput": "tokens/s per core within 1.1x of the tokenizer's batched encode",
    "packing": "packing efficiency within 0.1% of best-fit decreasing all at once",
}


# --- the tokenizer's own batched encode (runs in a child: --encode-child) -------------------------


def corpus_texts(folders: list[Path], max_bytes: int | None):
    """The `text` of every line of every .jsonl.gz under `folders`, in file order, up to `max_bytes`."""
    total = 0
    for folder in folders:
        for f in sorted(folder.glob("*.jsonl.gz")):
            with gzip.open(f, "rt", encoding="utf-8") as lines:
                for line in lines:
                    text = json.loads(line)["text"]
                    yield text
                    total += len(text.encode("utf-8"))
                    if max_bytes is not None and total >= max_bytes:
                        return


def encode_child(
    tokenizer: str, folders: list[Path], threads: int, method: str, max_bytes: int | None
) -> dict:
    os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    rss = {"python": proc_memory(os.getpid())}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    rss["tokenizer"] = proc_memory(os.getpid())
    import cptkit.data.prepare  # noqa: F401  what a prepare process holds before any data

    rss["cptkit_imports"] = proc_memory(os.getpid())
    encode = getattr(tok.backend_tokenizer, method)
    tokens = docs = text_bytes = 0
    seconds = cpu = 0.0
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens, docs, seconds, cpu
        c0, t0 = time.process_time(), time.perf_counter()
        encoded = encode(batch, add_special_tokens=True)
        seconds += time.perf_counter() - t0
        cpu += time.process_time() - c0
        tokens += sum(len(e.ids) for e in encoded) + len(batch)  # + the EOS prepare appends to each
        docs += len(batch)
        batch.clear()

    for text in corpus_texts(folders, max_bytes):
        batch.append(text)
        text_bytes += len(text.encode("utf-8"))
        if len(batch) == 1000:
            flush()
    if batch:
        flush()
    return {
        "method": method,
        "threads": threads,
        "documents": docs,
        "text_bytes": text_bytes,
        "tokens": tokens,
        "encode_s": round(seconds, 2),
        "encode_cpu_s": round(cpu, 2),
        "tokens_per_s": round(tokens / seconds),
        "tokens_per_s_per_core": round(tokens / seconds / threads),
        "tokens_per_cpu_s": round(tokens / cpu),
        "rss_gb": {k: round(v.get("VmRSS", 0) / GB, 3) for k, v in rss.items()},
        "anon_gb": {k: round(v.get("RssAnon", 0) / GB, 3) for k, v in rss.items()},
    }


# --- packing all at once -----------------------------------------------------------------------


def segment_lengths(prepared: Path):
    """Lengths of the trained segments of a prepared folder (format 3: its index; 2: from position_ids)."""
    import numpy as np
    import pyarrow as pa

    train = prepared / "train"
    index = train / "index.json"
    if index.is_file():
        meta = json.loads(index.read_text())
        return np.fromfile(train / "segment_lengths.bin", dtype=meta["arrays"]["segment_lengths"])
    parts = []
    for f in sorted(train.glob("*.arrow")):
        with pa.memory_map(str(f)) as source:
            for batch in pa.ipc.open_stream(source):
                pos = batch.column("position_ids").flatten().to_numpy()
                starts = np.flatnonzero(pos == 0)
                parts.append(np.diff(np.append(starts, len(pos))))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def best_fit_rows(lengths, capacity: int) -> int:
    """Rows that best-fit decreasing packs `lengths` into, all at once. Which of the open rows with the
    same room a segment goes to does not change the rooms left, so counting open rows by their room is
    enough to know how many rows there are."""
    import numpy as np

    lengths = np.sort(np.asarray(lengths, dtype=np.int64))[::-1]
    open_rooms = np.zeros(capacity + 1, dtype=np.int64)  # open rows by room left
    has_room = np.zeros(capacity + 1, dtype=bool)
    rows = int(np.sum(lengths >= capacity))
    for need in lengths[lengths < capacity].tolist():
        if need <= 0:
            continue
        room = need + int(has_room[need:].argmax())
        if has_room[room]:
            open_rooms[room] -= 1
            has_room[room] = open_rooms[room] > 0
        else:
            rows, room = rows + 1, capacity
        room -= need
        if room > 0:
            open_rooms[room] += 1
            has_room[room] = True
    return rows


def packing_reference(prepared: Path, seq_length: int) -> dict:
    lengths = segment_lengths(prepared)
    rows = best_fit_rows(lengths, seq_length)
    tokens = int(lengths.sum())
    return {
        "segments": len(lengths),
        "tokens": tokens,
        "rows": rows,
        "packing_efficiency": round(tokens / (rows * seq_length), 6) if rows else 0.0,
    }


# --- one multiple ------------------------------------------------------------------------------


def write_config(folder: Path, corpus: dict, k: int, tokenizer: str, seq_length: int) -> Path:
    import yaml

    domain, general = corpus["multiples"][str(k)], corpus["general"]
    total = domain["text_bytes"] + general["text_bytes"]
    cfg = {
        "run_dir": str(folder / "run"),
        "data": {
            "tokenizer": tokenizer,
            "seq_length": seq_length,
            "chunking": "packing",
            "mix": "upsample",  # every domain token trained, whatever the general source's held-out share
            "sources": [
                {"name": "domain", "path": domain["path"], "weight": round(domain["text_bytes"] / total, 6)},
                {
                    "name": "general",
                    "path": general["path"],
                    "role": "general",
                    "weight": round(general["text_bytes"] / total, 6),
                },
            ],
        },
    }
    path = folder / CONFIG
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fresh_folder(folder: Path) -> None:
    """An empty run folder; an existing one is removed only when this script made it."""
    if folder.exists():
        if not (folder / CONFIG).is_file():
            sys.exit(
                f"{folder} exists and was not made by this script ({CONFIG} missing); pick another --work"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def phase_windows(timings: dict, end: float) -> dict[str, tuple[float, float]]:
    """Each phase's (start, end) in seconds since the child started, laid back from its exit (the
    manifest's timings run in order, up to just before the child exits)."""
    timings = {k: v for k, v in timings.items() if isinstance(v, (int, float))}
    windows, t = {}, end - sum(timings.values())
    for key, seconds in timings.items():
        windows[key.removesuffix("_s")] = (t, t + seconds)
        t += seconds
    return windows


def measure(k: int, corpus: dict, args) -> dict:
    threads = args.threads or len(os.sched_getaffinity(0))  # prepare's default num_proc: the usable cores
    folder = Path(args.work) / f"{args.label}-{k}x"
    fresh_folder(folder)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result: dict = {
        "multiple": k,
        "text_bytes": corpus["multiples"][str(k)]["text_bytes"] + corpus["general"]["text_bytes"],
    }

    config = write_config(folder, corpus, k, args.tokenizer, args.seq_length)  # first: it marks the folder
    folders = [corpus["multiples"][str(k)]["path"], corpus["general"]["path"]]
    cmd = [
        sys.executable,
        __file__,
        "--encode-child",
        args.tokenizer,
        "--threads",
        str(threads),
        "--encode-method",
        args.encode_method,
        "--folders",
        *folders,
    ]
    if args.encode_mb:
        cmd += ["--encode-mb", str(args.encode_mb)]
    print(f"{k}x: the tokenizer's own encode on {threads} thread(s) ...", file=sys.stderr, flush=True)
    run = run_measured(cmd, folder / "encode.log", env, args)
    run["memory"] = {k: v for k, v in run.pop("_sampler").summary().items() if k != "timeline"}
    if run["rc"] == 0:
        run |= json.loads((folder / "encode.log").read_text().strip().splitlines()[-1])
    result["encode"] = run

    print(f"{k}x: cptkit prepare ...", file=sys.stderr, flush=True)
    run = run_measured(
        [sys.executable, "-m", "cptkit", "prepare", str(config)], folder / "prepare.log", env, args
    )
    sampler = run.pop("_sampler")
    prepared = folder / "run" / "data"
    manifest_file = prepared / "manifest.json"
    if run["rc"] != 0 or not manifest_file.is_file():
        run["memory"] = sampler.summary()
        run["log_tail"] = (folder / "prepare.log").read_text(errors="replace")[-2000:]
        result["prepare"] = run
        return result
    manifest = json.loads(manifest_file.read_text())
    timings = manifest.get("timings", {})
    pipeline_s = sum(v for v in timings.values() if isinstance(v, (int, float))) or run["wall_s"]
    tokens = sum(s.get("tokens", 0) for s in manifest["sources"].values())
    run |= {
        "threads": threads,
        "format_version": manifest.get("format_version"),
        "timings": timings,
        "pipeline_s": round(pipeline_s, 2),
        "tokens": tokens,
        "trained_tokens": manifest["totals"]["trained_tokens"],
        "rows": manifest["totals"]["rows"],
        "packing_efficiency": manifest["totals"]["packing_efficiency"],
        "documents": {n: s.get("documents") for n, s in manifest["sources"].items()},
        "duplicates": {n: s.get("duplicates") for n, s in manifest["sources"].items()},
        "tokens_per_s": round(tokens / pipeline_s),
        "tokens_per_s_per_core": round(tokens / pipeline_s / threads),
        "tokens_per_cpu_s": round(tokens / run["cpu_s"]) if run["cpu_s"] else None,
        "memory": sampler.summary(phase_windows(timings, run["wall_s"])),
        "output_gb": round(sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file()) / GB, 3),
    }
    result["prepare"] = run
    print(f"{k}x: packing all at once ...", file=sys.stderr, flush=True)
    result["packing_all_at_once"] = packing_reference(prepared, args.seq_length)
    if not args.keep:
        shutil.rmtree(folder / "run")
    return result


# --- verdicts and table ------------------------------------------------------------------------


def verdicts(runs: dict[str, dict]) -> dict:
    """The issue's targets on the runs of one label (None where a run needed is missing)."""
    done = {int(k): r for k, r in runs.items() if r.get("prepare", {}).get("rc") == 0}
    out: dict = {}
    if len(done) >= 2:
        peaks = [done[k]["prepare"]["memory"]["peak_rss_gb"] for k in sorted(done)]
        growth = peaks[-1] / peaks[0] - 1
        out["rss_flat"] = {"growth": round(growth, 3), "met": growth <= 0.10}
    over = [
        r["prepare"]["memory"]["peak_rss_gb"] - r["encode"]["rss_gb"]["tokenizer"]
        for r in done.values()
        if "rss_gb" in r.get("encode", {})
    ]
    if over:
        out["rss_over_tokenizer"] = {"max_gb": round(max(over), 3), "met": max(over) <= 1.5}
    ratios = [
        r["encode"]["tokens_per_s_per_core"] / r["prepare"]["tokens_per_s_per_core"]
        for r in done.values()
        if "tokens_per_s_per_core" in r.get("encode", {})
    ]
    if ratios:
        out["throughput"] = {
            "max_x_encode": round(max(ratios), 3),
            "met": max(ratios) <= 1.1,
            "under_load": any(
                r["prepare"]["load"]["under_load"] or r["encode"]["load"]["under_load"] for r in done.values()
            ),
        }
    gaps = [
        1 - r["prepare"]["packing_efficiency"] / r["packing_all_at_once"]["packing_efficiency"]
        for r in done.values()
        if r.get("packing_all_at_once", {}).get("packing_efficiency")
    ]
    if gaps:
        out["packing"] = {"max_relative_gap": round(max(gaps), 6), "met": max(gaps) <= 0.001}
    return out


def table(results: dict) -> None:
    print(
        f"\n{'label':<8}{'K':>4}{'text GB':>9}{'tokens M':>10}{'wall s':>8}  {'tokenize/assemble/write s':<27}"
        f"{'peak GB':>8}{'anon':>7}{'file':>7}{'-tok':>7}{'tok/s/core':>12}{'encode':>10}{'x':>6}"
        f"{'x cpu':>7}{'packing':>9}{'1-shot':>9}{'others':>8}"
    )
    for label, entry in results.get("labels", {}).items():
        for k, r in sorted(entry["runs"].items(), key=lambda kv: int(kv[0])):
            p, e = r.get("prepare", {}), r.get("encode", {})
            head = f"{label:<8}{k + 'x':>4}{r['text_bytes'] / 1e9:>9.2f}"
            if p.get("rc") != 0:
                print(
                    f"{head}  failed: {p.get('stopped') or 'rc ' + str(p.get('rc'))}"
                    f"{'' if not p.get('memory') else ', peak ' + str(p['memory']['peak_rss_gb']) + ' GB'}"
                )
                continue
            m, t = p["memory"], p["timings"]
            phases = "/".join(f"{v:.0f}" for v in t.values() if isinstance(v, (int, float)))
            mark = "*" if p["load"]["under_load"] or e.get("load", {}).get("under_load") else ""
            enc = e.get("tokens_per_s_per_core")
            print(
                f"{head}{p['tokens'] / 1e6:>10.1f}{p['wall_s']:>8.0f}  {phases:<27}{m['peak_rss_gb']:>8.2f}"
                f"{m['anon_at_peak_gb']:>7.2f}{m['file_at_peak_gb']:>7.2f}"
                f"{m['peak_rss_gb'] - e.get('rss_gb', {}).get('tokenizer', 0):>7.2f}"
                f"{p['tokens_per_s_per_core']:>11,}{mark:1}{enc or 0:>10,}{(enc or 0) / p['tokens_per_s_per_core']:>6.2f}"
                f"{(e.get('tokens_per_cpu_s') or 0) / (p['tokens_per_cpu_s'] or 1):>7.2f}"
                f"{p['packing_efficiency']:>9.4f}{r['packing_all_at_once']['packing_efficiency']:>9.4f}"
                f"{p['load']['others_cores']:>8.2f}"
            )
        for name, v in verdicts(entry["runs"]).items():
            print(f"  {label} {name}: {'met' if v['met'] else 'NOT met'} {v}  ({TARGETS[name]})")
    print(
        "\n* throughput taken while others used more than --clean-cores of the machine (not the code's own)"
    )
    print(
        "-tok: peak RSS minus the RSS of a process that has loaded the tokenizer; x: the encode's tokens/s per\n"
        "core over prepare's; x cpu: the same per CPU-second (less moved by others' load); 1-shot: best-fit\n"
        "decreasing of all segments at once; others: CPU cores others used on average during the run"
    )


# --- driver ------------------------------------------------------------------------------------


def git_state() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after", help="before | after: what this run's results are kept as")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--corpus", default="/work/scale/corpus", help="bench/scale_corpus.py's output")
    p.add_argument("--tokenizer", default="/work/scale/tokenizer")
    p.add_argument("--work", default="/work/scale/runs", help="where the prepared folders go")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument(
        "--threads", type=int, help="prepare's num_proc and the encode's threads (default: all cores)"
    )
    p.add_argument(
        "--encode-method", choices=("encode_batch_fast", "encode_batch"), default="encode_batch_fast"
    )
    p.add_argument(
        "--encode-mb", type=float, help="encode only the first this many MB of text (default: all)"
    )
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    p.add_argument("--max-anon-gb", type=float, default=16.0, help="stop a child whose tree allocates more")
    p.add_argument("--min-free-gb", type=float, default=1.5, help="stop a child when less is available")
    p.add_argument("--clean-cores", type=float, default=0.25)
    p.add_argument("--keep", action="store_true", help="keep the prepared folders")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--table", action="store_true", help="print the table of --out and stop")
    p.add_argument("--encode-child", metavar="TOKENIZER", help=argparse.SUPPRESS)
    p.add_argument("--folders", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.encode_child:
        max_bytes = int(args.encode_mb * 1e6) if args.encode_mb else None
        got = encode_child(
            args.encode_child, [Path(f) for f in args.folders], args.threads, args.encode_method, max_bytes
        )
        print(json.dumps(got))
        return
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"targets": TARGETS, "labels": {}}
    if args.table:
        table(results)
        return
    corpus = json.loads((Path(args.corpus) / "corpus.json").read_text())
    entry = results["labels"].setdefault(args.label, {"runs": {}})
    for k in args.multiples:
        if str(k) not in corpus["multiples"]:
            sys.exit(f"{args.corpus} has no {k}x corpus; run bench/scale_corpus.py --multiples {k}")
        run = measure(k, corpus, args)
        entry["runs"][str(k)] = run | {"measured": time.strftime("%Y-%m-%d %H:%M"), "code": git_state()}
        entry["verdicts"] = verdicts(entry["runs"])
        results["machine"] = {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB, 1),
        }
        results["corpus"] = corpus
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")  # after each multiple: a later stop keeps it
    table(results)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

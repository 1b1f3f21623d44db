"""Benchmark what training costs to start and to resume on the token store.

    python bench/resume.py                         # a synthetic store of 50M tokens, resume at 10,000 vs 10
    python bench/resume.py --prepared DIR          # the same on a folder made by `cptkit prepare`

Measured, each in a fresh subprocess (so no earlier step's memory or opened files count):
  startup   Prepared.load (the index and every store file opened and checked), train_rows(), the first
            batch (rows gathered and collated), and the process's resident memory (RSS) after each
  train     a tiny Llama (hidden 16, 2 layers) trained by cptkit's Trainer to step N, saving at N; every
            step is real training on the folder's rows (one thread: OMP_NUM_THREADS=1 unless set)
  resume    a new process resumes from checkpoint-N: seconds from `trainer.train(resume_from_checkpoint)`
            to the end of the first new step, and how many rows it read until then (the Trainer skips
            the trained batches as indices; a row it skipped is never gathered)
for N = --steps (default 10,000) and N = --early (10). The difference between the two resumes is what
skipping 10,000 steps of data costs. Prints a table and writes bench/results/resume.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HIDDEN, LAYERS = 16, 2


def rss_mib() -> dict[str, float]:
    """Resident memory of this process now, MiB: all of it, the anonymous part (the process's own
    allocations) and the file-backed part (mapped pages of the store and of libraries: shared with
    the page cache, and dropped under memory pressure without being written anywhere)."""
    try:
        status = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
        )
        kib = {k: int(status[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile")}
        return {"rss": kib["VmRSS"] / 1024, "anon": kib["RssAnon"] / 1024, "file": kib["RssFile"] / 1024}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rss": peak, "anon": float("nan"), "file": float("nan")}


# --- the synthetic folder --------------------------------------------------------------------------


def build_synthetic(folder: Path, tokens: int, seq: int, batch_documents: int = 1024, seed: int = 0) -> dict:
    """A format-3 prepared folder of `tokens` random ids (documents of 16-2,000 tokens, two sources of 8
    store files each, `batch_documents` documents a record batch: prepare writes at most 1,024), for
    the tiny tokenizer."""
    import numpy as np

    from cptkit.testing.store import tokenizer_entry, write_prepared
    from cptkit.testing.tiny import sample_texts, train_tokenizer

    tokenizer = train_tokenizer(sample_texts())
    tokenizer.save_pretrained(folder.parent / "tokenizer")
    rng = np.random.default_rng(seed)
    sources, left = {"domain": [], "general": []}, tokens
    while left > 0:
        n = int(min(left, rng.lognormal(5.5, 1.0) // 1 + 16, 2000))
        sources["domain" if rng.random() < 0.7 else "general"].append(
            rng.integers(3, len(tokenizer), size=n, dtype=np.int32)
        )
        left -= n
    t0 = time.perf_counter()
    write_prepared(
        folder,
        sources,
        seq,
        tokenizer_entry(tokenizer, "bench-tiny"),
        seed=seed,
        batch_documents=batch_documents,
        shards_per_source=8,
        roles={"general": "general"},
    )
    return {"seconds": round(time.perf_counter() - t0, 2), "documents": sum(len(d) for d in sources.values())}


def model_dir(work: Path, prepared: Path) -> Path:
    """A tiny random Llama with the prepared folder's tokenizer (the synthetic folder's, or the one the
    manifest names)."""
    from transformers import AutoTokenizer

    from cptkit.testing.tiny import make_tiny_llama

    folder = work / "model"
    if (folder / "config.json").is_file():
        return folder
    manifest = json.loads((prepared / "manifest.json").read_text())
    source = prepared.parent / "tokenizer"
    name = str(source) if source.is_dir() else manifest["tokenizer"]["name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(name)
    return make_tiny_llama(folder, tokenizer=tokenizer, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=2)


# --- what each subprocess measures -----------------------------------------------------------------


def measure_startup(prepared: Path, batch: int) -> dict:
    """Prepared.load, train_rows(), the first batch: seconds and RSS after each."""
    import pyarrow.compute  # noqa: F401  (imported on first use by the store's reads: not its memory)
    import pyarrow.ipc  # noqa: F401

    import cptkit.data.store  # noqa: F401
    import cptkit.data.view  # noqa: F401
    from cptkit.data.prepared import Prepared
    from cptkit.train.collator import PackedCollator

    out = {"rss_before_mib": rss_mib()}
    t0 = time.perf_counter()
    loaded = Prepared.load(prepared)
    out["load_s"] = time.perf_counter() - t0
    out["rss_after_load_mib"] = rss_mib()
    again = time.perf_counter()
    Prepared.load(prepared)  # the checks again, the files' headers now in the page cache
    out["load_again_s"] = time.perf_counter() - again
    t1 = time.perf_counter()
    rows = loaded.train_rows()
    out["train_rows_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    PackedCollator(pad_token_id=0)(rows.__getitems__(range(batch)))
    out["first_batch_s"] = time.perf_counter() - t2
    out["total_s"] = out["load_s"] + out["train_rows_s"] + out["first_batch_s"]
    out["rss_after_first_batch_mib"] = rss_mib()
    index = loaded._index
    out.update(
        rows=index.rows,
        segments=index.segments,
        tokens=index.tokens,
        store_files=len(index.shards),
        record_batches=len(loaded._space.pieces),
        index_bytes=sum(a.nbytes for a in index.arrays.values()),
    )
    for key in ("rss_before_mib", "rss_after_load_mib", "rss_after_first_batch_mib"):
        out[key] = {k: round(v, 1) for k, v in out[key].items()}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def _trainer(prepared: Path, model: Path, out: Path, max_steps: int, save_steps: int, batch: int):
    from cptkit.config import Config, build_config
    from cptkit.data.prepared import Prepared
    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.train.build import build_trainer

    cfg = build_config(
        Config,
        {
            "model": {"name_or_path": str(model)},
            "train": {
                "mode": "full",
                "dataset": str(prepared),
                "output_dir": str(out),
                "report_to": ["none"],
                "eval_steps": 10**9,
                "schedule": {"type": "constant", "warmup": 0},
                "hf": {
                    "max_steps": max_steps,
                    "per_device_train_batch_size": batch,
                    "learning_rate": 1e-3,
                    "logging_steps": 1000,
                    "save_steps": save_steps,
                    "save_total_limit": 1,
                    "dataloader_drop_last": True,
                },
            },
        },
    )
    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    rows = Prepared.load(prepared).train_rows()
    trainer, _ = build_trainer(cfg.train, loaded, rows, [], out)
    return trainer


def measure_train(prepared: Path, model: Path, out: Path, steps: int, batch: int) -> dict:
    """Train to `steps`, saving there; seconds it took."""
    t0 = time.perf_counter()
    trainer = _trainer(prepared, model, out, steps, steps, batch)
    trainer.train()
    assert (out / f"checkpoint-{steps}").is_dir(), f"no checkpoint-{steps} in {out}"
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 2)}


def measure_resume(prepared: Path, model: Path, out: Path, steps: int, batch: int) -> dict:
    """Resume from checkpoint-`steps`: seconds to the first new step and rows read until then."""
    from transformers import TrainerCallback

    from cptkit.data.view import PackedRows

    reads: list[int] = []
    gather = PackedRows.__getitems__

    def counted(self, indices):
        reads.extend(int(i) for i in indices)
        return gather(self, indices)

    PackedRows.__getitems__ = counted

    class FirstStep(TrainerCallback):
        at: float | None = None
        rows_read = 0
        step = 0

        def on_step_end(self, args, state, control, **kwargs):
            if self.at is None:
                self.at, self.rows_read, self.step = time.perf_counter(), len(reads), state.global_step
                control.should_training_stop = True

    built = time.perf_counter()
    trainer = _trainer(prepared, model, out, steps + 5, 10**9, batch)
    first = FirstStep()
    trainer.add_callback(first)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{steps}"))
    assert first.at is not None and first.step == steps + 1, (first.step, steps)
    return {
        "from_step": steps,
        "first_new_step_s": round(first.at - t0, 3),
        "build_trainer_s": round(t0 - built, 3),
        "rows_read_until_first_step": first.rows_read,
        "first_row_read": min(reads) if reads else None,
        "rows_skipped": steps * batch,
    }


# --- the driver --------------------------------------------------------------------------------------


def child(what: str, **kwargs) -> dict:
    """Run one measurement in a fresh interpreter; its JSON result."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        # one thread: a tiny model's matmuls run faster on one, and threads fight on a shared machine
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    argv = [sys.executable, str(Path(__file__).resolve()), "_child", what, json.dumps(kwargs, default=str)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(what: str, kwargs: dict) -> None:
    import logging

    logging.disable(logging.WARNING)
    paths = {k: Path(v) if k in ("prepared", "model", "out") else v for k, v in kwargs.items()}
    fn = {"startup": measure_startup, "train": measure_train, "resume": measure_resume}[what]
    print(json.dumps(fn(**paths)))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return run_child(sys.argv[2], json.loads(sys.argv[3]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prepared", type=Path, help="a prepared folder (default: build a synthetic one)")
    p.add_argument("--tokens", type=int, default=50_000_000, help="tokens of the synthetic folder")
    p.add_argument("--seq", type=int, default=128, help="row length of the synthetic folder")
    p.add_argument("--steps", type=int, default=10_000, help="the late checkpoint to resume from")
    p.add_argument("--early", type=int, default=10, help="the early checkpoint to resume from")
    p.add_argument("--batch", type=int, default=2, help="rows per step")
    p.add_argument("--work", type=Path, default=Path("/tmp/cptkit-bench-resume"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "resume.json")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--startup-only", action="store_true", help="measure the start-up only (no training)")
    p.add_argument("--batch-documents", type=int, default=1024, help="documents a record batch (synthetic)")
    args = p.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    prepared = args.prepared
    if prepared is None:
        prepared = args.work / "prepared"
        if not (prepared / "manifest.json").is_file():
            report["synthetic"] = build_synthetic(prepared, args.tokens, args.seq, args.batch_documents)
    report["startup"] = child("startup", prepared=prepared, batch=args.batch)
    report["train"], report["resume"] = {}, {}
    model = None if args.startup_only else model_dir(args.work, prepared)
    for steps in () if args.startup_only else (args.early, args.steps):
        run = args.work / f"run-{steps}"
        shutil.rmtree(run, ignore_errors=True)
        report["train"][steps] = child(
            "train", prepared=prepared, model=model, out=run, steps=steps, batch=args.batch
        )
        report["resume"][steps] = child(
            "resume", prepared=prepared, model=model, out=run, steps=steps, batch=args.batch
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\nwritten to {args.out}")
    if not args.keep and args.prepared is None:
        shutil.rmtree(args.work, ignore_errors=True)


def print_table(report: dict) -> None:
    s = report["startup"]
    print(
        f"\nprepared folder: {s['rows']:,} rows, {s['segments']:,} segments, {s['tokens']:,} tokens in "
        f"{s['store_files']} store files ({s['record_batches']:,} record batches); index {s['index_bytes'] / 2**20:.1f} MiB"
    )

    def mem(key: str) -> str:
        m = s[key]
        return f"{m['rss']:.0f} | {m['anon']:.0f} | {m['file']:.0f}"

    print("\n| start-up | seconds | RSS after, MiB | anonymous | file-backed |")
    print("|---|---:|---:|---:|---:|")
    print(f"| (imports done) | | {mem('rss_before_mib')} |")
    print(f"| Prepared.load | {s['load_s']:.3f} | {mem('rss_after_load_mib')} |")
    print(f"| Prepared.load again (headers cached) | {s['load_again_s']:.3f} | | | |")
    print(f"| train_rows() | {s['train_rows_s']:.4f} | | | |")
    print(f"| first batch | {s['first_batch_s']:.4f} | {mem('rss_after_first_batch_mib')} |")
    print(f"| **total** (load, train_rows, first batch) | **{s['total_s']:.3f}** | | | |")
    if not report["resume"]:
        return
    print(
        "\n| resume from step | training to it, s | build trainer, s | train(resume) to first new step, s | rows read | first row read |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for steps, r in report["resume"].items():
        t = report["train"][steps]
        print(
            f"| {int(steps):,} | {t['seconds']:.1f} | {r['build_trainer_s']:.2f} | {r['first_new_step_s']:.3f} | "
            f"{r['rows_read_until_first_step']} | {r['first_row_read']} |"
        )


if __name__ == "__main__":
    main()

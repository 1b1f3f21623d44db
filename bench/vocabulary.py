"""Does a domain vocabulary pay? SmolLM2-135M-Instruct, CPT with and without `data.vocabulary`, on a
Chinese technical corpus (the zh_CN manual pages of Debian's `manpages-zh`) and an English one (the
SQLite and PostgreSQL documentation), at equal characters seen (one epoch of the same text each).

    python bench/vocabulary.py data --out .bench/vocab          # here: the corpora (needs manpages-zh)
    python bench/vocabulary.py fertility --data .bench/vocab --tokenizer TOKENIZER_DIR   # here, CPU
    python bench/vocabulary.py run --data .bench/vocab --model MODEL_DIR --out /tmp/vocab   # on a GPU
    python bench/vocabulary.py table --results bench/results/vocabulary.json

`data` renders each manual page to plain text (`groff -Tutf8 -mandoc`, one document a page) and writes
`zh.jsonl.gz`, `en.jsonl.gz` (the SQLite and PostgreSQL documentation of ../shared/corpora) and
`austen.jsonl.gz` (general English text, never trained on: the general bits per byte).
`fertility` prepares each domain with and without the extension (prepare alone): tokens per 1,000
characters before and after, and the time the extension takes to learn.
`run`, for each domain and each of {base vocabulary, extended}: `cptkit prepare`, `cptkit train` (LoRA
r 16 on all linear layers, lr 1e-4; with the extension also the new rows, `train.new_tokens.train: new`,
at `train.embedding_lr` 1e-3), `cptkit merge`, `cptkit eval` of the base and the merged model: domain and
general bits per byte (tokenizers differ, so bits per byte, not perplexity, compares them), training
tokens/s and characters/s (tokens/s over the tokens a character costs: what decides wall-clock per corpus).
Results go to --results (JSON) and a table is printed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "vocabulary.json"
SHARED = HERE.parents[1] / "shared" / "corpora"
MANPAGES = Path("/usr/share/man/zh_CN")
DOMAINS = ("zh", "en")
EXTEND = {"zh": 4000, "en": 4000}
SEQ, BATCH = 1024, 16


def _write(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


def _read(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def pieces(text: str, size: int = 3000) -> list[str]:
    """`text` cut at paragraph ends into pieces of about `size` characters (general text to score on)."""
    out, current = [], ""
    for para in text.split("\n\n"):
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= size:
            out.append(current)
            current = ""
    return out + ([current] if current else [])


def render_manpage(path: Path) -> str:
    """One manual page as plain text: groff's UTF-8 rendering without overstrikes, blank runs squeezed."""
    raw = gzip.decompress(path.read_bytes())
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError:
        source = raw.decode("gb18030", errors="replace")
    out = subprocess.run(
        ["groff", "-Kutf8", "-Tutf8", "-mandoc", "-P-cbou", "-rLL=200n", "-Wall"],
        input=source.encode("utf-8"),
        capture_output=True,
        check=False,
    ).stdout.decode("utf-8", errors="replace")
    out = re.sub(r" {10,}", "  ", out)  # the header and footer lines' padding
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def make_data(out: Path) -> None:
    pages = sorted(p for p in MANPAGES.rglob("*.gz") if p.is_file())
    if not pages:
        sys.exit(f"no manual pages under {MANPAGES}: apt-get install manpages-zh")
    zh = [t for t in (render_manpage(p) for p in pages) if len(t) > 200]
    _write(out / "zh.jsonl.gz", zh)
    en = _read(SHARED / "sqlite_docs.jsonl.gz") + _read(SHARED / "postgresql15_docs.jsonl.gz")
    _write(out / "en.jsonl.gz", en)
    _write(out / "austen.jsonl.gz", [p for t in _read(SHARED / "austen.jsonl.gz") for p in pieces(t)][:400])
    for name, texts in (("zh", zh), ("en", en)):
        print(f"{name}: {len(texts)} documents, {sum(map(len, texts)):,} characters")


def data_section(data: Path, domain: str, tokenizer: str, out: Path, extend: int) -> dict[str, Any]:
    return {
        "tokenizer": tokenizer,
        "output_dir": str(out),
        "seq_length": SEQ,
        "heldout_fraction": 0.05,
        "heldout_max_documents": 100,
        "sources": [
            {"name": domain, "path": str(data / f"{domain}.jsonl.gz"), "role": "domain", "weight": 1},
            {"name": "austen", "path": str(data / "austen.jsonl.gz"), "role": "general", "weight": 0},
        ],
        "vocabulary": {"extend": extend},
    }


def _fertility(manifest: dict[str, Any], source: str) -> float:
    s = manifest["sources"][source]
    return 1000 * s["tokens"] / s["characters"]


def fertility(args) -> dict[str, Any]:
    from cptkit.config import Config, build_config
    from cptkit.data.prepare import prepare

    out: dict[str, Any] = {}
    for domain in DOMAINS:
        row = {}
        for variant, extend in (("base", 0), ("extended", EXTEND[domain])):
            folder = Path(args.work) / f"{domain}-{variant}"
            raw = {
                "run_dir": str(folder.parent / "run"),
                "data": data_section(Path(args.data), domain, args.tokenizer, folder, extend),
            }
            cfg = build_config(Config, raw)
            start = time.perf_counter()
            prepared = prepare(cfg.data, folder, force=True)
            row[variant] = {
                "seconds": round(time.perf_counter() - start, 1),
                "tokens_per_1k_chars": round(_fertility(prepared.manifest, domain), 1),
                "general_tokens_per_1k_chars": round(_fertility(prepared.manifest, "austen"), 1),
                "vocabulary": prepared.manifest.get("vocabulary"),
            }
        out[domain] = row
        b, e = row["base"], row["extended"]
        print(
            f"{domain}: {b['tokens_per_1k_chars']} -> {e['tokens_per_1k_chars']} tokens / 1k chars "
            f"(general {b['general_tokens_per_1k_chars']} -> {e['general_tokens_per_1k_chars']}); "
            f"prepare {b['seconds']} s -> {e['seconds']} s"
        )
    return out


def run_config(args, domain: str, variant: str) -> dict[str, Any]:
    work = Path(args.out) / f"{domain}-{variant}-{args.init}-{args.epochs}"
    extend = EXTEND[domain] if variant == "extended" else 0
    train: dict[str, Any] = {
        "mode": "lora",
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "schedule": {"type": "cosine", "warmup": 0.05},
        "gradient_checkpointing": False,
        "report_to": ["none"],
        "hf": {
            "learning_rate": 1e-4,
            "per_device_train_batch_size": BATCH,
            "num_train_epochs": args.epochs,
            "logging_steps": 10,
            "save_strategy": "no",
            "bf16": True,
        },
    }
    if extend:
        train["embedding_lr"] = 1e-3
        train["new_tokens"] = {"init": args.init, "train": "new"}
    return {
        "run_dir": str(work),
        "seed": 1234,
        "model": {"name_or_path": args.model, "dtype": "bfloat16", "attention": "auto"},
        "data": data_section(Path(args.data), domain, args.model, work / "data", extend),
        "train": train,
        "eval": {
            "batch_size": 32,
            "models": [
                {"name": "base", "path": args.model},
                {"name": "adapted", "path": str(work / "merged")},
            ],
        },
    }


def run_one(args, domain: str, variant: str) -> dict[str, Any]:
    from cptkit.commands import eval as eval_command
    from cptkit.commands import merge as merge_command
    from cptkit.commands import prepare as prepare_command
    from cptkit.commands import train as train_command
    from cptkit.config import Config, build_config

    raw = run_config(args, domain, variant)
    cfg = build_config(Config, raw, source=f"{domain}-{variant}")
    times = {}
    for name, command in (
        ("prepare", prepare_command),
        ("train", train_command),
        ("merge", merge_command),
        ("eval", eval_command),
    ):
        start = time.perf_counter()
        command.run(cfg)
        times[name] = round(time.perf_counter() - start, 1)
    work = Path(raw["run_dir"])
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    meta = json.loads((work / "train" / "run_meta.json").read_text())
    results = json.loads((work / "eval" / "results.json").read_text())
    final = meta.get("final") or {}
    per_1k = _fertility(manifest, domain)
    bpb = {
        (r["model"], r["set"]): r["bits_per_byte"] for r in results.get("results", []) if "bits_per_byte" in r
    }
    return {
        "domain": domain,
        "variant": variant,
        "extend": raw["data"]["vocabulary"]["extend"],
        "init": args.init if variant == "extended" else None,
        "epochs": args.epochs,
        "tokens_per_1k_chars": round(per_1k, 1),
        "trained_tokens": final.get("trained_tokens"),
        "tokens_per_second": final.get("tokens_per_second"),
        "chars_per_second": round(final["tokens_per_second"] * 1000 / per_1k)
        if final.get("tokens_per_second")
        else None,
        "seconds": times,
        "bpb": {f"{m}/{s}": round(v, 4) for (m, s), v in bpb.items()},
        "vocabulary": manifest.get("vocabulary"),
    }


def run(args) -> None:
    path = Path(args.results)
    done = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    for domain in args.domains:
        for variant in args.variants:
            record = run_one(args, domain, variant)
            key = (domain, variant, record["init"], args.epochs)
            done["runs"] = [
                r for r in done["runs"] if (r["domain"], r["variant"], r["init"], r.get("epochs", 1)) != key
            ] + [record]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done, indent=1, ensure_ascii=False))
            print(json.dumps(record, ensure_ascii=False), flush=True)
    print_table(done)


def print_table(done: dict[str, Any]) -> None:
    print(
        "| domain | vocabulary | epochs | tokens / 1k chars | domain bpb base -> CPT | general bpb base -> CPT | tokens/s | chars/s | train s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in done["runs"]:
        b = r["bpb"]
        d, g = r["domain"], "austen"
        print(
            f"| {d} | {r['variant']}{' +' + str(r['extend']) + ' ' + r['init'] if r['extend'] else ''} "
            f"| {r.get('epochs', 1)} | {r['tokens_per_1k_chars']} "
            f"| {b.get(f'base/{d}')} -> {b.get(f'adapted/{d}')} | {b.get(f'base/{g}')} -> {b.get(f'adapted/{g}')} "
            f"| {r['tokens_per_second']} | {r['chars_per_second']} | {r['seconds']['train']} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default=".bench/vocab")
    f = sub.add_parser("fertility")
    f.add_argument("--data", default=".bench/vocab")
    f.add_argument("--tokenizer", required=True)
    f.add_argument("--work", default="/tmp/cptkit-vocab-fertility")
    f.add_argument("--results", default=str(RESULTS))
    r = sub.add_parser("run")
    r.add_argument("--data", default=".bench/vocab")
    r.add_argument("--model", required=True)
    r.add_argument("--out", default="/tmp/cptkit-vocab")
    r.add_argument("--init", default="mean", choices=["mean", "mean_noise"])
    r.add_argument(
        "--epochs", type=int, default=1, help="epochs over the domain (the same for every variant)"
    )
    r.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    r.add_argument("--variants", nargs="+", default=["base", "extended"], choices=["base", "extended"])
    r.add_argument("--results", default=str(RESULTS))
    t = sub.add_parser("table")
    t.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.what == "data":
        make_data(Path(args.out))
    elif args.what == "fertility":
        result = fertility(args)
        path = Path(args.results)
        done = json.loads(path.read_text()) if path.is_file() else {"runs": []}
        done["fertility"] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1, ensure_ascii=False))
    elif args.what == "run":
        run(args)
    else:
        print_table(json.loads(Path(args.results).read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

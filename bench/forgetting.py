"""The forgetting study: how much of the domain a run learns against how much general ability it loses,
for replay shares, LoRA and full fine-tuning, and cptkit's regularizers, on a real pretrained model.

    python bench/forgetting.py data --corpora ../shared/corpora --out .bench/forgetting   # CPU, seconds
    python bench/forgetting.py run --data .bench/forgetting --model MODEL_DIR --out OUT   # on the GPU
    python bench/forgetting.py table --results bench/results/forgetting.json             # table + plot

`data` writes the study's inputs: the domain corpus (SQLite and PostgreSQL documentation), the replay
corpus (the KJV bible, in pieces of about 3,000 characters), the general evaluation corpus (Jane
Austen, in pieces likewise; never trained on by any run) and a multiple-choice cloze task built from
Austen pieces that are held out of the evaluation corpus (`bench/make_cloze_task.py`).

`run` trains every run of the grid with `cptkit run` (prepare -> train -> eval -> report), in this
process, one after another: replay 0 / 1 / 5 / 25% x {lora, full} x {no regularizer, kl_to_base,
l2_to_base, ewc}, self-replay at 5% against the bible at 5%, then the interpolation sweep of the
runs named in INTERPOLATE. Each finished run is appended to the results JSON at once (a rerun skips
the runs it holds, so the grid can be spread over several calls). For each run: the domain and general
perplexity change with their bootstrap intervals, the cloze accuracy against the base, tokens and time.

`table` prints the table and writes a scatter plot (domain gain against general change) beside the JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.forgetting")
SHARES = (0.0, 0.01, 0.05, 0.25)
MODES = ("lora", "full")
LEARNING_RATE = {"lora": 1e-4, "full": 2e-5}  # the shipped presets' rates (lora-all-linear-8b, full-zero3-8b)
SEQ, BATCH = 1024, 16
CLOZE_TASK = "austen_cloze"


# ---------------------------------------------------------------- data (here, on CPU)
def pieces(text: str, size: int = 3000) -> list[str]:
    """`text` cut at paragraph ends (at sentence ends where it has no paragraphs, as the bible's books)
    into pieces of about `size` characters."""
    parts, joiner = re.split(r"\n\s*\n", text), "\n\n"
    if len(parts) == 1:
        parts, joiner = re.split(r"(?<=[.!?])\s+", text), " "
    out, current = [], ""
    for part in (p.strip() for p in parts):
        if not part:
            continue
        current = f"{current}{joiner}{part}" if current else part
        if len(current) >= size:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def _read(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _write(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def make_data(corpora: Path, out: Path, cloze_questions: int) -> None:
    domain = _read(corpora / "sqlite_docs.jsonl.gz") + _read(corpora / "postgresql15_docs.jsonl.gz")
    bible = [p for book in _read(corpora / "kjv_bible.jsonl.gz") for p in pieces(book)]
    austen = [p for novel in _read(corpora / "austen.jsonl.gz") for p in pieces(novel)]
    # every other Austen piece is evaluation text; the others make the cloze questions, so the
    # perplexity set and the task never share a sentence
    _write(out / "domain.jsonl.gz", domain)
    _write(out / "bible.jsonl.gz", bible)
    _write(out / "austen.jsonl.gz", austen[0::2])
    _write(out / "austen_for_cloze.jsonl.gz", austen[1::2])
    sys.path.insert(0, str(Path(__file__).parent))
    import make_cloze_task

    cloze = [
        "--out",
        str(out / "tasks"),
        "--name",
        CLOZE_TASK,
        "--count",
        str(cloze_questions),
        "--seed",
        "0",
    ]
    make_cloze_task.main([*cloze, "--corpus", str(out / "austen_for_cloze.jsonl.gz")])
    print(
        f"{out}: {len(domain)} domain documents, {len(bible)} bible pieces, {len(austen[0::2])} Austen "
        f"pieces for evaluation, a cloze task of {cloze_questions} questions"
    )


# ---------------------------------------------------------------- the grid
def grid(quick: bool) -> list[dict[str, Any]]:
    """Every run of the study: name, mode, replay share, replay kind, regularizer and its weight."""
    runs = []
    regs = {"none": None, "kl": 1.0, "l2": 1.0, "ewc": 1.0}
    for mode in MODES:
        for share in SHARES:
            for reg, weight in regs.items():
                if share == 0 and reg == "ewc":
                    continue  # EWC's Fisher comes from general training rows: there are none
                if quick and reg != "none" and share != 0.05:
                    continue
                runs.append({"mode": mode, "share": share, "replay": "bible", "reg": reg, "weight": weight})
        runs.append({"mode": mode, "share": 0.05, "replay": "self", "reg": "none", "weight": None})
    # what `cptkit run` does untuned (every train setting at its default: lr 2e-5, warmup 10%), with
    # the 5% of general replay the README recommends
    runs.append(
        {"mode": "lora", "share": 0.05, "replay": "bible", "reg": "none", "weight": None, "default": True}
    )
    for r in runs:
        r["name"] = run_name(r)
    return runs


def run_name(r: dict[str, Any]) -> str:
    if r.get("default"):
        return "default-replay5"
    reg = "" if r["reg"] == "none" else f"-{r['reg']}{r['weight']:g}"
    replay = "self" if r["replay"] == "self" else "replay"
    return f"{r['mode']}-{replay}{round(r['share'] * 100):g}{reg}"


# the runs whose base/adapted interpolation is swept after the grid
INTERPOLATE = ("lora-replay0", "full-replay5")
SCALES = [0.25, 0.5, 0.75, 1.0]


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_config(r: dict[str, Any], data: Path, out: Path, model: str, steps: int, interpolate: bool) -> dict:
    share = r["share"]
    sources = [
        {"name": "dbdocs", "path": str(data / "domain.jsonl.gz"), "role": "domain", "weight": 1 - share},
        {"name": "austen", "path": str(data / "austen.jsonl.gz"), "role": "general", "weight": 0},
    ]
    if r["replay"] == "self":
        sources.append(
            {
                "name": "selfgen",
                "type": "self_replay",
                "role": "general",
                "weight": share,
                "self_replay": {"documents": 1024, "max_new_tokens": 256, "batch_size": 256},
            }
        )
    else:  # at share 0 the bible is a held-out set only: general text the run never trains on
        sources.append(
            {"name": "bible", "path": str(data / "bible.jsonl.gz"), "role": "general", "weight": share}
        )
    regularize = {}
    if r["reg"] != "none":
        key = {"kl": "kl_to_base", "l2": "l2_to_base", "ewc": "ewc"}[r["reg"]]
        regularize[key] = {"weight": r["weight"]}
        if r["reg"] == "kl" and share == 0:
            regularize[key]["tokens"] = "all"  # no replay tokens to keep close to the base
    run_dir = out / "runs" / r["name"]
    data_dir = out / "data" / f"{r['replay']}{round(share * 100):g}"
    train: dict[str, Any] = {
        "mode": r["mode"],
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "schedule": {"type": "cosine", "warmup": 0.05},
        "hf": {"learning_rate": LEARNING_RATE[r["mode"]]},
    }
    if r.get("default"):
        train = {"mode": "lora", "hf": {}}
    train.update(
        gradient_checkpointing=False,
        eval_steps=max(steps // 4, 1),
        report_to=["none"],
        forgetting_budget=0.01,
        regularize=regularize,
    )
    train["hf"].update(
        per_device_train_batch_size=BATCH,
        max_steps=steps,
        logging_steps=10,
        save_steps=max(steps // 4, 1),
        save_total_limit=2,
        bf16=_on_gpu(),
    )
    return {
        "run_dir": str(run_dir),
        "seed": 1234,
        "model": {
            "name_or_path": model,
            "dtype": "bfloat16" if _on_gpu() else "float32",
            "attention": "auto",
        },
        "data": {
            "tokenizer": model,
            "output_dir": str(data_dir),
            "sources": sources,
            "seq_length": SEQ,
            "mix": "upsample",
            "heldout_fraction": 0.05,
            "heldout_max_documents": 200,
        },
        "train": train,
        "eval": {
            "batch_size": 32,
            "models": [
                {"name": "base", "path": model},
                {"name": "adapted", "path": model, "adapter": str(run_dir / "train")}
                if r["mode"] != "full"
                else {"name": "adapted", "path": str(run_dir / "train")},
            ],
            "tasks": [{"name": CLOZE_TASK, "include": str(data / "tasks")}],
            "interpolate": SCALES if interpolate else [],
        },
    }


def _config(r: dict[str, Any], args) -> tuple[dict[str, Any], Any]:
    from cptkit.config import Config, build_config

    raw = run_config(r, Path(args.data), Path(args.out), args.model, args.steps, r["name"] in INTERPOLATE)
    return raw, build_config(Config, raw, source=r["name"])


def prepare_all(runs: list[dict[str, Any]], args) -> None:
    """Each replay share's prepared folder, once, before the runs (which share them) start."""
    from cptkit.commands import prepare

    seen = set()
    for r in runs:
        raw, cfg = _config(r, args)
        if raw["data"]["output_dir"] not in seen:
            seen.add(raw["data"]["output_dir"])
            prepare.run(cfg)


def run_one(r: dict[str, Any], args) -> dict:
    """`cptkit train` then `cptkit eval` of one run of the grid; its numbers."""
    from cptkit.commands import eval as eval_command
    from cptkit.commands import train as train_command

    raw, cfg = _config(r, args)
    start = time.perf_counter()
    train_command.run(cfg)
    eval_command.run(cfg)
    seconds = time.perf_counter() - start
    run_dir = Path(raw["run_dir"])
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    meta = json.loads((run_dir / "train" / "run_meta.json").read_text())
    record = {**r, "seconds": round(seconds, 1), **summarize(results, meta)}
    _free_disk(run_dir)
    return record


def summarize(results: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The numbers the study compares, from a run's results.json and run_meta.json."""
    final = meta.get("final") or {}
    out: dict[str, Any] = {
        "trained_tokens": final.get("trained_tokens"),
        "train_runtime_s": final.get("train_runtime_s"),
        "tokens_per_second": final.get("tokens_per_second"),
        "forgetting_budget": final.get("forgetting_budget") or meta.get("forgetting_budget"),
        "sets": {},
    }
    for d in results.get("deltas", []):
        if d.get("model") != "adapted" and not str(d.get("model", "")).startswith("interpolated"):
            continue
        out["sets"].setdefault(d["model"], {})[d["set"]] = {
            k: d.get(k) for k in ("role", "perplexity_change", "perplexity_change_interval")
        }
    out["tasks"] = results.get("tasks", {})
    out["interpolation"] = results.get("interpolation")
    return out


def _free_disk(run_dir: Path) -> None:
    for folder in (run_dir / "train").glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(run_dir / "merged", ignore_errors=True)


def read_results(path: Path) -> dict[str, Any]:
    """The results JSON and its shards' parts (`<name>.part<i>.json`), runs merged in grid order."""
    done = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    by_name = {r["name"]: r for r in done["runs"]}
    for part in sorted(path.parent.glob(f"{path.stem}.part*.json")):
        for r in json.loads(part.read_text())["runs"]:
            by_name.setdefault(r["name"], r)
    order = {r["name"]: i for i, r in enumerate(grid(quick=False))}
    done["runs"] = sorted(by_name.values(), key=lambda r: order.get(r["name"], len(order)))
    return done


def run_grid(args) -> None:
    results_path = Path(args.results)
    names = {r["name"] for r in read_results(results_path)["runs"] if "error" not in r}
    todo = [r for r in grid(args.quick) if r["name"] not in names]
    if args.only:
        todo = [r for r in todo if re.fullmatch(args.only, r["name"])]
    index, count = (int(x) for x in args.shard.split("/"))
    if args.prepare_only or count == 1:  # shards share the prepared folders: prepared first, by one process
        prepare_all(todo, args)
    if args.prepare_only:
        return
    todo = todo[index::count]
    if count > 1:
        results_path = results_path.with_name(f"{results_path.stem}.part{index}.json")
    done = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    done["runs"] = [r for r in done["runs"] if r["name"] not in {t["name"] for t in todo}]
    deadline = time.monotonic() + args.budget_s
    for r in todo:
        if time.monotonic() > deadline:
            log.warning("time budget spent: %d runs left for the next call", len(todo) - todo.index(r))
            break
        log.info("run %s", r["name"])
        try:
            record = run_one(r, args)
        except Exception as e:  # one failed run is recorded, the grid goes on
            log.exception("run %s failed", r["name"])
            record = {**r, "error": f"{type(e).__name__}: {e}"}
        done["runs"].append(record)
        done.update(
            steps=args.steps, seq_length=SEQ, batch=BATCH, learning_rate=LEARNING_RATE, model=args.model
        )
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(done, indent=1))
        print_table(done)


# ---------------------------------------------------------------- table and plot
def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def _set_change(
    record: dict[str, Any], role: str, model: str = "adapted"
) -> tuple[float | None, list | None]:
    """The perplexity change (and its interval) of `model` on the domain set, or on Austen for `general`
    (the general text no run trains on)."""
    sets = (record.get("sets") or {}).get(model) or {}
    name = (
        "austen" if role == "general" else next((n for n, v in sets.items() if v.get("role") == role), None)
    )
    found = sets.get(name) or {}
    return found.get("perplexity_change"), found.get("perplexity_change_interval")


def _accuracy(record: dict[str, Any], model: str, metric: str = "acc") -> float | None:
    task = ((record.get("tasks") or {}).get(model) or {}).get(CLOZE_TASK) or {}
    return (task.get(metric) or {}).get("value")


def _change(x: float | None, interval: list | None = None) -> str:
    if x is None:
        return ""
    return _pct(x) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]" if interval else "")


def print_table(done: dict[str, Any]) -> list[str]:
    head = (
        "| run | domain ppl (dbdocs) | general ppl (Austen, never trained) | bible ppl | cloze acc | "
        "cloze acc_norm | tokens | tokens/s | s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in done["runs"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        bible = ((r.get("sets") or {}).get("adapted") or {}).get("bible") or {}
        cloze = []
        for metric in ("acc", "acc_norm"):
            base, after = _accuracy(r, "base", metric), _accuracy(r, "adapted", metric)
            cloze.append("" if after is None else f"{100 * (base or 0):.1f} -> {100 * after:.1f}")
        speed = r.get("tokens_per_second")
        lines.append(
            f"| {r['name']} | {_change(*_set_change(r, 'domain'))} | {_change(*_set_change(r, 'general'))} "
            f"| {_change(bible.get('perplexity_change'))} | {cloze[0]} | {cloze[1]} "
            f"| {r.get('trained_tokens') or ''} | {'' if speed is None else f'{speed:,.0f}'} | {r.get('seconds', '')} |"
        )
    for r in done["runs"]:
        points = (r.get("interpolation") or {}).get("points") or []
        if points:
            lines += ["", f"Interpolation of {r['name']} (base + s x update):", ""]
            lines += [
                "| scale | domain ppl | general ppl (all general sets) | cloze acc |",
                "|---:|---:|---:|---:|",
            ]
            for p in points:
                acc = _accuracy(r, p["model"])
                lines.append(
                    f"| {p['scale']:g} | {_pct(p['domain_change'])} | {_pct(p['general_change'])} "
                    f"| {'' if acc is None else f'{100 * acc:.1f}'} |"
                )
    print("\n".join(lines))
    return lines


def plot(done: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    markers = {"none": "o", "kl": "s", "l2": "^", "ewc": "D"}
    colours = {"lora": "tab:blue", "full": "tab:red"}
    for r in done["runs"]:
        dom, _ = _set_change(r, "domain")
        gen, _ = _set_change(r, "general")
        if dom is None or gen is None:
            continue
        ax.scatter(100 * gen, -100 * dom, marker=markers[r["reg"]], color=colours[r["mode"]], s=40)
        ax.annotate(r["name"], (100 * gen, -100 * dom), fontsize=6, xytext=(3, 3), textcoords="offset points")
        interp = r.get("interpolation") or {}
        points = interp.get("points") or []
        if points:
            xs = [100 * p["general_change"] for p in points]
            ys = [-100 * p["domain_change"] for p in points]
            ax.plot([0, *xs], [0, *ys], color=colours[r["mode"]], alpha=0.4, linestyle="--")
    ax.axvline(1.0, color="grey", linestyle=":", label="budget +1%")
    ax.set_xlabel("general perplexity change on Austen (%)")
    ax.set_ylabel("domain perplexity reduction (%)")
    ax.set_title("Domain gain against general change (o none, s kl, ^ l2, D ewc; blue lora, red full)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--corpora", default=str(Path(__file__).parents[2] / "shared" / "corpora"))
    d.add_argument("--out", default=".bench/forgetting")
    d.add_argument("--questions", type=int, default=300)
    r = sub.add_parser("run")
    r.add_argument("--data", default=".bench/forgetting")
    r.add_argument("--model", required=True)
    r.add_argument("--out", required=True, help="work folder (runs and prepared data)")
    r.add_argument("--results", default="bench/results/forgetting.json")
    r.add_argument("--steps", type=int, default=150)
    r.add_argument("--quick", action="store_true", help="regularizers at 5%% replay only")
    r.add_argument("--only", help="a regular expression of run names")
    r.add_argument("--budget-s", type=float, default=1e9, help="start no run after this many seconds")
    r.add_argument("--shard", default="0/1", help="i/n: this process runs every n-th run from the i-th")
    r.add_argument("--prepare-only", action="store_true", help="prepare every share's data, then stop")
    t = sub.add_parser("table")
    t.add_argument("--results", default="bench/results/forgetting.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "data":
        make_data(Path(args.corpora), Path(args.out), args.questions)
    elif args.command == "run":
        run_grid(args)
    else:
        done = read_results(Path(args.results))
        Path(args.results).write_text(json.dumps(done, indent=1))
        print_table(done)
        plot(done, Path(args.results).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GRPO on a small real task: SmolLM2-135M-Instruct learns to answer two-number arithmetic with the number
alone ("What is 23 + 58? Answer with the number only."), from rewards only.

    python bench/grpo.py data --out .bench/grpo                                  # here: the prompt files
    python bench/grpo.py run --data .bench/grpo --model MODEL_DIR --out /tmp/grpo  # on a GPU, ~3-4 min
    python bench/grpo.py table --runs /tmp/grpo [--results bench/results/grpo.json]

`data` writes `train.jsonl` and `heldout.jsonl` (records `{"prompt", "answer"}`; additions and subtractions of
two numbers of 10-99, the subtraction never negative; no held-out question is also a training one), the
same files for the same --seed.
`run` writes `config.yaml` into --out and runs `cptkit grpo` on it: LoRA r 16 on all linear layers, groups
of 8 completions, 8 prompts a step, 150 steps, at most 24 new tokens, temperature 1.0, KL coefficient
0.04; rewards `numeric` (the last number written equals the answer, weight 1), `number_only` (the whole
completion is one number, weight 0.2) and `exact_answer` (the completion is exactly the answer, weight 0:
scored and logged, never trained on: the exact-answer rate). Then `table`.
`table` reads each run folder's grpo_scores.json, metrics.jsonl, run_meta.json and the bench's
bench_run.json into --results: held-out reward before -> after, the exact-answer and correct-number rates
before/after, steps, seconds, generated tokens/s (mean completion length x completions per step x steps /
seconds) and peak memory where the run logged it; and prints the table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "grpo.json"
TRAIN_PROMPTS, HELDOUT_PROMPTS = 2000, 128
QUESTION = "What is {a} {op} {b}? Answer with the number only."
BENCH_RUN = "bench_run.json"

REWARDS = [
    {"type": "numeric", "name": "numeric", "weight": 1.0},
    {"type": "format", "name": "number_only", "weight": 0.2, "pattern": r"\s*-?\d+\.?\s*"},
    {"type": "exact", "name": "exact_answer", "weight": 0.0},
]


def question(rng: random.Random) -> tuple[str, str]:
    """(question, answer) of one random addition or subtraction of two numbers of 10-99."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return QUESTION.format(a=a, op="+", b=b), str(a + b)
    a, b = max(a, b), min(a, b)
    return QUESTION.format(a=a, op="-", b=b), str(a - b)


def make_prompts(seed: int, train: int, heldout: int) -> tuple[list[dict], list[dict]]:
    """`train` and `heldout` distinct questions (the held-out ones never in training), deterministic in
    `seed`."""
    rng = random.Random(seed)
    seen: dict[str, str] = {}
    if train + heldout > 2 * 90 * 90:
        raise SystemExit(f"only {2 * 90 * 90} distinct questions; asked for {train + heldout}")
    while len(seen) < train + heldout:
        q, a = question(rng)
        seen.setdefault(q, a)
    records = [{"prompt": q, "answer": a} for q, a in seen.items()]
    return records[heldout:], records[:heldout]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def make_data(args) -> None:
    train, heldout = make_prompts(args.seed, args.train, args.heldout)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    print(f"{len(train)} training and {len(heldout)} held-out prompts in {out}")


def run_config(args) -> dict[str, Any]:
    """The config `run` writes: the grpo section on the model given, LoRA, rewards above."""
    data, out = Path(args.data), Path(args.out)
    return {
        "run_dir": str(out),
        "seed": args.seed,
        "model": {"name_or_path": args.model, "dtype": "bfloat16", "attention": "auto"},
        "grpo": {
            "model": args.model,
            "output_dir": str(out / "grpo"),
            "prompts": str(data / "train.jsonl"),
            "heldout_prompts": str(data / "heldout.jsonl"),
            "heldout_max": args.heldout,
            "template": "chat",
            "rewards": REWARDS,
            "num_generations": args.group,
            "max_completion_length": args.max_new_tokens,
            "temperature": 1.0,
            "beta": args.beta,
            "generation": args.generation,
            "mode": "lora",
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "gradient_checkpointing": False,
            "report_to": ["none"],
            "hf": {
                "learning_rate": args.lr,
                "per_device_train_batch_size": args.group * args.prompts_per_step,
                "max_steps": args.steps,
                "logging_steps": 5,
                "save_strategy": "no",
                "bf16": True,
            },
        },
    }


def run(args) -> None:
    import yaml

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = run_config(args)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cptkit", "grpo", str(config)], check=False)
    seconds = round(time.perf_counter() - start, 1)
    bench_run = {
        "model": args.model,
        "steps": args.steps,
        "group": args.group,
        "completions_per_step": args.group * args.prompts_per_step,
        "max_new_tokens": args.max_new_tokens,
        "generation": args.generation,
        "command_seconds": seconds,
        "returncode": done.returncode,
    }
    (out / BENCH_RUN).write_text(json.dumps(bench_run, indent=1), encoding="utf-8")
    if done.returncode != 0:
        raise SystemExit(f"cptkit grpo failed (exit {done.returncode}) after {seconds} s; see above")
    write_table([out], Path(args.results))


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("type", "train") == "train":
                rows.append(row)
    return rows


def summarize(run_dir: Path) -> dict[str, Any]:
    """One run folder's row: held-out rewards before -> after, training steps, time, speed, memory."""
    grpo = run_dir / "grpo"
    scores, meta, bench = (
        _read(grpo / "grpo_scores.json"),
        _read(grpo / "run_meta.json"),
        _read(run_dir / BENCH_RUN),
    )
    rows = _metrics(grpo / "metrics.jsonl")
    if not scores:
        raise SystemExit(f"{grpo / 'grpo_scores.json'} does not exist: run `python bench/grpo.py run` first")
    before, after = scores.get("before") or {}, scores.get("after") or {}

    def rate(side: dict[str, Any], name: str) -> float | None:
        return (side.get("rewards") or {}).get(name)

    steps = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=None)
    seconds = meta.get("seconds")
    lengths = [
        r["completions/mean_length"]
        for r in rows
        if isinstance(r.get("completions/mean_length"), (int, float))
    ]
    per_step = bench.get("completions_per_step")
    generated = statistics.mean(lengths) * per_step * steps if lengths and per_step and steps else None
    memory = [r["peak_memory_gb"] for r in rows if isinstance(r.get("peak_memory_gb"), (int, float))]
    rewards = [r["reward"] for r in rows if isinstance(r.get("reward"), (int, float))]
    return {
        "run": run_dir.name,
        "model": bench.get("model") or before.get("model"),
        "generation": bench.get("generation"),
        "heldout_prompts": scores.get("prompts"),
        "reward_before": before.get("reward"),
        "reward_after": after.get("reward"),
        "exact_before": rate(before, "exact_answer"),
        "exact_after": rate(after, "exact_answer"),
        "correct_number_before": rate(before, "numeric"),
        "correct_number_after": rate(after, "numeric"),
        "completion_chars_before": before.get("completion_chars"),
        "completion_chars_after": after.get("completion_chars"),
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last": rewards[-1] if rewards else None,
        "steps": steps,
        "seconds": seconds,
        "command_seconds": bench.get("command_seconds"),
        "generated_tokens_per_second": round(generated / seconds, 1) if generated and seconds else None,
        "peak_memory_gb": max(memory) if memory else None,
        "samples": (scores.get("samples") or [])[:4],
    }


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def table_lines(runs: list[dict[str, Any]]) -> list[str]:
    head = (
        "| run | held-out reward | exact answer | correct number | completion chars | steps | s | "
        "generated tokens/s | peak GB |"
    )
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:

        def arrow(key: str, spec: str = ".3f", r: dict[str, Any] = r) -> str:
            return f"{_fmt(r[f'{key}_before'], spec)} -> {_fmt(r[f'{key}_after'], spec)}"

        out.append(
            f"| {r['run']} | {arrow('reward')} | {arrow('exact', '.1%')} | {arrow('correct_number', '.1%')} | "
            f"{arrow('completion_chars', '.1f')} | {_fmt(r['steps'], 'd')} | {_fmt(r['seconds'], '.0f')} | "
            f"{_fmt(r['generated_tokens_per_second'], ',.0f')} | {_fmt(r['peak_memory_gb'], '.1f')} |"
        )
    return out


def write_table(run_dirs: list[Path], results: Path) -> dict[str, Any]:
    done = {
        "task": "two-number arithmetic, answer with the number only",
        "runs": [summarize(d) for d in run_dirs],
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(done, indent=1), encoding="utf-8")
    print("\n".join(table_lines(done["runs"])))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default=".bench/grpo")
    d.add_argument("--seed", type=int, default=1234)
    d.add_argument("--train", type=int, default=TRAIN_PROMPTS)
    d.add_argument("--heldout", type=int, default=HELDOUT_PROMPTS)
    r = sub.add_parser("run")
    r.add_argument("--data", default=".bench/grpo")
    r.add_argument("--model", required=True, help="SmolLM2-135M-Instruct's folder")
    r.add_argument("--out", default="/tmp/cptkit-grpo")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--steps", type=int, default=150)
    r.add_argument("--group", type=int, default=8, help="completions per prompt (num_generations)")
    r.add_argument("--prompts-per-step", type=int, default=8)
    r.add_argument("--max-new-tokens", type=int, default=24)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--beta", type=float, default=0.04)
    r.add_argument("--heldout", type=int, default=HELDOUT_PROMPTS)
    r.add_argument("--generation", default="auto", choices=["auto", "transformers", "vllm"])
    r.add_argument("--results", default=str(RESULTS))
    t = sub.add_parser("table")
    t.add_argument("--runs", nargs="+", required=True, help="run folders `run` wrote (--out)")
    t.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.what == "data":
        make_data(args)
    elif args.what == "run":
        run(args)
    else:
        write_table([Path(x) for x in args.runs], Path(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

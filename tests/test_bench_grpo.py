"""bench/grpo.py's pure parts: the prompt files (deterministic, right answers, held-out apart from
training), the config it runs (a valid cptkit config), and the table from files written as the GRPO
contract says."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_grpo", ROOT / "bench" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_grpo"] = module
    spec.loader.exec_module(module)
    return module


bench = _load()
QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\? Answer with the number only\.")


def test_prompts_are_deterministic_right_and_held_out_apart(tmp_path):
    train, heldout = bench.make_prompts(7, 300, 40)
    again = bench.make_prompts(7, 300, 40)
    assert (train, heldout) == again and bench.make_prompts(8, 300, 40) != (train, heldout)
    assert len(train) == 300 and len(heldout) == 40
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    ops = set()
    for r in train + heldout:
        a, op, b = QUESTION.fullmatch(r["prompt"]).groups()
        ops.add(op)
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    assert ops == {"+", "-"}

    bench.main(["data", f"--out={tmp_path}", "--seed=7", "--train=300", "--heldout=40"])
    lines = (tmp_path / "heldout.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == heldout


def test_run_config_is_a_valid_grpo_config(tmp_path):
    from cptkit.config import Config, build_config

    bench.main(["data", f"--out={tmp_path / 'data'}", "--train=50", "--heldout=10"])
    args = bench.main.__globals__["argparse"].Namespace(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "run"),
        model="SmolLM2-135M-Instruct",
        seed=1,
        steps=150,
        group=8,
        prompts_per_step=8,
        max_new_tokens=24,
        lr=1e-4,
        beta=0.04,
        heldout=10,
        generation="auto",
    )
    cfg = build_config(Config, bench.run_config(args))
    g = cfg.grpo
    assert g.num_generations == 8 and g.hf["per_device_train_batch_size"] == 64 and g.hf["max_steps"] == 150
    assert [(r.name, r.weight) for r in g.rewards] == [
        ("numeric", 1.0),
        ("number_only", 0.2),
        ("exact_answer", 0.0),
    ]
    assert re.fullmatch(g.rewards[1].pattern, " 81 ") and not re.fullmatch(g.rewards[1].pattern, "It is 81")


def _fabricated_run(folder: Path) -> Path:
    grpo = folder / "grpo"
    grpo.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "reward": 0.2 + 0.01 * s,
            "completions/mean_length": 20.0 - s / 10,
            "peak_memory_gb": 3.0 + s / 100,
        }
        for s in range(5, 151, 5)
    ]
    (grpo / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 155, "rew')
    (grpo / "run_meta.json").write_text(json.dumps({"status": "complete", "stage": "grpo", "seconds": 150.0}))
    side = {
        "before": {
            "model": "m",
            "reward": 0.3,
            "rewards": {"numeric": 0.25, "number_only": 0.25, "exact_answer": 0.125},
            "completion_chars": 40.0,
        },
        "after": {
            "model": "grpo",
            "reward": 1.1,
            "rewards": {"numeric": 0.9, "number_only": 1.0, "exact_answer": 0.875},
            "completion_chars": 2.5,
        },
    }
    scores = {
        "rewards": bench.REWARDS,
        "sampling": {"greedy": True, "max_new_tokens": 24},
        "prompts": 128,
        **side,
        "samples": [],
    }
    (grpo / "grpo_scores.json").write_text(json.dumps(scores))
    (folder / bench.BENCH_RUN).write_text(
        json.dumps({"model": "m", "completions_per_step": 64, "generation": "vllm"})
    )
    return folder


def test_table_from_fabricated_run_files(tmp_path, capsys):
    run = _fabricated_run(tmp_path / "smollm")
    done = bench.write_table([run], tmp_path / "grpo.json")
    r = json.loads((tmp_path / "grpo.json").read_text())["runs"][0]
    assert r == done["runs"][0]
    assert (r["reward_before"], r["reward_after"]) == (0.3, 1.1)
    assert (r["exact_before"], r["exact_after"]) == (0.125, 0.875)
    assert (r["correct_number_before"], r["correct_number_after"]) == (0.25, 0.9)
    assert r["steps"] == 150 and r["seconds"] == 150.0 and r["peak_memory_gb"] == pytest.approx(4.5)
    mean_length = sum(20.0 - s / 10 for s in range(5, 151, 5)) / 30
    assert r["generated_tokens_per_second"] == pytest.approx(round(mean_length * 64 * 150 / 150.0, 1))
    assert r["train_reward_first"] == pytest.approx(0.25) and r["train_reward_last"] == pytest.approx(1.7)
    table = capsys.readouterr().out
    assert "| smollm | 0.300 -> 1.100 | 12.5% -> 87.5% | 25.0% -> 90.0% | 40.0 -> 2.5 | 150 | 150 |" in table


def test_table_without_scores_says_what_to_run(tmp_path):
    (tmp_path / "run" / "grpo").mkdir(parents=True)
    with pytest.raises(SystemExit, match="bench/grpo.py run"):
        bench.summarize(tmp_path / "run")

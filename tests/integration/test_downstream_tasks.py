"""Downstream tasks through the CLI: `cptkit run` of an eval with tasks writes them beside the perplexities
(results.json, results.md, report.md) and names them in its summary; a task that cannot run offline stops
`cptkit eval` before any model loads; `cptkit train` scores its during-training tasks at each held-out
evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli
from cptkit.config import Config, build_config
from cptkit.testing.stages import make_lora_adapter, write_prepared
from cptkit.testing.tiny import sample_texts

EXAMPLES = Path(__file__).parents[2] / "examples/tasks"
MC, GEN = "cptkit_capitals_mc", "cptkit_capitals_gen"


def eval_config(root: Path, model_dir: Path, tasks: list[dict]) -> Path:
    (root / "prose.txt").write_text(sample_texts(3)[2][:600], encoding="utf-8")
    adapter = make_lora_adapter(model_dir, root / "adapter", scale=0.2)
    config = {
        "run_dir": str(root / "run"),
        "model": {"name_or_path": str(model_dir)},
        "eval": {
            "models": [
                {"name": "base", "path": str(model_dir)},
                {"name": "adapted", "path": str(model_dir), "adapter": str(adapter)},
            ],
            "extra_texts": [{"name": "prose", "path": str(root / "prose.txt"), "role": "general"}],
            "batch_size": 4,
            "seq_length": 64,
            "tasks": tasks,
        },
    }
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_scores_the_tasks_on_every_model_and_shows_them_everywhere(tmp_path, tiny_model_dir, capsys):
    tasks = [
        {"name": MC, "include": str(EXAMPLES), "limit": 4},
        {"name": GEN, "include": str(EXAMPLES), "limit": 2},
    ]
    assert cli(["run", str(eval_config(tmp_path, tiny_model_dir, tasks))]) == 0
    summary = capsys.readouterr().err
    run = tmp_path / "run"
    results = json.loads((run / "eval/results.json").read_text())
    assert set(results["tasks"]) == {"base", "adapted"}
    assert set(results["tasks"]["adapted"]) == {MC, GEN}
    acc = results["tasks"]["adapted"][MC]["acc"]
    assert set(acc) == {"value", "stderr", "higher_is_better", "samples"} and acc["samples"] == 4
    d = next(d for d in results["task_deltas"] if d["task"] == MC and d["metric"] == "acc")
    assert d["model"] == "adapted" and d["delta"] == d["after"] - d["before"]
    assert d["reading"] in ("better", "worse", "within noise")
    assert {r["model"] for r in results["results"]} == {"base", "adapted"}  # the perplexities are still there
    assert f"| adapted | {MC} | acc |" in (run / "eval/results.md").read_text()
    report = (run / "report/report.md").read_text()
    assert "### Downstream tasks" in report and f"| base | {GEN} | exact_match:strip |" in report
    assert json.loads((run / "report/report.json").read_text())["eval"]["tasks"] == results["tasks"]
    assert f"eval task {MC} acc: base" in summary and "-> adapted" in summary


def test_a_task_that_cannot_run_offline_stops_eval_before_any_model_loads(tmp_path, tiny_model_dir, capsys):
    config = eval_config(tmp_path, tiny_model_dir, [{"name": "cptkit_capitals", "include": str(EXAMPLES)}])
    capsys.readouterr()
    assert cli(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert "eval.tasks[0].name: no task 'cptkit_capitals'" in err and MC in err
    assert "Loading weights" not in err and not (tmp_path / "run/eval").exists()


@pytest.mark.slow
def test_training_scores_its_tasks_at_each_heldout_evaluation(tmp_path, tiny_model_dir, tiny_tokenizer):
    from cptkit.commands import train

    texts = [t[:300] for t in sample_texts(8)]
    data = write_prepared(
        tmp_path / "data", {"docs": ("domain", texts[:4]), "prose": ("general", texts[4:])}, tiny_tokenizer
    )
    cfg = build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(tiny_model_dir)},
            "train": {
                "mode": "full",
                "dataset": str(data),
                "output_dir": str(tmp_path / "train"),
                "report_to": ["none"],
                "eval_steps": 2,
                "eval_max_tokens": 200,
                "gradient_checkpointing": False,
                "hf": {
                    "max_steps": 3,
                    "per_device_train_batch_size": 2,
                    "logging_steps": 1,
                    "save_steps": 1000,
                },
            },
            "eval": {
                "tasks": [
                    {"name": MC, "include": str(EXAMPLES), "limit": 2, "during_training": True},
                    {"name": GEN, "include": str(EXAMPLES)},  # not during training
                ]
            },
        },
    )
    train.run(cfg)
    lines = [json.loads(x) for x in (tmp_path / "train/metrics.jsonl").read_text().splitlines()]
    scored = [x for x in lines if x["type"] == "task"]
    assert [x["step"] for x in scored] == [0, 2, 3]  # with the held-out sets: first, every 2 steps, last
    assert all(f"task/{MC}/acc" in x and not any(GEN in k for k in x) for x in scored)
    assert [x["step"] for x in lines if x["type"] == "eval" and x["set"] == "docs"] == [0, 2, 3]
    assert [x["step"] for x in lines if x["type"] == "train"] == [1, 2, 3]  # each step still logged once

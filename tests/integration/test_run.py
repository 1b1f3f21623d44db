"""`cptkit run` end to end on CPU with a tiny Llama: every stage in order, then skipped when nothing
changed, rerun from what changed, `--only` / `--from`, and a failed stage that keeps what finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cptkit.cli import main as cli
from cptkit.commands import run as run_command
from cptkit.config import Config, load_config
from cptkit.errors import CptkitError
from cptkit.testing.tiny import sample_texts


def write_corpus(root: Path) -> tuple[Path, Path]:
    texts = sample_texts()
    domain, general = root / "corpus" / "domain", root / "corpus" / "general"
    for folder, part in ((domain, texts[:24]), (general, texts[50:62])):
        folder.mkdir(parents=True)
        for i, text in enumerate(part):
            (folder / f"{i:03}.txt").write_text(text[:1500], encoding="utf-8")
    return domain, general


def write_instructions(path: Path, n: int = 24) -> Path:
    rows = [
        {"instruction": f"What does statement {i} do?", "output": f"Statement {i} runs code."}
        for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def pipeline_config(root: Path, model_dir: Path) -> dict:
    """The tiny pipeline's config (prepare, LoRA train, merge, eval) on `write_corpus(root)`."""
    domain, general = write_corpus(root)
    return {
        "run_dir": str(root / "run"),
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "tokenizer": str(model_dir),
            "seq_length": 128,
            "heldout_fraction": 0.2,
            "num_proc": 1,
            "sources": [
                {"name": "docs", "path": str(domain), "role": "domain", "weight": 0.7},
                {"name": "general", "path": str(general), "role": "general", "weight": 0.3},
            ],
        },
        "train": {
            "mode": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "gradient_checkpointing": False,
            "report_to": ["none"],
            "eval_steps": 1000,
            "hf": {
                "max_steps": 4,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "logging_steps": 1,
            },
        },
        "merge": {"dtype": "float32"},
        "eval": {"batch_size": 4, "max_documents": 4},
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("pipeline")
    config = pipeline_config(root, tiny_model_dir)
    config |= {
        "sft": {
            "data": str(write_instructions(root / "instructions.jsonl")),
            "mode": "lora",
            "seq_length": 64,
            "heldout_fraction": 0.1,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "gradient_checkpointing": False,
            "report_to": ["none"],
            "eval_steps": 1000,
            "hf": {
                "max_steps": 3,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-3,
                "logging_steps": 1,
            },
        },
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["run", str(path)]) == 0
    return path, root / "run"


def statuses(result: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in result["stages"]}


def test_every_stage_runs_in_order_and_writes_its_output(pipeline):
    path, run_dir = pipeline
    records = json.loads((run_dir / ".cptkit" / "stages.json").read_text())
    assert list(records) == ["prepare", "train", "merge", "eval", "sft", "sft-eval", "report"]
    assert all(r["status"] == "complete" for r in records.values())
    assert (run_dir / "data" / "manifest.json").is_file()
    assert (run_dir / "train" / "adapter_config.json").is_file()
    assert (run_dir / "merged" / "config.json").is_file()
    assert (run_dir / "report" / "report.md").is_file()
    sft_data = json.loads((run_dir / "sft" / "sft_data.json").read_text())
    assert sft_data["template"] == "seed" and sft_data["trained_tokens"] < sft_data["tokens"]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert {r["model"] for r in results["results"]} >= {"base", "merged"}
    sft_results = json.loads((run_dir / "sft" / "eval" / "results.json").read_text())
    assert {r["model"] for r in sft_results["results"]} == {"base", "cpt", "sft"}
    # the report, written last, holds the SFT stage too
    report = json.loads((run_dir / "report" / "report.json").read_text())
    assert report["sft"]["train"]["final_step"] == 3
    assert report["sft"]["data"]["trained_tokens"] == sft_data["trained_tokens"]
    assert {r["model"] for r in report["sft"]["eval"]["results"]} == {"base", "cpt", "sft"}
    page = (run_dir / "report" / "report.md").read_text()
    assert "## SFT" in page and "**sft** on domain set" in page


def test_rerun_skips_finished_stages_and_reruns_what_changed(pipeline):
    path, _ = pipeline
    cfg = load_config(Config, path)
    assert set(statuses(run_command.run(cfg)).values()) == {"skipped"}
    changed = load_config(Config, path, ["eval.batch_size=2"])
    got = statuses(run_command.run(changed))
    assert got["prepare"] == got["train"] == got["merge"] == got["sft"] == "skipped"
    assert got["eval"] == got["report"] == got["sft-eval"] == "done"


def test_changed_training_settings_train_anew(pipeline):
    """A rerun for other training settings starts over: it must not resume the finished run's last
    checkpoint (0 steps left) nor append to its metrics."""
    path, run_dir = pipeline
    changed = load_config(Config, path, ["train.hf.learning_rate=5e-4", "train.hf.save_steps=2"])
    got = statuses(run_command.run(changed))
    assert got["prepare"] == "skipped" and got["train"] == got["merge"] == got["eval"] == "done"
    meta = json.loads((run_dir / "train" / "run_meta.json").read_text())
    assert meta["final"]["steps"] == 4 and meta["resumed_from"] is None
    steps = [
        json.loads(x)["step"]
        for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
        if '"train"' in x
    ]
    assert steps == [1, 2, 3, 4]
    # asked again with the same settings after all: resumes nothing, skips
    assert statuses(run_command.run(changed))["train"] == "skipped"


def test_only_and_from_rerun_the_stages_asked_for(pipeline):
    path, _ = pipeline
    cfg = load_config(Config, path)
    assert statuses(run_command.run(cfg, only_stage="report")) == {"report": "done"}
    assert list(statuses(run_command.run(cfg, from_stage="sft-eval"))) == ["sft-eval", "report"]
    with pytest.raises(CptkitError, match="no such stage; stages are prepare, train"):
        run_command.run(cfg, only_stage="pretrain")


def test_from_needs_the_earlier_stages_done(tmp_path, pipeline):
    path, _ = pipeline
    cfg = load_config(Config, path, [f"run_dir={tmp_path / 'fresh'}"])
    with pytest.raises(CptkitError, match="the earlier stage prepare has not finished"):
        run_command.run(cfg, from_stage="train")


def test_a_failed_stage_stops_the_run_and_keeps_what_finished(pipeline, tmp_path, capsys):
    path, run_dir = pipeline
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not an instruction"}\n')
    code = cli(["run", str(path), f"sft.data={bad}"])
    assert code == 2
    assert "no usable record" in capsys.readouterr().err
    records = json.loads((run_dir / ".cptkit" / "stages.json").read_text())
    assert records["sft"]["status"] == "failed" and records["train"]["status"] == "complete"
    assert (run_dir / "merged" / "config.json").is_file()


def test_a_missing_optional_package_stops_the_run_before_any_stage(tmp_path, capsys, pipeline):
    """report_to: [wandb] without wandb installed: refused before prepare spends its time."""
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    path, _ = pipeline
    raw = yaml.safe_load(path.read_text())
    raw["run_dir"] = str(tmp_path / "fresh")
    raw["train"]["report_to"] = ["wandb"]
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(raw))
    assert cli(["run", str(fresh)]) == 2
    assert "wandb" in capsys.readouterr().err
    assert not (tmp_path / "fresh" / "data").exists()

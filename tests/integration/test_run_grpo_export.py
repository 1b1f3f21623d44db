"""`cptkit run` with the GRPO and export stages on CPU with a tiny Llama: the whole chain (prepare, LoRA
train, merge, eval, LoRA sft, sft-eval, LoRA grpo from the SFT adapter merged into grpo/start, an f16
GGUF export of the GRPO adapter merged on the way, report), then skipped when nothing changed; and the
grpo -> export -> report tail alone, from the tiny model as grpo.model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from test_run import pipeline_config, write_instructions

from cptkit.cli import main as cli
from cptkit.commands import run as run_command
from cptkit.config import Config, load_config
from cptkit.testing.grpo import grpo_section as toy_grpo_section

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def grpo_section(root: Path, steps: int = 2, model: str | None = None) -> dict:
    """A LoRA GRPO run of `steps` steps on the toy task (groups of 4, 4 held-out prompts)."""
    more = {"model": model} if model else {}
    return toy_grpo_section(root / "task", "lora", steps, 5e-3, group=4, lora=LORA, heldout_max=4, **more)


def sft_section(root: Path) -> dict:
    return {
        "data": str(write_instructions(root / "instructions.jsonl", n=12)),
        "mode": "lora",
        "seq_length": 64,
        "heldout_fraction": 0.2,
        "lora": LORA,
        "gradient_checkpointing": False,
        "report_to": ["none"],
        "eval_steps": 1000,
        "hf": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
    }


def stages_of(result: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in result["stages"]}


def gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The GGUF file's weights as transformers' GGUF loader reads them back (HF names and layout)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.state_dict()


def merged_weights(base: Path | str, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a if k in b and "rotary" not in k)


def check_report(run_dir: Path) -> tuple[dict, str]:
    """report.json's GRPO and export blocks hold the numbers their stages wrote; report.md shows them."""
    report = json.loads((run_dir / "report" / "report.json").read_text())
    scores = json.loads((run_dir / "grpo" / "grpo_scores.json").read_text())
    exported = json.loads((run_dir / "export" / "export_report.json").read_text())
    grpo, export = report["grpo"], report["export"]
    assert grpo["heldout"]["before"]["reward"] == scores["before"]["reward"]
    assert grpo["heldout"]["after"]["reward"] == scores["after"]["reward"]
    assert grpo["train"]["final_step"] == 2 and grpo["train"]["reward"]["last"] is not None
    assert export["bytes"] == exported["bytes"] and export["type"] == "f16"
    assert export["verify"] == exported["verify"] and export["verify"]["passed"] is True
    page = (run_dir / "report" / "report.md").read_text()
    assert "## GRPO" in page and "## Export" in page
    before, after = scores["before"]["reward"], scores["after"]["reward"]
    assert f"reward {before:.3f} -> {after:.3f}" in page
    assert f"`{exported['path']}`: llama as GGUF f16" in page
    assert f"{exported['verify']['max_abs_logit_diff']:.4g}" in page
    return report, page


def test_the_whole_chain_runs_in_order_then_is_skipped(tmp_path, tiny_model_dir):
    config = pipeline_config(tmp_path, tiny_model_dir)
    config |= {"sft": sft_section(tmp_path), "grpo": grpo_section(tmp_path), "export": {"type": "f16"}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["run", str(path)]) == 0
    run_dir = tmp_path / "run"
    records = json.loads((run_dir / ".cptkit" / "stages.json").read_text())
    order = ["prepare", "train", "merge", "eval", "sft", "sft-eval", "grpo", "export", "report"]
    assert list(records) == order and all(r["status"] == "complete" for r in records.values())

    # grpo starts from the SFT adapter merged into grpo/start; its adapter is trained on that folder
    grpo, start, sft = run_dir / "grpo", run_dir / "grpo" / "start", run_dir / "sft"
    meta = json.loads((grpo / "run_meta.json").read_text())
    assert meta["merged_adapter"] == str(sft) and meta["base_model"] == str(start)
    adapter = json.loads((grpo / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(start)
    sft_merged = merged_weights(run_dir / "merged", sft)
    from transformers import AutoModelForCausalLM

    start_weights = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32).state_dict()
    assert max_diff(sft_merged, start_weights) < 1e-6

    # the export is the GRPO adapter merged into grpo/start, not into the CPT model nor the base
    exported = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert exported["source"] == str(grpo) and exported["verify"]["passed"] is True
    written = gguf_weights(Path(exported["path"]))
    expected = merged_weights(start, grpo)
    near = max_diff(written, expected)
    assert near < 1e-3, near
    assert max_diff(written, merged_weights(run_dir / "merged", grpo)) > 5 * near
    check_report(run_dir)

    again = run_command.run(load_config(Config, path))
    assert stages_of(again) == {name: "skipped" for name in order}


def test_grpo_then_export_then_report(tmp_path, tiny_model_dir):
    """The tail alone: a LoRA GRPO run on the tiny model, its adapter exported to an f16 GGUF (merged into
    the tiny model on the way) whose weights are the merged policy's, the report with both sections; a
    second run skips all three."""
    config = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(tiny_model_dir)},
        "grpo": grpo_section(tmp_path, model=str(tiny_model_dir)),
        "export": {"type": "f16"},
    }
    path = tmp_path / "tail.yaml"
    path.write_text(yaml.safe_dump(config))
    first = run_command.run(load_config(Config, path))
    assert stages_of(first) == {"grpo": "done", "export": "done", "report": "done"}
    run_dir = tmp_path / "run"
    exported = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert exported["source"] == str(run_dir / "grpo") and exported["architecture"] == "llama"
    written = gguf_weights(Path(exported["path"]))
    near = max_diff(written, merged_weights(tiny_model_dir, run_dir / "grpo"))
    assert near < 1e-3, near
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    assert max_diff(written, base) > 5 * near  # the trained adapter is in the file
    check_report(run_dir)
    again = run_command.run(load_config(Config, path))
    assert stages_of(again) == {"grpo": "skipped", "export": "skipped", "report": "skipped"}

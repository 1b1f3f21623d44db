"""Downstream tasks (lm-eval, offline): found before any model loads or refused with what to do, the shipped
examples run from any working directory, a model trained on the answers scores higher than before, and
lm-eval's numbers read into scores, changes with intervals and their readings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from cptkit.config import Config, build_config
from cptkit.config.evaluate import EvalTask
from cptkit.errors import ConfigError, CptkitError
from cptkit.eval.task_results import scores_of, task_deltas, task_reading, task_summary_lines, tasks_markdown
from cptkit.eval.tasks import check_tasks, run_tasks
from cptkit.eval.tradeoff import point_name
from cptkit.testing.tiny import sample_texts

EXAMPLES = Path(__file__).parents[2] / "examples/tasks"
MC, GEN = "cptkit_capitals_mc", "cptkit_capitals_gen"


def write_task(folder: Path, name: str, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "task": name,
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        **fields,
    }
    (folder / f"{name}.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    return folder


def test_missing_lm_eval_is_refused_with_the_extra_to_install():
    with pytest.raises(CptkitError, match=r'eval.tasks needs lm-eval \(pip install "cptkit\[eval\]"\)'):
        check_tasks([EvalTask(name=MC, include=str(EXAMPLES))], installed=lambda module: False)
    assert check_tasks([], installed=lambda module: False) == []  # no tasks, nothing needed


def test_a_task_not_found_lists_the_local_tasks_and_says_the_hub_is_offline():
    with pytest.raises(ConfigError) as e:
        check_tasks([EvalTask(name="cptkit_capitals", include=str(EXAMPLES))])
    message = str(e.value)
    assert "eval.tasks[0].name: no task 'cptkit_capitals'" in message
    assert f"tasks defined there: {GEN}, {MC}" in message and "cannot be fetched offline" in message


def test_every_task_problem_is_reported_together_before_any_model_loads(tmp_path):
    tasks = write_task(
        tmp_path / "tasks", "no_file", dataset_path="json", dataset_kwargs={"data_files": "x.jsonl"}
    )
    write_task(tasks, "hub_only", dataset_path="cptkit-nobody/never-downloaded")
    specs = [
        EvalTask(name="no_file", include=str(tasks)),
        EvalTask(name="hub_only", include=str(tasks / "hub_only.yaml")),  # a file: its folder is indexed
        EvalTask(name="anything", include=str(tmp_path / "missing")),
    ]
    with pytest.raises(ConfigError) as e:
        check_tasks(specs)
    message = str(e.value)
    assert "3 problem(s)" in message
    assert "eval.tasks[0] (no_file): data file x.jsonl does not exist" in message and str(tasks) in message
    assert "eval.tasks[1] (hub_only): reads the hub dataset 'cptkit-nobody/never-downloaded'" in message
    assert f"eval.tasks[2].include: {tmp_path / 'missing'} does not exist" in message


def test_config_validation_refuses_a_missing_include_and_bad_counts(tmp_path):
    task = {"name": MC, "include": str(tmp_path / "nowhere"), "num_fewshot": -1, "limit": 0}
    with pytest.raises(ConfigError) as e:
        build_config(Config, {"eval": {"tasks": [task]}})
    message = str(e.value)
    for field in ("include", "num_fewshot", "limit"):
        assert f"eval.tasks[0].{field}" in message


def test_shipped_examples_run_from_any_working_directory_and_leave_the_model_as_it_was(
    tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer
):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # nowhere near the task files
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    tasks = [
        EvalTask(name=MC, include=str(EXAMPLES), limit=3),
        EvalTask(name=GEN, include=str(EXAMPLES), limit=2),
    ]
    torch.manual_seed(5)
    random.seed(5)
    scores = run_tasks(model, tiny_tokenizer, tasks, "cpu", 4)
    after_call = torch.rand(1), random.random()
    torch.manual_seed(5)
    random.seed(5)
    assert after_call == (torch.rand(1), random.random())  # lm-eval's seeding does not leak out
    assert model.training
    assert set(scores) == {MC, GEN}
    assert set(scores[MC]) == {"acc", "acc_norm"} and set(scores[GEN]) == {"exact_match:strip"}
    assert scores[MC]["acc"]["samples"] == 3 and scores[GEN]["exact_match:strip"]["samples"] == 2
    assert scores[MC]["acc"]["higher_is_better"] is True and 0 <= scores[MC]["acc"]["value"] <= 1


def qa_texts() -> list[str]:
    rows = [json.loads(line) for line in (EXAMPLES / "capitals_gen.jsonl").read_text().splitlines()]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}\n" for r in rows]


def train_on(model, tokenizer, texts: list[str], steps: int) -> None:
    """Plain full fine-tuning on `texts` as one padded batch."""
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    ids = torch.full((len(encoded), max(map(len, encoded))), tokenizer.pad_token_id)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
    labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.slow
def test_a_model_trained_on_the_answers_scores_higher_on_both_kinds_of_task(tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tasks = check_tasks([EvalTask(name=MC, include=str(EXAMPLES)), EvalTask(name=GEN, include=str(EXAMPLES))])
    before = run_tasks(model, tiny_tokenizer, tasks, "cpu", 8)
    train_on(model, tiny_tokenizer, qa_texts(), steps=60)
    after = run_tasks(model, tiny_tokenizer, tasks, "cpu", 8)
    assert before[MC]["acc"]["value"] < 0.6 < after[MC]["acc"]["value"]
    assert before[GEN]["exact_match:strip"]["value"] < 0.2 < 0.5 < after[GEN]["exact_match:strip"]["value"]
    deltas = task_deltas({"base": before, "trained": after})
    assert next(d for d in deltas if d["task"] == MC and d["metric"] == "acc")["reading"] == "better"


def lm_eval_result(acc: float, stderr: float | str, exact: float = 0.5) -> dict:
    """The parts of simple_evaluate's result that cptkit reads."""
    return {
        "results": {
            "mc": {"alias": "mc", "sample_len": 40, "acc,none": acc, "acc_stderr,none": stderr},
            "gen": {"alias": "gen", "exact_match,strip": exact, "exact_match_stderr,strip": "N/A"},
        },
        "higher_is_better": {"mc": {"acc": True}, "gen": {"exact_match": True}},
        "n-samples": {"mc": {"original": 100, "effective": 40}, "gen": {"original": 5, "effective": 5}},
    }


def test_lm_eval_results_read_into_scores():
    scores = scores_of(lm_eval_result(0.5, 0.05))
    assert scores == {
        "mc": {"acc": {"value": 0.5, "stderr": 0.05, "higher_is_better": True, "samples": 40}},
        "gen": {"exact_match:strip": {"value": 0.5, "stderr": None, "higher_is_better": True, "samples": 5}},
    }


def test_a_change_is_better_or_worse_only_when_its_interval_says_so():
    tasks = {
        "base": scores_of(lm_eval_result(0.50, 0.03)),
        "small": scores_of(lm_eval_result(0.52, 0.03)),  # 0.02 +- 1.96 * 0.042: noise
        "gained": scores_of(lm_eval_result(0.70, 0.03)),
        "lost": scores_of(lm_eval_result(0.30, 0.03)),
    }
    deltas = {(d["model"], d["metric"]): d for d in task_deltas(tasks)}
    assert deltas[("small", "acc")]["reading"] == "within noise"
    assert deltas[("gained", "acc")]["reading"] == "better" and deltas[("lost", "acc")]["reading"] == "worse"
    d = deltas[("gained", "acc")]
    assert d["delta"] == pytest.approx(0.2) and d["stderr"] == pytest.approx((2 * 0.03**2) ** 0.5)
    assert d["low"] == pytest.approx(0.2 - 1.96 * d["stderr"]) and d["high"] > d["low"]
    assert deltas[("gained", "exact_match:strip")]["reading"] == "no interval"  # lm-eval gave no stderr
    assert task_reading(0.1, 0.2, higher_is_better=False) == "worse"  # e.g. a perplexity-like metric


def test_tables_and_summary_lines_show_each_model_against_the_base():
    tasks = {"base": scores_of(lm_eval_result(0.50, 0.03)), "merged": scores_of(lm_eval_result(0.70, 0.03))}
    record = {"tasks": tasks, "task_deltas": task_deltas(tasks)}
    md = "\n".join(tasks_markdown(record))
    assert "## Downstream tasks" in md and "| merged | mc | acc | 0.7000 ± 0.0300 | +0.2000 [" in md
    assert "| better |" in md
    assert task_summary_lines(record)[0].startswith("mc acc: base 0.5000 -> merged 0.7000 (+0.2000 [")
    assert tasks_markdown({"tasks": {}}) == [] and task_summary_lines({}) == []


def test_summary_lines_name_the_last_evaluated_model_not_a_point_of_the_sweep():
    # the sweep's points are scored after eval.models (cptkit.eval.tasks.score_tasks' `scored`)
    tasks = {
        "base": scores_of(lm_eval_result(0.50, 0.03)),
        "adapted": scores_of(lm_eval_result(0.60, 0.03)),
        "merged": scores_of(lm_eval_result(0.70, 0.03)),
        point_name(0.5): scores_of(lm_eval_result(0.55, 0.03)),
        point_name(1.0): scores_of(lm_eval_result(0.60, 0.03)),
    }
    lines = task_summary_lines({"tasks": tasks, "task_deltas": task_deltas(tasks)})
    assert lines[0].startswith("mc acc: base 0.5000 -> merged 0.7000 (+0.2000 [")
    assert not any("interpolated@" in line for line in lines)


def test_the_bench_cloze_task_is_deterministic_by_seed_and_found_offline(tmp_path):
    import gzip
    import subprocess
    import sys

    texts = [t for t in sample_texts(200) if len(t) > 3000][:6]
    corpus = tmp_path / "corpus.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    script = Path(__file__).parents[2] / "bench/make_cloze_task.py"

    def make(out: str, seed: int) -> list[dict]:
        args = ["--out", str(tmp_path / out), "--corpus", str(corpus), "--count", "12", "--seed", str(seed)]
        subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
        return [json.loads(x) for x in (tmp_path / out / "general_cloze.jsonl").read_text().splitlines()]

    first, again, other = make("a", 0), make("b", 0), make("c", 1)
    assert first == again != other and len(first) == 12
    assert all(len(q["choices"]) == 4 and q["choices"][q["answer"]] not in q["context"] for q in first)
    (ready,) = check_tasks([EvalTask(name="general_cloze", include=str(tmp_path / "a"))])
    assert ready.overrides["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "a/general_cloze.jsonl")


def test_cptkit_run_and_config_name_lm_eval_when_eval_tasks_need_it(tmp_path):
    from cptkit.train.optional import refusals_for_missing_packages

    cfg = build_config(
        Config, {"run_dir": str(tmp_path), "eval": {"tasks": [{"name": MC, "include": str(EXAMPLES)}]}}
    )
    without = refusals_for_missing_packages(cfg, installed=lambda module: module != "lm_eval")
    assert without == ['eval.tasks needs lm-eval (pip install "cptkit[eval]"), which is not installed']
    assert refusals_for_missing_packages(cfg) == []
    no_tasks = build_config(Config, {"run_dir": str(tmp_path), "eval": {}})
    assert refusals_for_missing_packages(no_tasks, installed=lambda module: False) == []

"""Every config problem at once, before any model loads: types never hide values or paths, train.hf is
checked as TrainingArguments will be built, numbers must be finite and in range, keys may not repeat."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cptkit.config import Config, load_config
from cptkit.errors import ConfigError


def problems_of(tmp_path, text, overrides=()):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Config, path, list(overrides))
    return info.value.problems


def good_config(tmp_path, hf="{}", extra=""):
    (tmp_path / "corpus").mkdir(exist_ok=True)
    return f"""
run_dir: {tmp_path}/run
data:
  tokenizer: tok
  sources:
    - {{name: domain, path: {tmp_path}/corpus}}
model: {{name_or_path: m}}
train:
  hf: {hf}
{extra}"""


def test_six_different_mistakes_are_reported_in_one_error(tmp_path):
    problems = problems_of(
        tmp_path,
        """
run_dir: out
data:
  tokenizer: tok
  seq_length: long
  heldout_fraction: 2
  sources:
    - {name: domain, path: /no/such/corpus, weight: .nan}
  seed: 1
  seed: 2
model: {name_or_path: m}
train:
  hf:
    per_device_train_batch_size: 0
    learning_rate: fast
""",
    )
    text = "\n".join(problems)
    assert "data.seq_length (line 5): expected an integer, got 'long'" in text  # type
    assert "data.heldout_fraction (line 6): 2.0 must be in [0, 1)" in text  # value
    assert "data.sources[0].path (line 8): /no/such/corpus does not exist" in text  # path
    assert "data.sources[0].weight (line 8): nan is not a finite number" in text  # NaN
    assert "data.seed (lines 9 and 10): given twice" in text  # duplicate key
    assert "train.hf.per_device_train_batch_size (line 14): 0 must be a positive integer" in text  # hf value
    assert "train.hf.learning_rate (line 15): expected a number, got the string 'fast'" in text  # hf type
    assert len(problems) == 7


@pytest.mark.parametrize(
    ("hf", "expected"),
    [
        (
            "{learning_rate: '2e-5'}",
            "train.hf.learning_rate (line 9): expected a number, got the string '2e-5' (remove",
        ),
        ("{learning_rate: -1.0e-4}", "train.hf.learning_rate (line 9): -0.0001 must be a positive number"),
        ("{learning_rate: .inf}", "train.hf.learning_rate (line 9): inf is not a finite number"),
        (
            "{per_device_train_batch_size: eight}",
            "per_device_train_batch_size (line 9): expected an integer, got",
        ),
        (
            "{per_device_train_batch_size: 0}",
            "train.hf.per_device_train_batch_size (line 9): 0 must be a positive",
        ),
        (
            "{per_device_train_batch_size: 2.5}",
            "train.hf.per_device_train_batch_size (line 9): expected an integer",
        ),
        ("{save_steps: -5}", "train.hf.save_steps (line 9): -5 must be positive"),
        ("{logging_steps: 0}", "train.hf.logging_steps (line 9): 0 must be positive"),
        (
            "{gradient_accumulation_steps: 0}",
            "train.hf.gradient_accumulation_steps (line 9): 0 must be at least 1",
        ),
        ("{max_steps: ten}", "train.hf.max_steps (line 9): expected an integer, got the string 'ten'"),
        ("{max_steps: -2}", "train.hf.max_steps (line 9): -2 must be a positive integer, or -1"),
        ("{num_train_epochs: 0}", "train.hf.num_train_epochs (line 9): 0 must be positive"),
        ("{bf16: yes please}", "train.hf.bf16 (line 9): expected true or false"),
        (
            "{learnig_rate: 1.0e-4}",
            "train.hf.learnig_rate (line 9): not a transformers.TrainingArguments field "
            "(did you mean 'learning_rate'?)",
        ),
        (
            "{optim: adamw_fast}",
            "train.hf.optim (line 9): transformers.TrainingArguments: adamw_fast is not a valid",
        ),
        (
            "{fp16: true, bf16: true}",
            "train.hf.fp16 (line 9): transformers.TrainingArguments: At most one of fp16",
        ),
        ("{deepspeed: /no/ds.json}", "train.hf.deepspeed (line 9): /no/ds.json does not exist"),
    ],
)
def test_train_hf_is_checked_as_training_arguments_before_anything_loads(tmp_path, hf, expected):
    problems = problems_of(tmp_path, good_config(tmp_path, hf))
    assert len(problems) == 1 and expected in problems[0], problems


def test_sft_hf_is_checked_the_same_way(tmp_path):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    text = good_config(tmp_path, extra=f"sft:\n  data: {tmp_path}/sft.jsonl\n  hf: {{learning_rate: -1}}\n")
    problems = problems_of(tmp_path, text)
    assert problems == ["sft.hf.learning_rate (line 12): -1 must be a positive number, e.g. 2e-5"]


def test_valid_train_hf_loads(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 1}}')
    hf = f"{{learning_rate: 1.0e-4, bf16: true, save_steps: 0.25, max_steps: 40, deepspeed: {ds}}}"
    path = tmp_path / "run.yaml"
    path.write_text(good_config(tmp_path, hf))
    cfg = load_config(Config, path)
    assert cfg.train.hf["save_steps"] == 0.25 and cfg.train.hf["deepspeed"] == str(ds)


def test_numbers_of_every_section_must_be_finite_and_in_range(tmp_path):
    extra = "eval: {batch_size: 0, seq_length: 1}\nmerge: {compare_documents: 0}\n"
    problems = problems_of(
        tmp_path,
        good_config(tmp_path, extra=extra),
        [
            "data.sources[0].weight=nan",
            "train.lora.alpha=0",
            "train.eval_steps=0",
            "data.filters.min_words=-1",
        ],
    )
    text = "\n".join(problems)
    assert "data.sources[0].weight: 'nan' is not a finite number" in text
    assert "eval.batch_size (line 10): 0 is too small (at least 1)" in text
    assert "eval.seq_length (line 10): 1 is too small (at least 2)" in text
    assert "merge.compare_documents (line 11): 0 is too small (at least 1)" in text
    assert "train.lora.alpha: 0.0 must be positive" in text
    assert "train.eval_steps: 0 must be at least 1" in text
    assert "data.filters.min_words: -1 is too small (at least 0)" in text
    assert len(problems) == 7


def test_a_key_given_twice_is_reported_with_both_lines_wherever_it_is(tmp_path):
    text = good_config(tmp_path, "\n    learning_rate: 1.0e-4\n    learning_rate: 1.0e-3\n")
    problems = problems_of(tmp_path, text)
    assert problems == [
        "train.hf.learning_rate (lines 10 and 11): given twice; keep one (YAML would silently take the last)"
    ]


def test_a_wrong_section_hides_nothing_else_and_adds_nothing_of_its_own(tmp_path):
    problems = problems_of(tmp_path, "run_dir: out\ndata: [not, a, mapping]\neval: {batch_size: -2}\n")
    assert problems == [
        "data (line 2): expected a mapping of DataConfig fields, got ['not', 'a', 'mapping']",
        "eval.batch_size (line 3): -2 is too small (at least 1)",
    ]


def test_checking_train_hf_sets_up_no_device_or_accelerate_state(tmp_path):
    """Validation runs before `accelerate launch`'s processes pick their device: it must leave accelerate's
    process-wide state untouched, or the real run would inherit a CPU state (and a gloo process group)."""
    path = tmp_path / "run.yaml"
    path.write_text(good_config(tmp_path, "{learning_rate: 1.0e-4, bf16: true}"))
    script = (
        "import sys; from cptkit.config import Config, load_config; "
        f"cfg = load_config(Config, {str(path)!r}); "
        "from accelerate.state import PartialState; import torch.distributed as dist; "
        "print(cfg.train.hf['learning_rate'], PartialState._shared_state == {}, dist.is_initialized())"
    )
    env_keys = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29591",
    }
    import os

    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **env_keys},
        check=True,
    )
    assert out.stdout.split() == ["0.0001", "True", "False"]


def test_a_precision_set_in_train_hf_turns_the_other_default_off():
    """On a GPU a bf16 model defaults to bf16: `train.hf.fp16: true` must not end in TrainingArguments
    refusing both at once after the model has loaded."""
    import torch

    from cptkit.config.train import TrainConfig
    from cptkit.train.arguments import hf_settings

    assert hf_settings(TrainConfig(), on_gpu=True, dtype=torch.bfloat16)["bf16"] is True
    chosen = hf_settings(TrainConfig(hf={"fp16": True}), on_gpu=True, dtype=torch.bfloat16)
    assert chosen["fp16"] is True and chosen["bf16"] is False

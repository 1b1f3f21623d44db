"""The chat-retention probe: answer-token loss under the chat template, as `cptkit sft` renders it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cptkit import presets
from cptkit.config import Config, build_config
from cptkit.config.evaluate import ChatProbeConfig, EvalModel
from cptkit.config.load import ConfigError
from cptkit.config.sft import SftConfig
from cptkit.errors import CptkitError
from cptkit.eval.chat_probe import markdown_lines, prepare_probe
from cptkit.sft.formats import read_conversations
from cptkit.testing.tiny import make_tiny_llama, sample_texts, train_tokenizer, with_chat_template

CPU = torch.device("cpu")
RECORDS = [
    {"instruction": "What is the capital of France?", "output": "Paris is the capital of France."},
    {
        "messages": [
            {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "An apple."},
        ]
    },
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "5", "system": "Be brief."},
    {"messages": [{"role": "user", "content": "no answer"}]},  # skipped: no assistant turn
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    tokenizer = with_chat_template(train_tokenizer(sample_texts(60)))
    return make_tiny_llama(tmp_path_factory.mktemp("chat-llama"), tokenizer=tokenizer)


@pytest.fixture
def probe_file(tmp_path):
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def hand_answer_loss(folder, conversations) -> tuple[float, int]:
    """Mean -log p over the tokens after the chat-templated prompt, one example at a time, no padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    nats, tokens = 0.0, 0
    for conversation in conversations:
        messages = conversation.messages
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for k in range(len(prompt_ids), len(ids)):
            nats -= float(logprobs[k - 1, ids[k]])
            tokens += 1
    return nats / tokens, tokens


def test_the_probe_is_the_mean_loss_of_the_answer_tokens(chat_model, probe_file):
    base = EvalModel(name="base", path=str(chat_model))
    probe = prepare_probe(ChatProbeConfig(path=str(probe_file)), None, [base])
    assert len(probe.conversations) == 3 and probe.skipped == {"no assistant turn": 1}
    # the system prompt cptkit sft adds to records without one is there
    assert probe.conversations[0].messages[0] == {
        "role": "system",
        "content": SftConfig(data="x.jsonl").system_prompt,
    }
    found = probe.run([base], CPU, torch.float32, max_length=512, batch_size=2)  # padded batches
    loss, tokens = hand_answer_loss(chat_model, probe.conversations)
    assert found["base"]["examples"] == 3 and found["base"]["tokens"] == tokens
    assert found["base"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert found["base"]["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_each_model_against_the_base_carries_a_paired_interval_over_the_examples(chat_model, probe_file):
    """The same model twice: no change, an interval that is exactly [0, 0]; the per-example numbers that
    make it stay out of results.json."""
    models = [EvalModel(name="base", path=str(chat_model)), EvalModel(name="again", path=str(chat_model))]
    probe = prepare_probe(ChatProbeConfig(path=str(probe_file)), None, models)
    found = probe.run(models, CPU, torch.float32, max_length=512, batch_size=2, resamples=200)
    assert found["again"]["perplexity_change"] == pytest.approx(0.0, abs=1e-9)
    assert found["again"]["perplexity_change_interval"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert "perplexity_change" not in found["base"] and "example_nats" not in found["base"]
    assert found["base"]["tokens"] == found["again"]["tokens"]


def test_the_probe_follows_the_sft_sections_system_prompt_and_max_examples(chat_model, probe_file):
    base = EvalModel(name="base", path=str(chat_model))
    sft = SftConfig(data="x.jsonl", system_prompt="You answer in one word.")
    probe = prepare_probe(ChatProbeConfig(path=str(probe_file), max_examples=2), sft, [base])
    assert len(probe.conversations) == 2
    assert probe.conversations[1].messages[0]["content"] == "You answer in one word."


def test_a_model_without_a_chat_template_is_refused(tiny_model_dir, chat_model, probe_file):
    models = [EvalModel(name="base", path=str(chat_model)), EvalModel(name="raw", path=str(tiny_model_dir))]
    with pytest.raises(CptkitError, match=r"eval.chat_probe.path: .*'raw'.* no chat template"):
        prepare_probe(ChatProbeConfig(path=str(probe_file)), None, models)
    assert prepare_probe(ChatProbeConfig(), None, models) is None  # off: nothing checked


def test_an_unusable_probe_file_names_the_setting(tmp_path, chat_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not an instruction"}\n', encoding="utf-8")
    with pytest.raises(CptkitError, match=r"^eval.chat_probe.path: .*no usable record"):
        prepare_probe(ChatProbeConfig(path=str(bad)), None, [EvalModel(name="base", path=str(chat_model))])
    with pytest.raises(ConfigError, match=r"eval.chat_probe.path: .* is not a file"):
        build_config(
            Config, {"run_dir": str(tmp_path), "eval": {"chat_probe": {"path": str(tmp_path / "none")}}}
        )


def test_the_shipped_instruction_set_reads_cleanly():
    read = read_conversations(presets.path("chat_probe.jsonl"))
    assert len(read.conversations) >= 50 and not read.skipped


def test_the_report_lines_give_the_change_against_the_base():
    probe = {
        "base": {"loss": 1.23, "perplexity": 3.42, "examples": 50, "tokens": 900},
        "merged": {"loss": 1.31, "perplexity": 3.71, "examples": 50, "tokens": 900},
    }
    lines = markdown_lines(probe)
    assert lines[0].startswith("- **base**: answer loss 1.230")
    assert lines[1] == "- **merged**: answer loss 1.230 -> 1.310 (+6.5%), perplexity 3.42 -> 3.71"
    probe["merged"]["perplexity_change_interval"] = [0.02, 0.15]
    assert markdown_lines(probe)[1].endswith("perplexity change 95% interval [+2.0%, +15.0%]")


def test_cptkit_runs_eval_stamp_follows_the_probes_examples(tmp_path, probe_file):
    from cptkit.pipeline.stages import STAGES

    (eval_stage,) = [s for s in STAGES if s.name == "eval"]
    cfg = build_config(Config, {"run_dir": str(tmp_path), "eval": {"chat_probe": {"path": str(probe_file)}}})
    assert str(probe_file) in eval_stage.inputs(cfg)


def test_cptkit_runs_eval_stamp_follows_the_budget_the_sft_rendering_and_the_task_files(tmp_path):
    from cptkit.pipeline.stages import STAGES
    from cptkit.pipeline.stamps import stamp

    (eval_stage,) = [s for s in STAGES if s.name == "eval"]
    tasks = tmp_path / "tasks"
    tasks.mkdir()

    def eval_stamp(**sections):
        raw = {
            "run_dir": str(tmp_path),
            "eval": {"tasks": [{"name": "t", "include": str(tasks)}]},
            **sections,
        }
        cfg = build_config(Config, raw)
        return stamp(eval_stage.sections(cfg), eval_stage.inputs(cfg))

    plain = eval_stamp()
    assert eval_stamp(train={"forgetting_budget": 0.02}) != plain
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "Hi."}\n', encoding="utf-8")
    with_sft = eval_stamp(sft={"data": str(data)})
    assert eval_stamp(sft={"data": str(data), "system_prompt": "Be brief."}) != with_sft
    assert str(tasks) in eval_stage.inputs(
        build_config(
            Config, {"run_dir": str(tmp_path), "eval": {"tasks": [{"name": "t", "include": str(tasks)}]}}
        )
    )

"""SFT data: formats, the prompt mask (prompt tokens carry no loss), every assistant turn trained,
the seed template when there is no chat template, packing with restarting positions."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from cptkit.config.sft import SftConfig
from cptkit.errors import CptkitError
from cptkit.sft.data import build_sft_data
from cptkit.sft.formats import Conversation, read_conversations
from cptkit.sft.pack import pack_examples
from cptkit.sft.render import IGNORE_INDEX, choose_template, render
from cptkit.train.collator import PackedCollator

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHATML
    return tok


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def alpaca(i: int) -> dict:
    return {"instruction": f"Explain topic {i}.", "input": "Briefly.", "output": f"Topic {i} is about loops."}


def test_alpaca_and_messages_are_read_and_bad_records_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            alpaca(1),
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "assistant", "content": "no question"}]},
            {"instruction": "x", "output": ""},
            {"text": "plain"},
            "{not json",
        ],
    )
    read = read_conversations(path, "auto", system_prompt="Be brief.")
    assert len(read.conversations) == 2
    first = read.conversations[0].messages
    assert first[0] == {"role": "system", "content": "Be brief."}
    assert first[1]["content"] == "Explain topic 1.\n\nBriefly."
    assert dict(read.skipped) == {
        "first turn is not a user turn": 1,
        "empty output": 1,
        "not alpaca or messages": 1,
        "not JSON": 1,
    }
    with pytest.raises(CptkitError, match="no usable record"):
        read_conversations(write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}]))


def test_seed_template_when_no_chat_template_and_prompt_tokens_carry_no_label(tiny_tokenizer):
    assert choose_template(tiny_tokenizer, "auto") == "seed"
    conv = Conversation(
        [
            {"role": "system", "content": "You are a doctor."},
            {"role": "user", "content": "What is a fever?"},
            {"role": "assistant", "content": "A raised body temperature."},
        ]
    )
    example = render(conv, tiny_tokenizer, "seed")
    text = tiny_tokenizer.decode(example.input_ids)
    assert (
        "###System: You are a doctor.\n###Question: What is a fever?\n###Answer: A raised body temperature.</s>"
        in text
    )
    assert trained_text(tiny_tokenizer, example) == " A raised body temperature.</s>"
    first_trained = next(k for k, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert tiny_tokenizer.decode(example.input_ids[:first_trained]).endswith("###Answer:")
    with pytest.raises(CptkitError, match="no chat template"):
        choose_template(tiny_tokenizer, "chat")


def test_chat_template_multi_turn_trains_every_assistant_turn(chat_tokenizer):
    conv = Conversation(
        [
            {"role": "system", "content": "sys prompt"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "second answer"},
        ]
    )
    assert choose_template(chat_tokenizer, "auto") == "chat"
    example = render(conv, chat_tokenizer, "chat")
    trained = trained_text(chat_tokenizer, example)
    assert "first answer</s>" in trained and "second answer</s>" in trained
    assert "question" not in trained and "sys" not in trained and "<|user|>" not in trained


def test_packing_restarts_positions_and_carries_labels(tiny_tokenizer):
    convs = [
        Conversation(
            [{"role": "user", "content": f"q{i}" * (i + 1)}, {"role": "assistant", "content": f"a{i}"}]
        )
        for i in range(6)
    ]
    examples = [render(c, tiny_tokenizer, "seed") for c in convs]
    rows = pack_examples(examples, seq_length=64)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e.input_ids) for e in examples)
    assert len(rows) < len(examples)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 64
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0]
        assert starts[0] == 0 and all(
            row["position_ids"][k] == row["position_ids"][k - 1] + 1
            for k in range(1, len(row["position_ids"]))
            if k not in starts
        )
    unpacked = pack_examples(examples, seq_length=64, packing=False)
    assert len(unpacked) == len(examples)


def test_collator_keeps_prompt_mask_and_masks_boundaries_and_padding(tiny_tokenizer):
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [5, 6], "position_ids": [0, 1], "labels": [5, 6]},
    ]
    batch = PackedCollator(pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    assert batch["labels"].tolist() == [[-100, -100, 7, -100, 9], [-100, 6, -100, -100, -100]]
    assert "attention_mask" not in batch


def test_prompt_tokens_carry_no_loss(tiny_model_dir, tiny_tokenizer):
    """The model's loss on a batch equals the cross-entropy over response tokens only: changing what
    the prompt tokens would have to predict changes nothing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    conv = Conversation(
        [{"role": "user", "content": "Name a loop."}, {"role": "assistant", "content": "for"}]
    )
    example = render(conv, tiny_tokenizer, "seed")
    row = pack_examples([example], seq_length=256)[0]
    batch = PackedCollator(tiny_tokenizer.pad_token_id)([row])
    with torch.no_grad():
        loss = model(**batch, use_cache=False).loss
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    targets = batch["labels"][0, 1:]
    mask = targets != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[0, :-1][mask], targets[mask])
    assert torch.allclose(loss, manual, atol=1e-5)
    assert int(mask.sum()) == example.trained_tokens < len(example.input_ids) // 2


def test_build_sft_data_holds_out_truncates_and_counts(tmp_path, tiny_tokenizer):
    records = [alpaca(i) for i in range(40)] + [{"instruction": "long " * 300, "output": "ok"}]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = SftConfig(data=str(path), seq_length=96, heldout_fraction=0.1)
    data = build_sft_data(cfg, tiny_tokenizer)
    stats = data.stats
    assert stats["template"] == "seed" and stats["format"] == "alpaca" and stats["records"] == 41
    assert stats["truncated"] == 1 and sum(stats["skipped"].values()) == 1  # the long prompt left no response
    assert stats["train_examples"] + stats["heldout_examples"] == 40 and stats["heldout_examples"] == 4
    assert 0 < stats["trained_tokens"] < stats["tokens"]
    assert all(len(r["input_ids"]) <= 96 for r in data.train_rows + data.heldout_rows)


def sft_config(tmp_path, tiny_model_dir, **hf):
    from cptkit.config import Config, build_config

    path = write_jsonl(tmp_path / "data.jsonl", [alpaca(i) for i in range(24)])
    sft = {
        "data": str(path),
        "model": str(tiny_model_dir),
        "mode": "full",
        "output_dir": str(tmp_path / "sft"),
        "report_to": ["none"],
        "seq_length": 96,
        "heldout_fraction": 0.2,
        "gradient_checkpointing": False,
        "hf": {
            "max_steps": 4,
            "per_device_train_batch_size": 2,
            "logging_steps": 1,
            "save_steps": 1000,
            **hf,
        },
    }
    return build_config(Config, {"sft": sft})


def test_sft_run_records_its_run_and_the_response_loss_on_held_out_rows(tmp_path, tiny_model_dir):
    from cptkit.commands import sft

    summary = sft.run(sft_config(tmp_path, tiny_model_dir, learning_rate=1e-3))
    out = tmp_path / "sft"
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["stage"] == "sft" and meta["final"]["steps"] == 4
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r["type"] == "eval"]
    assert {r["set"] for r in evals} == {"sft_heldout"} and all(r["tokens"] > 0 for r in evals)
    assert [r["step"] for r in lines if r["type"] == "train"] == [1, 2, 3, 4]
    assert summary["heldout"]["sft_heldout"]["loss"] == evals[-1]["loss"]


def test_sft_stopped_by_a_nan_loss_records_failed(tmp_path, tiny_model_dir):
    from cptkit.commands import sft

    cfg = sft_config(tmp_path, tiny_model_dir, learning_rate=1e12, max_grad_norm=0.0, max_steps=6)
    with pytest.raises(CptkitError, match="training stopped"):
        sft.run(cfg)
    meta = json.loads((tmp_path / "sft" / "run_meta.json").read_text())
    assert meta["status"] == "failed" and "training stopped" in meta["error"]
    assert not (tmp_path / "sft" / "model.safetensors").exists()

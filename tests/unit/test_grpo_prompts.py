"""GRPO prompts: records read and bad ones counted by reason, rendering equal to SFT's prompt for both
templates (the equivalence test), skips counted, the held-out split deterministic and disjoint."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from cptkit.config.grpo import GrpoConfig, RewardConfig
from cptkit.errors import CptkitError
from cptkit.grpo.prompts import build_prompt_sets, heldout_count, read_prompts
from cptkit.sft.formats import read_conversations
from cptkit.sft.render import render_chat, render_seed
from cptkit.testing.tiny import with_chat_template


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    return with_chat_template(copy.deepcopy(tiny_tokenizer))


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def grpo_config(prompts, **kwargs) -> GrpoConfig:
    kwargs.setdefault("rewards", [RewardConfig(type="exact")])
    return GrpoConfig(prompts=str(prompts), **kwargs)


def questions(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "level": i % 3} for i in range(n)]


def test_records_keep_their_columns_and_bad_ones_are_counted_with_line_numbers(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "Add 2 and 3.", "answer": "5", "id": 7},
            "{not json",
            {"answer": "1"},
            "",
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}], "x": 1},
            [1, 2],
            {"prompt": "   "},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Why?"}]},
        ],
    )
    with caplog.at_level(logging.WARNING):
        read = read_prompts(path, system_prompt="Default system.")
    assert [r.line for r in read.records] == [1, 9]
    assert read.records[0].columns == {"answer": "5", "id": 7}
    assert read.records[0].messages[0] == {"role": "system", "content": "Default system."}
    assert read.records[1].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
    ]
    assert read.skipped == {
        "not JSON": 1,
        "no prompt": 1,
        "prompt does not end with a user message": 2,
        "not a JSON object": 1,
        "empty prompt": 1,
    }
    assert read.total == 8
    assert "prompt does not end with a user message: 2 (lines 5, 6)" in caplog.text
    assert "not JSON: 1 (line 2)" in caplog.text


def test_a_json_list_and_a_record_system_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "Q1", "system": "Own system."}, {"prompt": "Q2"}]))
    read = read_prompts(path, system_prompt="")
    assert read.records[0].messages[0] == {"role": "system", "content": "Own system."}
    assert read.records[1].messages == [{"role": "user", "content": "Q2"}]


def test_a_file_without_a_usable_record_is_refused_naming_it(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "no prompt"}, "nope"])
    with pytest.raises(
        CptkitError, match=r"grpo.prompts: .*bad.jsonl: no usable prompt record \(no prompt: 1"
    ):
        read_prompts(path)
    with pytest.raises(CptkitError, match=r"grpo.prompts: .*missing.jsonl does not exist"):
        read_prompts(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("template", ["seed", "chat"])
def test_the_grpo_prompt_is_sfts_text_up_to_where_the_answer_starts(
    tmp_path, tiny_tokenizer, chat_tokenizer, template
):
    """The equivalence test: the same exchange as a GRPO prompt and as an SFT conversation; the prompt is
    a prefix of SFT's rendered text and SFT's (last) assistant span starts where it ends."""
    tokenizer = chat_tokenizer if template == "chat" else tiny_tokenizer
    first = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    cases = [
        ([{"role": "user", "content": "What is 2 plus 3?"}], "5"),  # single turn, default system prompt
        (first + [{"role": "user", "content": "Another one?"}], "Red."),  # multi-turn
    ]
    grpo_path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": a} for p, a in cases])
    sft_path = write_jsonl(
        tmp_path / "s.jsonl", [{"messages": p + [{"role": "assistant", "content": a}]} for p, a in cases]
    )
    cfg = grpo_config(grpo_path, template=template, heldout_fraction=0.0, system_prompt="You answer briefly.")
    sets = build_prompt_sets(cfg, tokenizer, seed=0, default_system_prompt="ignored: grpo sets its own")
    by_answer = {p["answer"]: p["prompt"] for p in sets.train}
    sft = read_conversations(sft_path, system_prompt="You answer briefly.")
    for conversation, (_, answer) in zip(sft.conversations, cases, strict=True):
        if template == "seed":
            text, spans = render_seed(conversation.messages, tokenizer.eos_token)
        else:
            text, spans = render_chat(conversation.messages, tokenizer)
        prompt = by_answer[answer]
        assert text.startswith(prompt)
        assert spans[-1][0] == len(prompt)
        assert text[len(prompt) :].strip().startswith(answer)
        assert "You answer briefly." in prompt
    if template == "seed":  # what TRL feeds the model for a text prompt: SFT's tokens before the answer
        conversation = sft.conversations[0]
        text, spans = render_seed(conversation.messages, tokenizer.eos_token)
        sft_ids = tokenizer(text)["input_ids"]
        prompt_ids = tokenizer(by_answer["5"])["input_ids"]
        assert sft_ids[: len(prompt_ids)] == prompt_ids
        assert prompt_ids[-1] != sft_ids[len(prompt_ids)]  # the prompt ends on ###Answer:, the answer follows
    assert sets.stats["template"] == template


def test_skips_are_counted_by_reason(tmp_path, tiny_tokenizer):
    records = questions(6) + [{"prompt": "No answer here."}, {"prompt": "Null answer.", "answer": None}]
    records.append({"prompt": "word " * 400, "answer": "1"})
    path = write_jsonl(tmp_path / "p.jsonl", records + ["garbage"])
    rewards = [RewardConfig(type="length"), RewardConfig(type="regex", pattern="is {answer}")]
    cfg = grpo_config(path, rewards=rewards, max_prompt_length=64, heldout_fraction=0.0, template="seed")
    sets = build_prompt_sets(cfg, tiny_tokenizer, seed=1)
    assert sets.stats == {
        "prompts": str(path),
        "template": "seed",
        "records": 10,
        "skipped": {
            "not JSON": 1,
            "no answer (a reward compares with it)": 2,
            "longer than grpo.max_prompt_length=64 tokens": 1,
        },
        "train_prompts": 6,
        "heldout_prompts": 0,
        "heldout_source": "fraction",
    }
    assert sorted(p["level"] for p in sets.train) == [0, 0, 1, 1, 2, 2]
    # A reward that reads no reference keeps the records without one.
    cfg = grpo_config(path, rewards=[RewardConfig(type="length")], max_prompt_length=64, template="seed")
    assert build_prompt_sets(cfg, tiny_tokenizer).stats["skipped"] == {
        "not JSON": 1,
        "longer than grpo.max_prompt_length=64 tokens": 1,
    }


def test_nothing_usable_after_the_checks_is_refused(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "No answer."}])
    with pytest.raises(CptkitError, match=r"grpo.prompts: .*no prompt is usable \(1 no answer"):
        build_prompt_sets(grpo_config(path, template="seed"), tiny_tokenizer)


def test_the_heldout_split_is_deterministic_disjoint_and_capped(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", questions(40))
    cfg = grpo_config(path, heldout_fraction=0.25, template="seed")
    a, b = build_prompt_sets(cfg, tiny_tokenizer, seed=3), build_prompt_sets(cfg, tiny_tokenizer, seed=3)
    assert a.train == b.train and a.heldout == b.heldout
    assert len(a.heldout) == 10 and len(a.train) == 30
    held = {p["prompt"] for p in a.heldout}
    assert not held & {p["prompt"] for p in a.train}
    assert len(held | {p["prompt"] for p in a.train}) == 40
    other = build_prompt_sets(cfg, tiny_tokenizer, seed=4)
    assert {p["prompt"] for p in other.heldout} != held
    capped = build_prompt_sets(
        grpo_config(path, heldout_fraction=0.25, heldout_max=4, template="seed"), tiny_tokenizer
    )
    assert (len(capped.heldout), len(capped.train)) == (4, 36)
    assert [heldout_count(n, f, 128) for n, f in [(2, 0.01), (1, 0.5), (10, 0.0), (3, 0.9)]] == [1, 0, 0, 2]


def test_heldout_prompts_from_their_own_file(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", questions(5))
    held = write_jsonl(tmp_path / "held.jsonl", questions(8)[5:] + [{"prompt": "no answer"}])
    cfg = grpo_config(train, heldout_prompts=str(held), heldout_max=2, template="seed")
    sets = build_prompt_sets(cfg, tiny_tokenizer, seed=0)
    assert len(sets.train) == 5 and len(sets.heldout) == 2
    assert {p["answer"] for p in sets.heldout} <= {"10", "12", "14"}
    assert sets.stats["heldout_source"] == str(held)
    assert sets.stats["skipped"] == {"heldout: no answer (a reward compares with it)": 1}


def test_chat_template_requested_without_one_names_the_grpo_setting(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", questions(2))
    with pytest.raises(CptkitError, match="grpo.template: chat, but the tokenizer has no chat template"):
        build_prompt_sets(grpo_config(path, template="chat"), tiny_tokenizer)

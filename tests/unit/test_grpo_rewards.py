"""GRPO rewards: each built-in reward's hits and misses, names, weights, user functions from a module and
from a file, and every refusal with the YAML path of its setting."""

from __future__ import annotations

import math
import pickle
import textwrap

import pytest

from cptkit.config.grpo import RewardConfig
from cptkit.errors import CptkitError
from cptkit.grpo.rewards import (
    build_rewards,
    completion_text,
    length_reward,
    reward_weights,
    score_completions,
)


def one(**kwargs):
    [fn] = build_rewards([RewardConfig(**kwargs)])
    return fn


def call(fn, completions, **columns):
    return fn(prompts=["p"] * len(completions), completions=completions, completion_ids=None, **columns)


def test_exact_compares_the_stripped_answer_case_insensitively_by_default():
    fn = one(type="exact")
    assert call(fn, [" Paris\n", "paris", "Lyon", "Paris"], answer=["Paris", "PARIS", "Paris", None]) == [
        1.0,
        1.0,
        0.0,
        None,
    ]
    strict = one(type="exact", case_sensitive=True)
    assert call(strict, ["paris", "Paris"], answer=["Paris", "Paris"]) == [0.0, 1.0]


def test_exact_with_extract_reads_the_first_group_and_misses_without_a_match():
    fn = one(type="exact", extract=r"<answer>(.*?)</answer>", answer_field="gold")
    completions = ["think...<answer> 42 </answer>", "<answer>41</answer>", "42 but no tags"]
    assert call(fn, completions, gold=["42", "42", "42"]) == [1.0, 0.0, 0.0]


def test_regex_with_and_without_the_reference():
    plain = one(type="regex", pattern=r"\bbecause\b")
    assert call(plain, ["yes, because so", "Because!", "becausewhy"]) == [1.0, 1.0, 0.0]
    with_answer = one(type="regex", pattern=r"answer is {answer}(?!\d)")
    # The reference is escaped: "3.5" must not match "3x5", "(a)" is literal.
    got = call(
        with_answer,
        ["The answer is 3.5.", "the answer is 3x5", "answer is (a)", "x"],
        answer=["3.5"] * 2 + ["(a)", None],
    )
    assert got == [1.0, 0.0, 1.0, None]


def test_numeric_last_number_extract_commas_and_tolerances():
    fn = one(type="numeric")
    completions = ["2 + 2 = 4", "first 4 then 5", "It is 1,234 dollars", "no number", "-3.5", "42"]
    refs = [4, "4", "1234", "7", -3.5, "forty-two"]
    assert call(fn, completions, answer=refs) == [1.0, 0.0, 1.0, 0.0, 1.0, None]
    tagged = one(type="numeric", extract=r"#### (.*)", tolerance=0.01)
    assert call(tagged, ["steps 7 then #### 12.005", "#### 12.1", "12"], answer=[12, 12, 12]) == [
        1.0,
        0.0,
        0.0,
    ]
    relative = one(type="numeric", relative_tolerance=0.05)
    assert call(relative, ["104", "106", "0.01"], answer=[100, 100, 0]) == [1.0, 0.0, 0.0]


def test_format_is_a_full_match_across_lines():
    fn = one(type="format", pattern=r"<think>.*</think>\s*<answer>.*</answer>")
    completions = [
        "<think>a\nb</think>\n<answer>1</answer>\n",
        "<answer>1</answer>",
        "x <think></think><answer></answer>",
    ]
    assert call(fn, completions) == [1.0, 0.0, 0.0]


def test_length_is_one_inside_the_range_and_falls_linearly_outside():
    assert [length_reward(n, 10, 20) for n in (0, 5, 10, 20, 30, 40, 50)] == [0.0, 0.5, 1, 1, 0.5, 0.0, 0.0]
    fn = one(type="length", min_chars=2, max_chars=4)
    assert call(fn, ["a", "abc", "abcdef"]) == [0.5, 1.0, 0.5]


def test_chat_completions_are_read_as_their_assistant_text():
    chat = [{"role": "assistant", "content": "Paris"}]
    assert completion_text(chat) == "Paris"
    assert (
        completion_text([{"role": "assistant", "content": [{"type": "text", "text": "Pa"}, {"text": "ris"}]}])
        == "Paris"
    )
    assert call(one(type="exact"), [chat], answer=["paris"]) == [1.0]


def test_names_default_to_the_type_and_repeat_with_a_suffix(tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text("def brevity(completions, **kw):\n    return [1.0 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    configs = [
        RewardConfig(type="exact"),
        RewardConfig(type="exact"),
        RewardConfig(type="length", name="short"),
        RewardConfig(type="exact"),
        RewardConfig(type="function", function="my_rewards:brevity"),
    ]
    assert [f.__name__ for f in build_rewards(configs)] == ["exact", "exact_2", "short", "exact_3", "brevity"]


def test_weights_and_scores_treat_none_as_zero_in_the_total_and_nan_per_function():
    configs = [RewardConfig(type="exact", weight=2.0), RewardConfig(type="length", max_chars=5, weight=0.5)]
    functions = build_rewards(configs)
    assert reward_weights(configs) == [2.0, 0.5]
    scored = score_completions(
        functions, reward_weights(configs), ["p"] * 3, ["abc", "xyz", "abc"], {"answer": ["abc", "abc", None]}
    )
    assert scored.total == [2.5, 0.5, 0.5]
    assert scored.per_function["length"] == [1.0, 1.0, 1.0]
    assert scored.per_function["exact"][:2] == [1.0, 0.0] and math.isnan(scored.per_function["exact"][2])


def test_a_user_function_from_a_module_gets_trls_arguments(tmp_path, monkeypatch):
    (tmp_path / "reward_mod.py").write_text(
        textwrap.dedent(
            """
            def says_answer(prompts, completions, completion_ids=None, answer=None, **kwargs):
                return [float(a in c) for c, a in zip(completions, answer)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    [fn] = build_rewards([RewardConfig(type="function", function="reward_mod:says_answer")])
    assert call(fn, ["it is 5", "it is 6"], answer=["5", "5"], trainer_state=None) == [1.0, 0.0]
    assert pickle.loads(pickle.dumps(fn)).__name__ == "says_answer"


def test_a_user_function_from_a_file_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "score.py").write_text(
        "def long_enough(completions, **kw):\n    return [len(c) / 10 for c in completions]\n"
    )
    monkeypatch.chdir(tmp_path)
    [fn] = build_rewards([RewardConfig(type="function", function="rw/score.py:long_enough")])
    assert fn.__name__ == "long_enough"
    assert call(fn, ["12345", ""]) == [0.5, 0.0]


@pytest.mark.parametrize(
    "config, where, words",
    [
        (
            RewardConfig(type="regex", pattern="(unclosed"),
            "grpo.rewards[1].pattern:",
            "missing ), unterminated subpattern",
        ),
        (RewardConfig(type="format", pattern="a(?"), "grpo.rewards[1].pattern:", "valid regular expression"),
        (
            RewardConfig(type="regex", pattern="[{answer}"),
            "grpo.rewards[1].pattern:",
            "unterminated character set",
        ),
        (RewardConfig(type="exact", extract="(?P<"), "grpo.rewards[1].extract:", "valid regular expression"),
        (
            RewardConfig(type="function", function="no_such_module_xyz:f"),
            "grpo.rewards[1].function:",
            "not found",
        ),
        (
            RewardConfig(type="function", function="json:no_such"),
            "grpo.rewards[1].function:",
            "has no 'no_such'",
        ),
        (RewardConfig(type="function", function="math:pi"), "grpo.rewards[1].function:", "not a function"),
        (
            RewardConfig(type="function", function="nowhere/file.py:f"),
            "grpo.rewards[1].function:",
            "does not exist",
        ),
        (RewardConfig(type="function", function="justaname"), "grpo.rewards[1].function:", "module:function"),
        (RewardConfig(type="regex"), "grpo.rewards[1].pattern:", "needs a pattern"),
    ],
)
def test_every_config_problem_is_refused_at_build_time_with_its_path(config, where, words):
    with pytest.raises(CptkitError) as e:
        build_rewards([RewardConfig(type="length"), config])
    assert str(e.value).startswith(where) and words in str(e.value)


def test_a_file_that_fails_to_import_is_refused_with_its_error(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('needs a key')\n")
    with pytest.raises(
        CptkitError,
        match=r"grpo.rewards\[0\].function: importing .*broken.py failed: RuntimeError: needs a key",
    ):
        build_rewards([RewardConfig(type="function", function=f"{bad}:f")])


def test_a_missing_reference_column_is_refused_at_call_time_naming_the_reward():
    fn = build_rewards([RewardConfig(type="length"), RewardConfig(type="regex", pattern="is {answer}")])[1]
    assert call(fn, ["is 3"], answer=["3"]) == [1.0]
    with pytest.raises(
        CptkitError, match=r"grpo.rewards\[1\].answer_field: the prompt records have no 'answer' field"
    ):
        call(fn, ["is 3"], question=["q"])


@pytest.mark.parametrize(
    "body, words",
    [
        ("return [1.0]", "returned 1 values for 2 completions"),
        ("return [1.0, 'high']", "returned 'high' (str) for completion 1"),
        ("return 1.0", "returned a float"),
    ],
)
def test_a_user_function_returning_the_wrong_thing_is_named_at_call_time(tmp_path, body, words):
    path = tmp_path / "wrong.py"
    path.write_text(f"def bad(completions, **kw):\n    {body}\n")
    [fn] = build_rewards([RewardConfig(type="function", function=f"{path}:bad")])
    with pytest.raises(CptkitError) as e:
        call(fn, ["a", "b"])
    assert str(e.value).startswith(f"grpo.rewards[0].function: {path}:bad") and words in str(e.value)

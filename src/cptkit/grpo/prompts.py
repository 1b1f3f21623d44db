"""Prompt records -> the rendered prompts GRPO samples from, split into train and held-out sets.

A record is `{"prompt": text or chat messages ending with a user turn, "system"?: text, ...}`; every
other field (e.g. `answer`) is kept as a column, which TRL hands to the reward functions. Prompts are
rendered as SFT renders them, so the policy continues exactly where SFT taught it to answer: the chat
template with the generation prompt, or the seed's `###System/###Question/###Answer:` prefix. A bad
record is skipped and counted by reason, never dropped silently.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptkit.config.grpo import GrpoConfig, RewardConfig
from cptkit.errors import CptkitError
from cptkit.grpo.rewards import ANSWER
from cptkit.sft.formats import _ROLE_ALIASES, ROLES, numbered_records
from cptkit.sft.render import choose_template, render_seed_prompt

log = logging.getLogger(__name__)
RESERVED = ("prompt", "system")  # the fields that make the prompt; every other one is a column
_FIRST_LINES = 5  # line numbers logged per skip reason


@dataclass
class PromptRecord:
    """One usable record: its chat turns (system?, then user/assistant, ending with a user turn), its
    other fields, and where it came from (line of a .jsonl, index of a .json list)."""

    messages: list[dict[str, str]]
    columns: dict[str, Any]
    line: int


@dataclass
class PromptRead:
    """The usable records of a prompt file and what was skipped (reason -> count, first line numbers)."""

    path: str
    records: list[PromptRecord] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    lines: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        if len(self.lines[reason]) < _FIRST_LINES:
            self.lines[reason].append(line)

    @property
    def total(self) -> int:
        return len(self.records) + sum(self.skipped.values())

    def summary(self) -> str:
        """'no prompt: 3 (lines 2, 5, 9), ...' for the log and for errors."""
        return ", ".join(
            f"{reason}: {n} (line{'s' if n > 1 else ''} {', '.join(map(str, self.lines[reason]))}"
            f"{', ...' if n > len(self.lines[reason]) else ''})"
            for reason, n in self.skipped.most_common()
        )


@dataclass
class PromptSets:
    """The prompts of training and of the before/after scoring: {"prompt": rendered text, **columns}."""

    train: list[dict]
    heldout: list[dict]
    stats: dict


def prompt_messages(record: dict, system_prompt: str) -> list[dict[str, str]]:
    """The chat turns of one record, or ValueError with the reason it is skipped."""
    prompt = record.get("prompt")
    if prompt is None:
        raise ValueError("no prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("empty prompt")
        turns = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        turns = _checked_turns(prompt)
    else:
        raise ValueError("prompt is neither text nor a list of messages")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError("system is not text")
    if turns[0]["role"] != "system":
        system = system if system is not None else system_prompt
        if system:
            turns.insert(0, {"role": "system", "content": system})
    return turns


def _checked_turns(raw: list) -> list[dict[str, str]]:
    if not raw:
        raise ValueError("prompt is an empty list")
    turns = []
    for turn in raw:
        if not isinstance(turn, dict):
            raise ValueError("a prompt message is not a mapping")
        role = _ROLE_ALIASES.get(turn.get("role"), turn.get("role"))
        if role not in ROLES:
            raise ValueError("unknown role in prompt")
        if not isinstance(turn.get("content"), str):
            raise ValueError("prompt message content is not text")
        turns.append({"role": role, "content": turn["content"]})
    if any(t["role"] == "system" for t in turns[1:]):
        raise ValueError("system message after the first")
    dialogue = [t for t in turns if t["role"] != "system"]
    if not dialogue or dialogue[-1]["role"] != "user":
        raise ValueError("prompt does not end with a user message")
    if dialogue[0]["role"] != "user":
        raise ValueError("prompt does not start with a user message")
    if any(a["role"] == b["role"] for a, b in zip(dialogue, dialogue[1:], strict=False)):
        raise ValueError("user and assistant messages do not alternate")
    if not dialogue[-1]["content"].strip():
        raise ValueError("empty prompt")
    return turns


def read_prompts(path: str | Path, system_prompt: str | None = "", where: str = "grpo.prompts") -> PromptRead:
    """Every usable record of a .jsonl (one JSON object a line) or .json (a list) file; bad records are
    skipped and counted by reason (the first line numbers logged). Reads no model, so a command checks
    its prompt file before loading one; a file with no usable record is a CptkitError."""
    read = PromptRead(str(path))
    for line, record in numbered_records(path, where, expected="prompt records"):
        if record is None:
            read.skip("not JSON", line)
            continue
        if not isinstance(record, dict):
            read.skip("not a JSON object", line)
            continue
        try:
            messages = prompt_messages(record, system_prompt or "")
        except ValueError as e:
            read.skip(str(e), line)
            continue
        columns = {k: v for k, v in record.items() if k not in RESERVED}
        read.records.append(PromptRecord(messages, columns, line))
    if read.skipped:
        log.warning(
            "%s: %s: skipped %d record(s): %s", where, path, sum(read.skipped.values()), read.summary()
        )
    if not read.records:
        raise CptkitError(
            f"{where}: {path}: no usable prompt record ({read.summary() or 'the file is empty'}); expected "
            'records like {"prompt": "What is 2+3?", "answer": "5"} or {"prompt": [{"role": "user", '
            '"content": ...}], ...}'
        )
    return read


def render_prompt(messages: list[dict[str, str]], tokenizer: Any, template: str) -> str:
    """The text a completion continues, as SFT renders it: the chat template with the generation prompt,
    or the seed's text up to `###Answer:`."""
    if template == "seed":
        return render_seed_prompt(messages, tokenizer.eos_token or "")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_tokens(text: str, tokenizer: Any, template: str) -> int:
    """Tokens of a rendered prompt, counted as SFT tokenizes (the seed adds the tokenizer's BOS; a chat
    template writes its special tokens itself)."""
    return len(tokenizer(text, add_special_tokens=template == "seed")["input_ids"])


def reference_fields(rewards: list[RewardConfig]) -> list[str]:
    """The record fields the rewards compare with: answer_field of exact, numeric and {answer} regex."""
    fields = []
    for cfg in rewards:
        uses = cfg.type in ("exact", "numeric") or (cfg.type == "regex" and ANSWER in (cfg.pattern or ""))
        if uses and cfg.answer_field not in fields:
            fields.append(cfg.answer_field)
    return fields


def usable_prompts(
    read: PromptRead, tokenizer: Any, template: str, grpo_cfg: GrpoConfig, skipped: Counter, prefix: str = ""
) -> list[dict]:
    """The rendered prompts of `read` that have the fields the rewards need and fit max_prompt_length;
    the others are counted in `skipped` (reasons prefixed with `prefix`)."""
    needed = reference_fields(grpo_cfg.rewards)
    limit = grpo_cfg.max_prompt_length
    prompts = []
    for record in read.records:
        missing = [name for name in needed if record.columns.get(name) is None]
        if missing:
            skipped[f"{prefix}no {missing[0]} (a reward compares with it)"] += 1
            continue
        text = render_prompt(record.messages, tokenizer, template)
        if prompt_tokens(text, tokenizer, template) > limit:
            skipped[f"{prefix}longer than grpo.max_prompt_length={limit} tokens"] += 1
            continue
        prompts.append({"prompt": text, **record.columns})
    return prompts


def build_prompt_sets(
    grpo_cfg: GrpoConfig,
    tokenizer: Any,
    seed: int = 1234,
    default_system_prompt: str | None = "",
    read: PromptRead | None = None,
) -> PromptSets:
    """Rendered train and held-out prompts and their stats (grpo_prompts.json). Held out: the
    heldout_prompts file when set, else heldout_fraction of the shuffled prompts (at least one when the
    fraction is above 0 and there are two or more); at most heldout_max either way. `read`: the prompt
    file already read by `read_prompts`, when the caller checked it before loading a model."""
    system = grpo_cfg.system_prompt if grpo_cfg.system_prompt is not None else (default_system_prompt or "")
    template = choose_template(tokenizer, grpo_cfg.template, where="grpo.template")
    read = read or read_prompts(grpo_cfg.prompts, system)
    skipped = Counter(read.skipped)
    prompts = usable_prompts(read, tokenizer, template, grpo_cfg, skipped)
    if not prompts:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.items())
        raise CptkitError(
            f"grpo.prompts: {grpo_cfg.prompts}: no prompt is usable ({reasons}); "
            "add the fields the rewards compare with, or raise grpo.max_prompt_length"
        )
    random.Random(seed).shuffle(prompts)
    if grpo_cfg.heldout_prompts:
        held_read = read_prompts(grpo_cfg.heldout_prompts, system, where="grpo.heldout_prompts")
        skipped.update({f"heldout: {r}": n for r, n in held_read.skipped.items()})
        heldout = usable_prompts(held_read, tokenizer, template, grpo_cfg, skipped, prefix="heldout: ")
        random.Random(seed).shuffle(heldout)
        heldout, train, source = heldout[: grpo_cfg.heldout_max], prompts, str(grpo_cfg.heldout_prompts)
    else:
        count = heldout_count(len(prompts), grpo_cfg.heldout_fraction, grpo_cfg.heldout_max)
        heldout, train, source = prompts[:count], prompts[count:], "fraction"
    stats = {
        "prompts": str(grpo_cfg.prompts),
        "template": template,
        "records": read.total,
        "skipped": dict(skipped),
        "train_prompts": len(train),
        "heldout_prompts": len(heldout),
        "heldout_source": source,
    }
    log.info(
        "grpo prompts: %d train, %d held out (%s), %s template, %d skipped",
        len(train),
        len(heldout),
        source,
        template,
        sum(skipped.values()),
    )
    return PromptSets(train, heldout, stats)


def heldout_count(total: int, fraction: float, cap: int) -> int:
    """How many of `total` prompts are held out: round(total * fraction), at least 1 when the fraction is
    above 0 and there are 2+, never all of them, at most `cap`."""
    count = round(total * fraction)
    if fraction > 0 and total >= 2:
        count = max(count, 1)
    return max(0, min(count, total - 1, cap))

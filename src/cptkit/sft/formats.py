"""Instruction records (alpaca or chat `messages`) read into one shape: a list of chat turns.

Alpaca rows `{instruction, input?, output, system?}` become system/user/assistant turns; chat rows
`{messages: [{role, content}, ...]}` are checked (known roles, text content, at least one assistant
turn, no assistant turn before a user turn). A bad record is skipped and counted by reason, never
dropped silently; a file where nothing is usable is an error that says what the records looked like.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cptkit.errors import CptkitError

Format = Literal["auto", "alpaca", "messages"]
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class Conversation:
    """One training example: chat turns, each {role, content}; every assistant turn is trained."""

    messages: list[dict[str, str]]


@dataclass
class ReadResult:
    """The usable conversations of a file, and what was skipped (reason -> count)."""

    conversations: list[Conversation] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    format: str = ""


def iter_records(path: str | Path, where: str = "sft.data") -> Iterator[Any]:
    """Records of a .jsonl file (one JSON value a line) or a .json file holding a list (`where`: the
    setting that names the file, for messages)."""
    for _, record in numbered_records(path, where):
        yield record


def numbered_records(
    path: str | Path, where: str = "sft.data", expected: str = "instruction records"
) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a .jsonl file, (1-based index, record) of a .json list; a line that is
    not JSON comes as None, for the caller to count."""
    path = Path(path)
    if not path.is_file():
        raise CptkitError(f"{where}: {path} does not exist (expected a .jsonl or .json file of {expected})")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CptkitError(f"{where}: {path} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise CptkitError(f"{where}: {path} holds a {type(data).__name__}; expected a list of records")
        yield from enumerate(data, start=1)
        return
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError:
                    yield number, None  # counted as "not JSON" by the caller


def detect_format(record: Any) -> str | None:
    """`messages`, `alpaca`, or None when the record is neither."""
    if isinstance(record, dict):
        if "messages" in record or "conversations" in record:
            return "messages"
        if "instruction" in record and "output" in record:
            return "alpaca"
    return None


def from_alpaca(record: dict, system_prompt: str) -> Conversation:
    """instruction (+ input) -> user turn, output -> assistant turn, system or the default system prompt."""
    for key in ("instruction", "output"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"empty {key}")
    user = record["instruction"].strip()
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        user = f"{user}\n\n{extra.strip()}"
    system = record.get("system") if isinstance(record.get("system"), str) else system_prompt
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"].strip()}]
    return Conversation(([{"role": "system", "content": system}] if system else []) + turns)


def from_messages(record: dict, system_prompt: str) -> Conversation:
    """Chat turns checked and normalised; the default system prompt is added when there is none."""
    raw = record.get("messages", record.get("conversations"))
    if not isinstance(raw, list) or not raw:
        raise ValueError("messages is not a non-empty list")
    turns = []
    for turn in raw:
        if not isinstance(turn, dict):
            raise ValueError("a turn is not a mapping")
        role = turn.get("role", turn.get("from"))
        role = _ROLE_ALIASES.get(role, role)
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise ValueError("unknown role")
        if not isinstance(content, str):
            raise ValueError("content is not text")
        turns.append({"role": role, "content": content})
    if any(t["role"] == "system" for t in turns[1:]):
        raise ValueError("system turn after the first")
    dialogue = [t for t in turns if t["role"] != "system"]
    if not any(t["role"] == "assistant" for t in dialogue):
        raise ValueError("no assistant turn")
    if dialogue[0]["role"] != "user":
        raise ValueError("first turn is not a user turn")
    if any(a["role"] == b["role"] for a, b in zip(dialogue, dialogue[1:], strict=False)):
        raise ValueError("user and assistant turns do not alternate")
    if not any(t["content"].strip() for t in dialogue if t["role"] == "assistant"):
        raise ValueError("empty assistant turns")
    if turns[0]["role"] != "system" and system_prompt:
        turns.insert(0, {"role": "system", "content": system_prompt})
    return Conversation(turns)


def read_conversations(
    path: str | Path, fmt: Format = "auto", system_prompt: str = "", where: str = "sft.data"
) -> ReadResult:
    """Every record of `path` as a Conversation; bad records are skipped and counted by reason."""
    result = ReadResult()
    for record in iter_records(path, where):
        if record is None:
            result.skipped["not JSON"] += 1
            continue
        found = detect_format(record)
        if found is None or (fmt != "auto" and found != fmt):
            result.skipped[f"not {fmt if fmt != 'auto' else 'alpaca or messages'}"] += 1
            continue
        result.format = result.format or found
        try:
            convert = from_alpaca if found == "alpaca" else from_messages
            result.conversations.append(convert(record, system_prompt))
        except ValueError as e:
            result.skipped[str(e)] += 1
    if not result.conversations:
        reasons = ", ".join(f"{n} {r}" for r, n in result.skipped.most_common()) or "the file is empty"
        raise CptkitError(
            f"{where}: {path}: no usable record ({reasons}); expected alpaca rows "
            '{"instruction", "input", "output"} or chat rows {"messages": [{"role", "content"}, ...]}'
        )
    return result

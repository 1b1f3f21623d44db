"""Conversations -> token ids and labels: loss on assistant turns only, every assistant turn trained.

The text comes from the tokenizer's chat template, or from the seed's template when there is none:

    ###System: {system}
    ###Question: {user}
    ###Answer: {assistant}</s>

Rendering yields the text plus the character spans of the assistant turns (with their end-of-turn
token, so the model learns to stop); one tokenization with offsets then marks each token trained or
not. A token is trained when it ends inside an assistant span, so a token that BPE merged across the
prompt/response boundary is still predicted. System and user tokens get label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cptkit.errors import CptkitError
from cptkit.sft.formats import Conversation

IGNORE_INDEX = -100
Template = Literal["auto", "chat", "seed"]


@dataclass
class Example:
    """One rendered conversation: ids and labels of equal length (labels -100 where no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def choose_template(tokenizer: Any, template: Template, where: str = "sft.template") -> str:
    """`chat` or `seed`: auto takes the tokenizer's chat template when it has one (`where`: the setting)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise CptkitError(
            f"{where}: chat, but the tokenizer has no chat template; use template: seed "
            "(###System/###Question/###Answer) or a tokenizer that has one"
        )
    if template == "auto":
        return "chat" if has_chat else "seed"
    return template


def render_seed(messages: list[dict[str, str]], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The seed's ###System/###Question/###Answer text and its assistant spans.

    The space after `###Answer:` belongs to the answer, so the first answer token is whole in the span."""
    text, spans = "", []
    for turn in messages:
        role, content = turn["role"], turn["content"].strip()
        if role != "assistant":
            text += seed_prompt_turn(role, content)
        else:
            start = len(text)
            text += f" {content}{eos_token}"
            spans.append((start, len(text)))
            text += "\n"
    return text, spans


def seed_prompt_turn(role: str, content: str) -> str:
    """The seed's text for a system or user turn; a user turn ends with `###Answer:`, where the answer
    starts (the prompt a model generates from)."""
    if role == "system":
        return f"###System: {content}\n"
    return f"###Question: {content}\n###Answer:"


def render_seed_prompt(messages: list[dict[str, str]], eos_token: str) -> str:
    """The seed text of a conversation that ends with a user turn: exactly what `render_seed` writes
    before the answer to that turn (earlier answers included)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt ends with a user turn")
    return render_seed(messages, eos_token)[0]


def render_chat(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's text and its assistant spans, found by rendering growing prefixes."""

    def apply(turns: list[dict[str, str]], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    text = apply(messages, False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before, through = apply(messages[:i], True), apply(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise CptkitError(
                "sft.template: the tokenizer's chat template renders earlier turns differently once later "
                "turns follow, so response tokens cannot be located; use sft.template: seed"
            )
        spans.append((len(before), len(through)))
    return text, spans


def render(conversation: Conversation, tokenizer: Any, template: str) -> Example:
    """Token ids and labels of one conversation under `template` (`chat` or `seed`)."""
    if template == "seed":
        text, spans = render_seed(conversation.messages, tokenizer.eos_token or "")
    else:
        text, spans = render_chat(conversation.messages, tokenizer)
    # The seed text starts with the tokenizer's own BOS; a chat template writes its specials itself.
    encoded = tokenizer(text, add_special_tokens=template == "seed", return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(a < end <= b for a, b in spans):
            labels[k] = ids[k]
    return Example(ids, labels)

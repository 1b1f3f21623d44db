"""The chat-retention probe: how well each evaluated model still answers instructions in its chat format.

Continued pretraining of an instruction-tuned base on raw text can lower perplexity on every raw text
while it loses the chat behaviour, which no raw-text perplexity shows. The probe is the mean loss of the
ANSWER tokens of held-out instruction examples given their chat-templated prompt, rendered exactly as
`cptkit sft` renders them (`cptkit.sft.render`, the sft section's system prompt and format), on every
evaluated model; a rise against the base is chat behaviour lost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cptkit.config.evaluate import ChatProbeConfig, EvalModel
from cptkit.config.sft import SftConfig
from cptkit.errors import CptkitError
from cptkit.eval.bootstrap import RESAMPLES, perplexity_change_interval
from cptkit.eval.each_model import each_model, model_tokenizer
from cptkit.eval.results import interval_text
from cptkit.sft.formats import Conversation, read_conversations
from cptkit.sft.render import IGNORE_INDEX, Example, render

WHERE = "eval.chat_probe.path"


@dataclass
class ChatProbe:
    """The probe's examples, read and checked before any model loads."""

    conversations: list[Conversation]
    skipped: dict[str, int]

    def run(
        self,
        models: Sequence[EvalModel],
        device: torch.device,
        dtype: torch.dtype,
        max_length: int,
        batch_size: int,
        trust_remote_code: bool = False,
        resamples: int = RESAMPLES,
    ) -> dict[str, dict[str, Any]]:
        """results.json's `chat_probe`: {model: {loss, perplexity, examples, tokens}}, and for each model
        but the base its answer perplexity's change against the base with a 95% paired bootstrap
        interval over the examples (`perplexity_change`, `perplexity_change_interval`, fractions)."""
        scored = {
            spec.name: answer_loss(model, tokenizer, self.conversations, max_length, batch_size)
            for spec, model, tokenizer in each_model(models, device, dtype, trust_remote_code)
        }
        base = scored.get("base")
        for name, r in scored.items():
            if base is not None and name != "base":
                r.update(_change_against(base, r, resamples))
        for r in scored.values():  # per-example numbers are for the interval only
            r.pop("example_nats"), r.pop("example_tokens")
        return scored


def prepare_probe(
    cfg: ChatProbeConfig,
    sft: SftConfig | None,
    models: Sequence[EvalModel],
    trust_remote_code: bool = False,
) -> ChatProbe | None:
    """The probe when `eval.chat_probe.path` is set (None when not): its examples read as `cptkit sft`
    reads them, and every model's tokenizer checked for a chat template (refused when one has none)."""
    if cfg.path is None:
        return None
    fmt, system_prompt = (sft.format, sft.system_prompt) if sft else ("auto", _default("system_prompt"))
    read = read_conversations(cfg.path, fmt, system_prompt, where=WHERE)
    for spec in models:
        if not getattr(model_tokenizer(spec, trust_remote_code), "chat_template", None):
            raise CptkitError(
                f"{WHERE}: the tokenizer of model {spec.name!r} ({spec.adapter or spec.path}) has no chat "
                "template: the probe measures the chat behaviour of instruction-tuned models; remove "
                "eval.chat_probe.path for a base model"
            )
    return ChatProbe(read.conversations[: cfg.max_examples], dict(read.skipped))


def _default(name: str) -> Any:
    """A field's default in the sft section (what `cptkit sft` would use)."""
    return next(f.default for f in dataclasses.fields(SftConfig) if f.name == name)


def answer_loss(
    model: Any, tokenizer: Any, conversations: Sequence[Conversation], max_length: int, batch_size: int
) -> dict[str, Any]:
    """Mean loss (nats per token) and perplexity of the answer tokens, each example rendered with the
    chat template and cut at `max_length` tokens (an example left without an answer token is not counted)."""
    examples = [_truncated(render(c, tokenizer, "chat"), max_length) for c in conversations]
    examples = [e for e in examples if e.trained_tokens > 0]
    example_nats: list[float] = []
    example_tokens: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch_nats, batch_tokens = _batch_nats(model, examples[start : start + batch_size])
        example_nats += batch_nats
        example_tokens += batch_tokens
    nats, tokens = sum(example_nats), sum(example_tokens)
    loss = nats / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if tokens and loss < 700 else float("inf"),
        "examples": len(examples),
        "tokens": tokens,
        "example_nats": example_nats,
        "example_tokens": example_tokens,
    }


def _change_against(base: dict[str, Any], after: dict[str, Any], resamples: int) -> dict[str, Any]:
    """The perplexity change of `after`'s answers against `base`'s and its paired bootstrap interval
    (None where the two were not scored on the same examples, e.g. tokenizers that cut them apart)."""
    change = math.expm1(after["loss"] - base["loss"]) if base["tokens"] and after["tokens"] else None
    interval = None
    if len(base["example_nats"]) == len(after["example_nats"]):
        found = perplexity_change_interval(
            base["example_nats"],
            base["example_tokens"],
            after["example_nats"],
            after["example_tokens"],
            resamples,
        )
        interval = found.as_list() if found is not None else None
    return {"perplexity_change": change, "perplexity_change_interval": interval}


def _truncated(example: Example, max_length: int) -> Example:
    return Example(example.input_ids[:max_length], example.labels[:max_length])


@torch.no_grad()
def _batch_nats(model: Any, examples: list[Example]) -> tuple[list[float], list[int]]:
    """Each example's summed answer-token nats in a right-padded batch, and its number of answer tokens."""
    device = next(model.parameters()).device
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
    targets = labels[:, 1:].to(device)  # the token at k+1 is predicted from position k
    nats = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).reshape(targets.shape)
    return nats.sum(dim=1).tolist(), (targets != IGNORE_INDEX).sum(dim=1).tolist()


def probe_change(probe: dict[str, dict[str, Any]], model: str, base: str = "base") -> float | None:
    """The change of a model's answer loss against the base's, in percent (None without a base)."""
    before, after = probe.get(base), probe.get(model)
    if not before or not after or not before["loss"]:
        return None
    return (after["loss"] / before["loss"] - 1) * 100


def markdown_lines(probe: dict[str, dict[str, Any]], base: str = "base") -> list[str]:
    """The report's lines: the base's answer loss, then each model's against it, e.g.
    `merged: answer loss 1.230 -> 1.310 (+6.5%), perplexity 3.42 -> 3.71`."""
    out = []
    for name, r in probe.items():
        change = probe_change(probe, name, base) if name != base else None
        if change is None:
            out.append(
                f"- **{name}**: answer loss {r['loss']:.3f}, perplexity {r['perplexity']:.2f} "
                f"({r['examples']} examples, {r['tokens']:,} answer tokens)"
            )
        else:
            b = probe[base]
            interval = r.get("perplexity_change_interval")
            noise = f", perplexity change 95% interval {interval_text(interval)}" if interval else ""
            out.append(
                f"- **{name}**: answer loss {b['loss']:.3f} -> {r['loss']:.3f} ({change:+.1f}%), "
                f"perplexity {b['perplexity']:.2f} -> {r['perplexity']:.2f}{noise}"
            )
    return out

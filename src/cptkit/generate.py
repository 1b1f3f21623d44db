"""Batched text generation from a causal LM: transformers' `generate` (left padding, seeded sampling or
greedy), or vLLM where it is installed and a GPU is visible. Self-replay sources write their documents
with it; eval's sample generations use it on every evaluated model.

On a CPU, decoding reads every weight once per step whatever the batch, so one large batch is several
times faster than a few small ones: `batch_size` matters on a GPU, where memory bounds it.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

VLLM_HINT = "pip install vllm (on a machine with a CUDA GPU)"


@dataclass(frozen=True)
class Sampling:
    """How each continuation is drawn: temperature 0 is greedy (top_p is then unused)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 1234

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Generated:
    """One continuation: the prompt, the new text alone, prompt and new text as one document, and the
    number of new tokens (through the end-of-sequence token when the model wrote one)."""

    prompt: str
    text: str
    document: str
    new_tokens: int


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(engine: str, where: str) -> str:
    """`transformers` or `vllm`: auto takes vLLM when it is installed and a GPU is visible; `vllm`
    without it is refused with what to install (`where` names the setting)."""
    if engine == "transformers":
        return engine
    if engine == "vllm" and not vllm_installed():
        raise CptkitError(f"{where}: vllm, but vLLM is not installed ({VLLM_HINT}); or use engine: auto")
    if engine == "auto" and not vllm_installed():
        return "transformers"
    import torch

    if torch.cuda.is_available():
        return "vllm"
    if engine == "vllm":
        raise CptkitError(f"{where}: vllm needs a CUDA GPU and none is visible; use engine: auto")
    return "transformers"


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate_with_model(
    model: Any, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, batch_size: int
) -> list[Generated]:
    """Continuations of `prompts` by a loaded model, `batch_size` at a time."""
    return [g for batch in iter_generate(model, tokenizer, prompts, sampling, batch_size) for g in batch]


def iter_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], sampling: Sampling, batch_size: int
) -> Iterator[list[Generated]]:
    """Each batch's continuations as it is done (a caller with a token budget stops early). Left
    padded, so every new token follows its own prompt directly; sampling is seeded once, before the
    first batch, so a prompt that comes twice gets two continuations."""
    import torch

    device = next(model.parameters()).device
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(sampling.seed)
    draw = (
        {"do_sample": False}
        if sampling.greedy
        else {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
    )
    try:
        for batch in batches(list(prompts), batch_size):
            enc = tokenizer(list(batch), return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad():
                ids = model.generate(
                    **enc, max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_id, **draw
                )
            width = enc["input_ids"].shape[1]
            out = []
            for prompt, row, mask in zip(batch, ids, enc["attention_mask"], strict=True):
                new = _until_end(row[width:].tolist(), tokenizer.eos_token_id, pad_id)
                prompt_ids = row[:width][mask.bool()].tolist()
                out.append(
                    Generated(
                        prompt,
                        tokenizer.decode(new, skip_special_tokens=True),
                        tokenizer.decode(prompt_ids + new, skip_special_tokens=True),
                        len(new),
                    )
                )
            yield out
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None


def _until_end(new: list[int], eos: int | None, pad: int | None) -> list[int]:
    """The new tokens through the first end-of-sequence token; without one, the trailing padding
    `generate` adds to finished rows is cut."""
    if eos is not None and eos in new:
        return new[: new.index(eos) + 1]
    while new and pad is not None and new[-1] == pad:
        new = new[:-1]
    return new


def generate_with_vllm(
    model_path: str, prompts: Sequence[str], sampling: Sampling, trust_remote_code: bool = False
) -> list[Generated]:
    """The same continuations by vLLM (its own batching; one seed for the engine, so a prompt that
    comes twice gets two different continuations)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_path), seed=sampling.seed, trust_remote_code=trust_remote_code)
    params = SamplingParams(
        temperature=max(sampling.temperature, 0.0),
        top_p=1.0 if sampling.greedy else sampling.top_p,
        max_tokens=sampling.max_new_tokens,
    )
    out = []
    for prompt, result in zip(prompts, llm.generate(list(prompts), params), strict=True):
        completion = result.outputs[0]
        out.append(Generated(prompt, completion.text, prompt + completion.text, len(completion.token_ids)))
    del llm
    return out

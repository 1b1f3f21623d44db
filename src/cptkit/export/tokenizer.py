"""The tokenizer as GGUF metadata: `tokenizer.ggml.model` gpt2 (byte-level BPE: tokens, token types,
merges, the pre-tokenizer named as llama.cpp names it) or llama (SentencePiece-style BPE with byte
fallback: tokens, scores, token types), special token ids, add_bos_token and the chat template (read by
gguf's SpecialVocab, the same reader llama.cpp's converter uses)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

# llama.cpp's names for byte-level BPE pre-tokenizers (tokenizer.ggml.pre), recognised by the split regex
# in tokenizer.json; a vocabulary split another way is written as "default" (llama.cpp's generic regex)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
PRE_BY_SPLIT = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
FALLBACK_PRE = "default"

# gguf.TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerMeta:
    model: str  # gpt2 | llama
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    special_vocab: Any = None  # gguf.SpecialVocab: merges, special ids, add_bos, chat template
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        sv = self.special_vocab
        ids = sv.special_token_ids
        return {
            "model": self.model,
            "pre": self.pre,
            "tokens": len(self.tokens),
            "merges": len(sv.merges),
            "special": {k: ids.get(k) for k in ("bos", "eos", "pad", "unk")},
            "chat_template": sv.chat_template is not None,
            "notes": self.notes,
        }

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special_vocab.add_to_gguf(writer, quiet=True)


def tokenizer_meta(folder: Path, vocab_size: int) -> TokenizerMeta:
    """Read the fast tokenizer in `folder` (tokenizer.json) into GGUF metadata for `vocab_size` embedding
    rows; rows past the tokenizer's ids become unused `[PAD<i>]` tokens, as llama.cpp's converter does."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CptkitError(
            f"{folder}: no tokenizer.json; the GGUF export needs the fast tokenizer saved with the model"
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise CptkitError(f"{path}: tokenizer model {model.get('type')!r} is not exported (BPE only)")
    byte_fallback = sentencepiece_style(spec)
    tokens, types = _tokens_and_types(spec, model, vocab_size, byte_fallback)
    merges_as_scores = not byte_fallback  # SentencePiece-style files carry scores, not merges
    special = gguf.SpecialVocab(folder, load_merges=merges_as_scores, n_vocab=len(tokens))
    if byte_fallback:
        return TokenizerMeta("llama", None, tokens, types, _merge_scores(model, tokens), special)
    pre, notes = _pre_name(spec.get("pre_tokenizer"))
    return TokenizerMeta("gpt2", pre, tokens, types, None, special, notes)


def sentencepiece_style(spec: dict) -> bool:
    """A BPE that falls back to `<0xXX>` byte tokens (Llama 2, Mistral): llama.cpp's `llama` model. A
    byte-level BPE (a ByteLevel pre-tokenizer or decoder: GPT-2, Llama 3, Qwen2, SmolLM) is `gpt2` even
    when its tokenizer.json says byte_fallback (some converters write that flag on byte-level vocabularies
    that hold no byte tokens, and llama.cpp aborts on such a file written as `llama`)."""
    model = spec.get("model") or {}
    if not model.get("byte_fallback"):
        return False
    if _has_byte_level(spec.get("pre_tokenizer")) or _has_byte_level(spec.get("decoder")):
        return False
    vocab = model.get("vocab") or {}
    return all(f"<0x{b:02X}>" in vocab for b in range(256))


def _has_byte_level(component: dict | None) -> bool:
    if not component:
        return False
    parts = component.get("pretokenizers") or component.get("decoders") or [component]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _tokens_and_types(spec, model, vocab_size: int, byte_fallback: bool) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    top = max(by_id) + 1
    if top > vocab_size:
        raise CptkitError(
            f"the tokenizer has ids up to {top - 1} but the model has {vocab_size} embedding rows; "
            "resize the embeddings (or fix the tokenizer) before exporting"
        )
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(BYTE)
        else:
            tokens.append(token)
            types.append(NORMAL)
    if byte_fallback and model.get("unk_token") in tokens:
        types[tokens.index(model["unk_token"])] = UNKNOWN
    return tokens, types


def _merge_scores(model: dict, tokens: list[str]) -> list[float]:
    """SentencePiece-style scores for a BPE vocabulary: a token made by an earlier merge scores higher,
    so that llama.cpp's score-driven merging reproduces the merge order; base symbols score 0."""
    scores = [0.0] * len(tokens)
    index = {t: i for i, t in enumerate(tokens)}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = index.get(left + right)
        if i is not None and scores[i] == 0.0:
            scores[i] = -float(rank + 1)
    return scores


def _pre_name(pre_tokenizer: dict | None) -> tuple[str, list[str]]:
    """llama.cpp's name for the pre-tokenizer, and a note when it falls back."""
    parts = []
    if pre_tokenizer:
        parts = pre_tokenizer.get("pretokenizers") or [pre_tokenizer]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True) and not parts[0].get("add_prefix_space"):
        return "gpt-2", []
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm", []
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in PRE_BY_SPLIT:
                return PRE_BY_SPLIT[regex], []
    note = f"pre-tokenizer {kinds or None} not recognised: written as {FALLBACK_PRE!r} (llama.cpp's generic split)"
    log.warning(note)
    return FALLBACK_PRE, [note]

"""Build a tiny tokenizer (trained on the spot) and a tiny random Llama, saved as HF folders."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def sample_texts(limit: int | None = None) -> list[str]:
    """Real text present on every Python install: the language reference topics."""
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    return texts[:limit] if limit else texts


def clean_paragraphs() -> list[str]:
    """Unique real paragraphs of the sample texts that pass the default filters unchanged by
    normalisation: documents whose counts a test can predict."""
    from cptkit.config.data import FilterConfig
    from cptkit.data.filters import build_filters, first_reason
    from cptkit.data.normalize import normalize

    filters = build_filters(FilterConfig())
    seen, out = set(), []
    for text in sample_texts():
        for p in text.split("\n\n"):
            p = normalize(p)
            if 60 <= len(p) and p not in seen and first_reason(p, filters) is None:
                seen.add(p)
                out.append(p)
    return out


def write_jsonl(path: Path, texts: Iterable[str]) -> Path:
    """One `{"text": ...}` line per text."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer with <s> added at the start (like Llama) and </s> as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )


def make_tiny_llama(
    folder: str | Path,
    tokenizer=None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
) -> Path:
    """Save a random tiny Llama (and its tokenizer) to `folder`; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if tokenizer is None:
        tokenizer = train_tokenizer(sample_texts())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def with_chat_template(tokenizer):
    """The tokenizer with role markers as special tokens (so no token crosses a turn's edge) and a
    small chat template, like an instruction-tuned model's."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

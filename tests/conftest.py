"""Shared fixtures: a tokenizer trained in-session and a tiny random Llama, no downloads."""

from __future__ import annotations

import pytest

from cptkit.testing.tiny import make_tiny_llama, sample_texts, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(sample_texts()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def paragraphs() -> list[str]:
    """Unique real paragraphs that pass the default filters unchanged by normalisation."""
    from cptkit.testing.tiny import clean_paragraphs

    return clean_paragraphs()

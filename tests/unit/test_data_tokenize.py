"""Tokenization: BOS as the tokenizer adds it, exactly one EOS, character chunks, sentence starts."""

from __future__ import annotations

import numpy as np
import pytest

from cptkit.data.tokenize import Encoder, load_tokenizer
from cptkit.errors import CptkitError


def test_eos_appended_once(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    from tokenizers import processors

    enc = Encoder(tiny_tokenizer)
    ids = enc.encode(["Hello there."])[0]
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[-1] == tiny_tokenizer.eos_token_id
    assert ids.tolist() == tiny_tokenizer("Hello there.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    # a tokenizer whose template already ends with EOS does not get a second one
    tok = load_tokenizer(str(tiny_tokenizer_dir))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    again = Encoder(tok)
    assert again.appends_eos
    assert again.encode(["Hello there."])[0].tolist() == ids.tolist()


def test_character_chunks_are_documents_of_their_own(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer)
    text = "abcdefghij" * 25  # 250 characters -> chunks of 100, 100, 50
    flat, starts = enc.encode_chunks([text], 100)
    pieces = np.split(flat[0], starts[0][1:])
    assert len(pieces) == 3
    for piece, i in zip(pieces, (0, 100, 200), strict=True):
        assert piece.tolist() == tiny_tokenizer(text[i : i + 100])["input_ids"] + [
            tiny_tokenizer.eos_token_id
        ]


def test_sentence_starts_point_at_sentence_tokens(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer)
    text = "First sentence here. Second one follows!\n\nA new paragraph"
    ids, starts = enc.encode_sentences([text])
    assert ids[0].tolist() == enc.encode([text])[0].tolist()
    assert len(starts[0]) == 3 and starts[0][0] == 0
    decoded = tiny_tokenizer.decode(ids[0][starts[0][1] : starts[0][2]].tolist())
    assert decoded.strip().startswith("Second one")


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(CptkitError, match="data.tokenizer: cannot load"):
        load_tokenizer(str(tmp_path / "nothing-here"))


def test_fingerprint_ignores_call_settings_but_not_ids(tiny_tokenizer_dir):
    """A tokenizer.json saved with truncation or padding turned on, or a pad token set by the trainer,
    makes the same ids as prepare's tokenizer; another EOS or vocabulary is another tokenizer."""
    from transformers import AutoTokenizer

    from cptkit.data.manifest import tokenizer_fingerprint

    plain = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    configured = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    configured.backend_tokenizer.enable_truncation(max_length=77)
    configured.backend_tokenizer.enable_padding(length=99)
    assert tokenizer_fingerprint(configured) == tokenizer_fingerprint(plain)

    padded = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    padded.pad_token = padded.eos_token  # what training does for a tokenizer without a pad token
    assert tokenizer_fingerprint(padded) == tokenizer_fingerprint(plain)

    other_eos = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    other_eos.eos_token = other_eos.convert_ids_to_tokens(5)
    assert tokenizer_fingerprint(other_eos) != tokenizer_fingerprint(plain)

    grown = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    grown.add_tokens(["<new_domain_token>"])
    assert tokenizer_fingerprint(grown) != tokenizer_fingerprint(plain)

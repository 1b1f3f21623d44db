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

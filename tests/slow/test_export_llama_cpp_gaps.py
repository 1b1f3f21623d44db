"""llama.cpp (llama-cpp-python) runs what transformers' GGUF loader cannot prove: the file's own rope scaling
(llama3 through the rope_freqs tensor, linear through rope.scaling.*; the loader reads neither), a
SentencePiece-style vocabulary (`llama` tokenizer model, byte fallback) tokenized by llama.cpp itself, and
Qwen2 with tied embeddings (no output tensor). Bars as in test_export_llama_cpp.py: top-1 agreement with the
HF model at least TOP1_BAR[type], relative max logit difference within the round-trip tolerance, llama.cpp's
token ids equal to the HF tokenizer's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))

from test_export_gguf import _spm_style_tokenizer, _tiny  # noqa: E402
from test_export_gguf_gaps import ROPE, _top1_with_plain_rope, rope_model  # noqa: E402

from cptkit.commands.export import export  # noqa: E402
from cptkit.config.export import ExportConfig  # noqa: E402
from cptkit.export.llama_cpp import TOP1_BAR  # noqa: E402
from cptkit.export.verify import ENGLISH_PASSAGE, RELATIVE_TOLERANCE  # noqa: E402


def _agrees(report: dict, type_name: str, tokens: int = 256) -> dict:
    c = report["llama_cpp"]
    assert c is not None and "error" not in c, c
    assert c["tokens"] == tokens and c["passed"], c
    assert c["top1_agreement"] >= TOP1_BAR[type_name], c
    assert c["relative_max_diff"] <= RELATIVE_TOLERANCE[type_name], c
    assert c["tokenizer_ids_equal"], c
    return c


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama3", "llama3-32", "linear"])
def test_llama_cpp_runs_the_files_rope_scaling(tmp_path, tiny_tokenizer, name):
    folder = rope_model(name, tmp_path / "tiny-rope", tiny_tokenizer)
    # 256 positions where the scaling matters: without it the model itself agrees on < 90% of top-1
    assert _top1_with_plain_rope(folder, tiny_tokenizer, ENGLISH_PASSAGE * 40, 256) < 0.9
    report = export(str(folder), ExportConfig(verify_tokens=256), tmp_path / "m.f16.gguf", None, "test")
    _agrees(report, "f16")
    assert report["hparams"]["rope_type"] == ROPE[name]["rope_type"]


@pytest.mark.slow
def test_llama_cpp_reads_a_sentencepiece_style_vocabulary(tmp_path, monkeypatch):
    from cptkit.testing.tiny import sample_texts

    tok = _spm_style_tokenizer(sample_texts())
    tok.pad_token = tok.unk_token
    folder = _tiny("llama", tmp_path / "tiny-spm", tok)
    # text with bytes outside the vocabulary, so llama.cpp must take the <0xXX> byte fallback as HF does
    text = "Caf\u00e9 cr\u00e8me, w\u00f6rld \u00fcber \u00e5 \u2603. " + ENGLISH_PASSAGE
    assert any(t.startswith("<0x") for t in tok.tokenize(text))
    from cptkit.export import verify

    monkeypatch.setattr(verify, "heldout_text", lambda *_: (text * 20, "test text with byte fallback"))
    report = export(str(folder), ExportConfig(verify_tokens=256), tmp_path / "m.f16.gguf", None, "test")
    assert (
        report["tokenizer"]["model"] == "llama" and report["verify"]["text"] == "test text with byte fallback"
    )
    _agrees(report, "f16")


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["f16", "q8_0"])
def test_llama_cpp_runs_qwen2_with_tied_embeddings(tmp_path, tiny_tokenizer, type_name):
    folder = _tiny("qwen2-tied", tmp_path / "tiny-qwen2-tied", tiny_tokenizer)
    out = tmp_path / f"m.{type_name}.gguf"
    report = export(str(folder), ExportConfig(type=type_name, verify_tokens=256), out, None, "test")
    import gguf

    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}  # token_embd reused
    _agrees(report, type_name)

"""The exported GGUF run by llama.cpp itself (llama-cpp-python): its logits on the same tokens agree with
the HF model's. Bars from the tiny models' measurements (see cptkit.export.verify): top-1 agreement at
least 99% in f16, 97% in bf16, 90% in q8_0; relative max logit difference within the round-trip tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))

from test_export_gguf import _tiny  # noqa: E402

from cptkit.commands.export import export  # noqa: E402
from cptkit.config.export import ExportConfig  # noqa: E402
from cptkit.export.llama_cpp import TOP1_BAR  # noqa: E402
from cptkit.export.verify import RELATIVE_TOLERANCE  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("kind", ["llama-tied", "llama", "mistral", "qwen2"])
def test_llama_cpp_agrees_with_hf(tmp_path, tiny_tokenizer, kind, type_name):
    folder = _tiny(kind, tmp_path / f"tiny-{kind}", tiny_tokenizer)
    out = tmp_path / "out" / f"m.{type_name}.gguf"
    report = export(str(folder), ExportConfig(type=type_name, verify_tokens=256), out, None, "test")
    c = report["llama_cpp"]
    assert c is not None and c["tokens"] == 256
    assert c["top1_agreement"] >= TOP1_BAR[type_name], c
    assert c["relative_max_diff"] <= RELATIVE_TOLERANCE[type_name], c
    assert c["tokenizer_ids_equal"], c  # llama.cpp's tokenizer (gpt-2 pre-tokenizer) gives the HF ids


@pytest.mark.slow
def test_llama_cpp_reads_a_byte_level_vocabulary_flagged_byte_fallback(tmp_path, tiny_tokenizer):
    from test_export_gguf import _flag_byte_fallback  # noqa: E402

    folder = _flag_byte_fallback(_tiny("llama", tmp_path / "tiny-flagged", tiny_tokenizer))
    report = export(str(folder), ExportConfig(verify_tokens=256), tmp_path / "m.gguf", None, "test")
    assert report["tokenizer"]["model"] == "gpt2"
    assert report["llama_cpp"]["passed"] and report["llama_cpp"]["tokenizer_ids_equal"], report["llama_cpp"]

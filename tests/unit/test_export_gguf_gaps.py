"""GGUF export beyond the plain models: llama3 and linear rope scaling (as Llama-3.1/3.2 ship it, scaled
down so that it changes the frequencies within the 256 compared positions), other rope types refused,
Qwen2 with tied embeddings (as Qwen2.5-0.5B/1.5B ship), and `cptkit export CONFIG` verifying on the run's
prepared held-out documents.

transformers' GGUF loader reads no rope scaling for llama/mistral/qwen2, so the round trip puts the
source's back (`cptkit.export.verify.gguf_config`) and checks the tensors; the rope_freqs tensor is checked
here against transformers' own llama3 frequencies, and tests/slow/test_export_llama_cpp_gaps.py runs the
file's scaling in llama.cpp."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from test_export_gguf import _tiny  # noqa: E402

from cptkit.commands.export import export  # noqa: E402
from cptkit.config.export import ExportConfig  # noqa: E402
from cptkit.errors import CptkitError  # noqa: E402
from cptkit.export.verify import RELATIVE_TOLERANCE  # noqa: E402

# Llama-3.1's rope_scaling (factor 8; Llama-3.2 ships 32), original context 8192 scaled down to 64 so that
# with head_dim 16 and theta 1e4 the wavelengths 20 and 63 are smoothed and 199 and up divided by the factor
ROPE = {
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "llama3-32": {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
}


def rope_model(name: str, folder: Path, tokenizer, old_spelling: bool = False) -> Path:
    """A tiny Llama with the rope scaling ROPE[name]; `old_spelling`: its config.json as Llama-3.1's is
    written (`rope_theta` beside a `rope_scaling` block) rather than transformers 5's `rope_parameters`."""
    folder = _tiny("llama", folder, tokenizer, rope_parameters=dict(ROPE[name]))
    if old_spelling:
        config = json.loads((folder / "config.json").read_text())
        params = config.pop("rope_parameters")
        config["rope_theta"] = params.pop("rope_theta")
        config["rope_scaling"] = params
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _top1_with_plain_rope(folder: Path, tokenizer, text: str, tokens: int) -> float:
    """Top-1 agreement between the model and itself with its rope scaling removed: how much the scaling
    matters on the compared positions (a check that passes with it removed proves nothing)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.tensor([tokenizer(text).input_ids[:tokens]])
    scaled = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = AutoConfig.from_pretrained(folder)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    plain = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = scaled(ids).logits[0], plain(ids).logits[0]
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.parametrize(
    "name,old_spelling", [("llama3", False), ("llama3", True), ("llama3-32", False), ("linear", False)]
)
def test_rope_scaled_llama_round_trips(tmp_path, tiny_tokenizer, name, old_spelling):
    import gguf

    from cptkit.export.verify import ENGLISH_PASSAGE

    folder = rope_model(name, tmp_path / "tiny-rope", tiny_tokenizer, old_spelling)
    out = tmp_path / "out" / "m.f16.gguf"
    report = export(str(folder), ExportConfig(verify_tokens=256), out, None, "test")
    v = report["verify"]
    assert (
        v["passed"] and v["relative_max_diff"] <= RELATIVE_TOLERANCE["f16"] and v["top1_agreement"] >= 0.99
    ), v
    kind = ROPE[name]["rope_type"]
    assert v["rope_scaling"].startswith(f"{kind} scaling taken from the source config"), v
    assert report["hparams"]["rope_type"] == kind
    # the scaling changes the model's predictions on these positions, so the bars above mean something
    assert _top1_with_plain_rope(folder, tiny_tokenizer, ENGLISH_PASSAGE * 40, 256) < 0.9

    reader = gguf.GGUFReader(out)
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    if kind == "llama3":
        # the factors llama.cpp divides its frequencies by are transformers' own llama3 frequencies'
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        config = AutoConfig.from_pretrained(folder)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        np.testing.assert_allclose(tensors["rope_freqs.weight"], (plain / scaled).numpy(), rtol=1e-5)
        assert tensors["rope_freqs.weight"].max() == pytest.approx(ROPE[name]["factor"])
        # llama.cpp takes llama3 scaling from the tensor, not from metadata
        assert "llama.rope.scaling.type" not in reader.fields
    else:
        assert "rope_freqs.weight" not in tensors
        assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
        assert reader.fields["llama.rope.scaling.factor"].contents() == pytest.approx(8.0)


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_refuses_other_rope_types(tmp_path, tiny_tokenizer, kind):
    folder = _tiny("llama", tmp_path / "tiny", tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CptkitError,
        match=rf"config\.json: rope type '{kind}' \(rope_parameters / rope_scaling\) cannot be exported to "
        r"GGUF; supported: default, linear, llama3",
    ):
        export(str(folder), ExportConfig(), tmp_path / "out" / "x.gguf", None, "export")
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("type_name", ["f16", "q8_0"])
def test_qwen2_tied_embeddings_round_trip(tmp_path, tiny_tokenizer, type_name):
    import gguf

    folder = _tiny("qwen2-tied", tmp_path / "tiny-qwen2-tied", tiny_tokenizer)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    out = tmp_path / "out" / f"m.{type_name}.gguf"
    report = export(str(folder), ExportConfig(type=type_name, verify_tokens=256), out, None, "test")
    v = report["verify"]
    assert v["passed"] and v["tokenizer_ids_equal"], v
    assert v["relative_max_diff"] <= RELATIVE_TOLERANCE[type_name], v
    assert v["top1_agreement"] >= (0.99 if type_name == "f16" else 0.9), v
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # llama.cpp reuses token_embd
    assert "blk.0.attn_q.bias" in names and report["architecture"] == "qwen2"


def test_export_config_verifies_on_the_prepared_heldout_documents(tmp_path, tiny_tokenizer, paragraphs):
    import yaml

    from cptkit.cli import main
    from cptkit.testing.stages import write_prepared

    model = _tiny("llama", tmp_path / "tiny-llama", tiny_tokenizer)
    run_dir = tmp_path / "run"
    docs = [p for p in paragraphs if len(p) > 200][:6]
    assert len(docs) == 6
    prepared = write_prepared(run_dir / "data", {"domain": ("domain", docs)}, tiny_tokenizer, seq_length=64)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run_dir),
                "model": {"name_or_path": str(model)},
                "export": {"type": "f16", "verify_tokens": 256},
            }
        )
    )
    assert main(["export", str(config)]) == 0
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    v = report["verify"]
    assert v["text"] == f"held-out documents of {prepared}", v
    assert v["passed"] and v["tokenizer_ids_equal"] and v["top1_agreement"] >= 0.99, v
    # the held-out documents, not the built-in passage: as many tokens as they hold (capped), fewer than 256
    from cptkit.data.prepared import Prepared
    from cptkit.merge.compare import heldout_token_docs

    held = heldout_token_docs(Prepared.load(prepared), documents_per_set=8, max_tokens=256)
    assert held and 0 < v["tokens"] <= 256
    text = "\n\n".join(tiny_tokenizer.decode(d, skip_special_tokens=True) for d in held)
    assert v["tokens"] == min(256, len(tiny_tokenizer(text).input_ids))
    assert Path(report["path"]) == run_dir / "export" / "tiny-llama.f16.gguf"

"""GGUF export: tiny llama (tied and untied), mistral and qwen2 models written in f16, bf16 and q8_0 and
loaded back by transformers' GGUF loader; logits within the stated tolerance, tokenizer ids equal, metadata
present; an adapter exported equals its merged model exported; refusals before any work."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cptkit.commands.export import export
from cptkit.config.export import ExportConfig
from cptkit.errors import CptkitError
from cptkit.export.verify import RELATIVE_TOLERANCE

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def _save(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer = copy.deepcopy(
        tokenizer
    )  # the session's shared tokenizer has no chat template, and keeps none
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def _tiny(kind: str, folder: Path, tokenizer, **config) -> Path:
    """A random tiny model of `kind` (llama, llama-tied, mistral, qwen2, qwen2-tied) saved with `tokenizer`;
    `config` adds to (or overrides) its config, e.g. rope_parameters."""
    import transformers

    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # logits far from zero, so top-1 agreement means something
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    if kind.startswith("llama"):
        cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=kind == "llama-tied")
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape, sliding_window=None))
    else:
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**shape, tie_word_embeddings=kind == "qwen2-tied")
        )
        with torch.no_grad():  # qwen2's q/k/v biases start at zero: make them count
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return _save(folder, model.eval(), tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("export-models")
    # folders named tiny-*: transformers' GGUF loader treats a file whose general.name is exactly "mistral"
    # as its Mistral class and then finds no gguf tensor map for it
    return {
        k: _tiny(k, root / f"tiny-{k}", tiny_tokenizer) for k in ("llama-tied", "llama", "mistral", "qwen2")
    }


@pytest.mark.parametrize("type_name", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("kind", ["llama-tied", "llama", "mistral", "qwen2"])
def test_round_trip_within_tolerance(models, tmp_path, kind, type_name):
    out = tmp_path / f"{kind}.{type_name}.gguf"
    report = export(str(models[kind]), ExportConfig(type=type_name, verify_tokens=256), out, None, "test")
    v = report["verify"]
    assert v["tokenizer_ids_equal"] and v["tokens"] == 256
    assert v["relative_max_diff"] <= RELATIVE_TOLERANCE[type_name], v
    assert v["top1_agreement"] >= (0.99 if type_name == "f16" else 0.9), v
    assert v["passed"]
    assert json.loads((tmp_path / "export_report.json").read_text())["path"] == str(out)
    expected = {"llama-tied": "llama", "llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}[kind]
    assert report["architecture"] == expected
    # tied: no output tensor (llama.cpp reuses token_embd); untied: one
    assert ("output.weight" in _tensor_names(out)) is (kind != "llama-tied")


def _tensor_names(path: Path) -> set[str]:
    import gguf

    return {t.name for t in gguf.GGUFReader(path).tensors}


def test_metadata_has_tokenizer_and_hparams(models, tmp_path, tiny_tokenizer):
    import gguf

    out = tmp_path / "m.q8_0.gguf"
    export(str(models["llama"]), ExportConfig(type="q8_0", verify=False), out, None, "test")
    fields = gguf.GGUFReader(out).fields

    def value(key):
        f = fields[key]
        return f.contents()

    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.chat_template") == CHAT_TEMPLATE
    assert value("tokenizer.ggml.bos_token_id") == tiny_tokenizer.bos_token_id
    assert value("tokenizer.ggml.eos_token_id") == tiny_tokenizer.eos_token_id
    assert value("tokenizer.ggml.padding_token_id") == tiny_tokenizer.pad_token_id
    merges = json.loads((models["llama"] / "tokenizer.json").read_text())["model"]["merges"]
    assert len(value("tokenizer.ggml.merges")) == len(merges)
    assert len(value("tokenizer.ggml.tokens")) == len(tiny_tokenizer)
    assert value("llama.block_count") == 2 and value("llama.attention.head_count_kv") == 2
    assert value("llama.embedding_length") == 64 and value("llama.feed_forward_length") == 128
    assert value("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_adapter_is_merged_then_exported_like_the_merged_model(models, tmp_path, tiny_tokenizer):
    import gguf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = models["llama"]
    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # an adapter that changes the model
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    tiny_tokenizer.save_pretrained(adapter_dir)
    merged_dir = _save(tmp_path / "merged", peft_model.merge_and_unload(), tiny_tokenizer)

    from_adapter = tmp_path / "a" / "m.f16.gguf"
    from_merged = tmp_path / "b" / "m.f16.gguf"
    report = export(str(adapter_dir), ExportConfig(verify_tokens=128), from_adapter, None, "test")
    export(str(merged_dir), ExportConfig(verify=False), from_merged, None, "test")
    assert report["verify"]["passed"]
    a = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(from_adapter).tensors}
    b = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(from_merged).tensors}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=2e-3, err_msg=name)
    base = {t.name: np.array(t.data) for t in gguf.GGUFReader(_export_plain(base_dir, tmp_path)).tensors}
    assert not np.allclose(base["blk.0.attn_q.weight"], a["blk.0.attn_q.weight"], atol=1e-2)
    assert not (tmp_path / "a" / ".m.f16.gguf.merge").exists()  # the temporary merge is gone


def _export_plain(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "plain" / "m.f16.gguf"
    export(str(folder), ExportConfig(verify=False), out, None, "test")
    return out


def _spm_style_tokenizer(texts, vocab_size=512):
    """A Llama-2-style BPE: Metaspace pre-tokenizer, byte fallback through <0xXX> tokens in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tok.to_str())
    trained = spec["model"]["vocab"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t, _ in sorted(trained.items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    bpe = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    bpe.add_special_tokens(["<unk>", "<s>", "</s>"])
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_sentencepiece_style_vocabulary_round_trips(tmp_path):
    import gguf

    from cptkit.testing.tiny import sample_texts

    tok = _spm_style_tokenizer(sample_texts())
    tok.pad_token = tok.unk_token
    assert "<0xC3>" in tok.tokenize("w\u00f6rld")  # byte fallback in use
    folder = _tiny("llama", tmp_path / "tiny-spm", tok)
    out = tmp_path / "out" / "m.f16.gguf"
    report = export(str(folder), ExportConfig(verify_tokens=256), out, None, "test")
    assert report["tokenizer"]["model"] == "llama" and report["verify"]["passed"], report["verify"]
    fields = gguf.GGUFReader(out).fields
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[3 + 0xC3] == 6 and types[0] == 2  # BYTE, UNKNOWN
    scores = fields["tokenizer.ggml.scores"].contents()
    assert len(scores) == len(tok) and min(scores) < 0


def _flag_byte_fallback(folder: Path) -> Path:
    """The folder's byte-level tokenizer.json with `byte_fallback: true`, as some GGUF-to-HF conversions
    write it (transformers 5.17's): a vocabulary without a single <0xXX> token."""
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder


def test_byte_level_vocabulary_flagged_byte_fallback_stays_gpt2(models, tmp_path):
    import shutil

    folder = _flag_byte_fallback(Path(shutil.copytree(models["llama"], tmp_path / "tiny-flagged")))
    report = export(str(folder), ExportConfig(verify_tokens=256), tmp_path / "m.gguf", None, "test")
    assert report["tokenizer"]["model"] == "gpt2" and report["verify"]["passed"], report["tokenizer"]


def test_llama_cpp_abort_is_a_failed_check_not_a_dead_process(models, tmp_path, monkeypatch):
    import subprocess

    from cptkit.export import llama_cpp

    died = subprocess.CompletedProcess(
        [],
        -6,
        "",
        "terminate called after throwing an instance of 'std::out_of_range'\n  what():  "
        "unordered_map::at\n/usr/lib/libllama.so(+0x1)[0x7f]\n",
    )
    monkeypatch.setattr(llama_cpp, "llama_cpp_available", lambda: True)
    monkeypatch.setattr(llama_cpp.subprocess, "run", lambda *a, **k: died)
    out = tmp_path / "m.gguf"
    with pytest.raises(
        CptkitError, match=r"llama.cpp does not agree: llama.cpp stopped \(signal 6\).*unordered_map::at"
    ):
        export(str(models["llama"]), ExportConfig(verify_tokens=64), out, None, "test")
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["llama_cpp"]["passed"] is False and "/usr/lib" not in report["llama_cpp"]["error"]
    assert out.is_file()  # kept for inspection


def test_refuses_unsupported_architecture(tmp_path, tiny_tokenizer):
    import transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer))
    folder = _save(tmp_path / "gpt2", transformers.GPT2LMHeadModel(cfg), tiny_tokenizer)
    with pytest.raises(CptkitError, match=r"architecture 'gpt2'.*supported: llama, mistral, qwen2"):
        export(str(folder), ExportConfig(), tmp_path / "out" / "x.gguf", None, "test")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_refuses_missing_source(tmp_path):
    with pytest.raises(CptkitError, match="does not exist"):
        export(str(tmp_path / "nope"), ExportConfig(), tmp_path / "x.gguf", None, "export")
    with pytest.raises(CptkitError, match="nothing to export"):
        export(None, ExportConfig(), tmp_path / "x.gguf", None, "export")


def test_refuses_quantised_source(models, tmp_path):
    import shutil

    folder = tmp_path / "quantised"
    shutil.copytree(models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CptkitError, match=r"still quantised.*cptkit merge"):
        export(str(folder), ExportConfig(), tmp_path / "out" / "x.gguf", None, "export")


def test_refuses_qlora_adapter(tmp_path, models):
    folder = tmp_path / "qlora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(models["llama"])})
    )
    (folder / "run_meta.json").write_text(json.dumps({"mode": "qlora"}))
    with pytest.raises(CptkitError, match=r"QLoRA adapter.*cptkit merge"):
        export(str(folder), ExportConfig(), tmp_path / "out" / "x.gguf", None, "export")


def test_cli_exports_a_model_folder(models, tmp_path):
    from cptkit.cli import main

    out = tmp_path / "cli.q8_0.gguf"
    assert main(["export", str(models["qwen2"]), "--type", "q8_0", "--output", str(out)]) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["type"] == "q8_0" and report["verify"]["passed"] and out.is_file()


def test_export_stage_runs_before_report_and_writes_its_marker(models, tmp_path):
    import yaml

    from cptkit.config import Config, load_config
    from cptkit.paths import resolve
    from cptkit.pipeline.stages import NAMES, STAGES

    assert NAMES.index("export") == NAMES.index("report") - 1
    path = tmp_path / "run.yaml"
    export_section = {"model": str(models["llama"]), "type": "bf16", "verify": False}
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "export": export_section}))
    cfg = load_config(Config, path, [])
    stage = next(s for s in STAGES if s.name == "export")
    assert stage.why_not(cfg) is None
    result = stage.run(cfg)
    assert stage.marker(cfg) == resolve(cfg).export_report and stage.marker(cfg).is_file()
    assert Path(result["path"]) == tmp_path / "run" / "export" / "tiny-llama.bf16.gguf"
    assert "bf16 GGUF" in stage.describe(result)

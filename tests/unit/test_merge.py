"""cptkit merge: merged logits equal the adapter's, shards and files are standard, bad input is refused
with nothing half-written, and QLoRA adapters are merged into both bases and compared."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cptkit.commands import merge
from cptkit.config import Config, build_config
from cptkit.errors import CptkitError
from cptkit.merge.adapter import LoraModule
from cptkit.merge.checkpoint import SAFETENSORS_DTYPES
from cptkit.merge.nf4 import nf4_settings
from cptkit.merge.qlora import choose_variant, plan_variants
from cptkit.merge.write import ShardWriter, TensorSpec, check_disk_space, parse_size, plan_shards
from cptkit.testing.stages import make_lora_adapter, write_prepared
from cptkit.testing.tiny import make_tiny_llama, sample_texts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """All linear layers and the embedding adapted, rank-stabilised scaling, a trained lm_head copy.
    Seeded: peft draws lora_A from the global generator, which the tests run before would move."""
    torch.manual_seed(0)
    return make_lora_adapter(
        tiny_model_dir,
        tmp_path_factory.mktemp("adapter"),
        r=4,
        alpha=8,
        target_modules=TARGETS,
        use_rslora=True,
        modules_to_save=["lm_head"],
        scale=0.1,
    )


def config(tmp_path, base, adapter, **merge_opts) -> Config:
    return build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(base)},
            "merge": {"adapter": str(adapter), **merge_opts},
        },
    )


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def adapter_on_base(base, adapter, dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype), str(adapter)
    ).eval()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_merged_logits_equal_adapter_on_base(tmp_path, tiny_model_dir, adapter_dir, dtype, tol):
    """fp32: equal to 1e-5 (measured 2e-7). bf16 (merged weights rounded once to bf16; the reference is the
    unmerged adapter computed in bf16): logits of about +-0.4 agree to 2e-2 absolute (measured 5e-3), while
    the adapter itself moves them by about 0.7, which the first assertion checks."""
    from transformers import AutoModelForCausalLM

    report = merge.run(config(tmp_path, tiny_model_dir, adapter_dir, dtype=dtype))
    assert report["merged_modules"] == 2 * 7 + 1 and report["replaced_tensors"] == 1
    torch_dtype = getattr(torch, dtype)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = logits(adapter_on_base(tiny_model_dir, adapter_dir, torch_dtype), ids)
    base = logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch_dtype), ids)
    merged_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "run/merged"), dtype=torch_dtype)
    assert next(merged_model.parameters()).dtype == torch_dtype
    merged = logits(merged_model, ids)
    assert (reference - base).abs().max() > 10 * tol  # the adapter matters
    assert (merged - reference).abs().max() < tol


def test_output_is_a_plain_sharded_model_folder(tmp_path, tiny_model_dir, adapter_dir):
    merge.run(config(tmp_path, tiny_model_dir, adapter_dir, max_shard_size="40KB"))
    out = tmp_path / "run/merged"
    names = sorted(p.name for p in out.iterdir())
    assert "adapter_config.json" not in names
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "merge_report.json",
        "config.yaml",
    } <= set(names)
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not any(p.name.startswith(".") for p in (tmp_path / "run").iterdir())  # no temp folder left


def test_qlora_adapter_merged_into_both_bases_and_the_closer_kept(tmp_path, tiny_model_dir, tiny_tokenizer):
    adapter = make_lora_adapter(
        tiny_model_dir, tmp_path / "qlora", r=4, target_modules="all-linear", mode="qlora"
    )
    texts = sample_texts(8)
    write_prepared(
        tmp_path / "run/data",
        {"docs": ("domain", texts[:2]), "prose": ("general", texts[3:5])},
        tiny_tokenizer,
    )
    report = merge.run(config(tmp_path, tiny_model_dir, adapter, dtype="float32", compare_tokens=256))
    cands = report["comparison"]["candidates"]
    assert set(cands) == {"bf16", "dequantized"} and report["mode"] == "qlora"
    assert report["nf4_relative_error"] > 0.01
    # the adapter was trained against the NF4 weights: merging into them is (much) closer
    assert cands["dequantized"]["mean_kl"] < cands["bf16"]["mean_kl"]
    assert report["kept"] == "dequantized"
    assert sorted(p.name for p in (tmp_path / "run/merged").iterdir() if p.is_dir()) == []
    forced = merge.run(config(tmp_path, tiny_model_dir, adapter, qlora_base="bf16", compare_tokens=64))
    assert forced["kept"] == "bf16" and forced["why"] == "merge.qlora_base: bf16"


def test_qlora_without_nf4_kernels_is_merged_into_the_original_base_only(tmp_path):
    variants, notes = plan_variants(
        "qlora",
        {"bits": 4},
        torch.device("cpu"),
        tmp_path,
        nf4_check=lambda device: f"bitsandbytes cannot quantise to NF4 on {device}: test",
    )
    assert [v.name for v in variants] == ["bf16"] and "cannot quantise to NF4 on cpu" in notes[0]
    assert choose_variant(variants, None, "auto") == (variants[0], "the only merge made")
    both, notes = plan_variants("qlora", {"bits": 4}, torch.device("cpu"), tmp_path, nf4_check=lambda d: None)
    assert [v.name for v in both] == ["bf16", "dequantized"] and notes == []
    assert both[1].quant == {"quant_type": "nf4", "double_quant": True, "dtype": torch.bfloat16}


def test_nf4_settings_read_a_runs_quantization_record():
    assert nf4_settings({}) == {"quant_type": "nf4", "double_quant": True, "dtype": torch.bfloat16}
    recorded = {"bits": 4, "quant_type": "fp4", "double_quant": False, "compute_dtype": "float16"}
    assert nf4_settings(recorded) == {"quant_type": "fp4", "double_quant": False, "dtype": torch.float16}


def assert_nothing_written(tmp_path):
    run = tmp_path / "run"
    assert not (run / "merged").exists()
    assert not run.exists() or not any(p.name.startswith(".merged") for p in run.iterdir())


def test_adapter_for_another_base_is_refused(tmp_path, tiny_tokenizer, adapter_dir):
    other = make_tiny_llama(tmp_path / "other", tokenizer=tiny_tokenizer, hidden_size=48, num_heads=4)
    with pytest.raises(CptkitError, match="does not belong to the base"):
        merge.run(config(tmp_path, other, adapter_dir))
    assert_nothing_written(tmp_path)


def test_model_folder_without_weights_is_refused(tmp_path, tiny_model_dir, adapter_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(CptkitError, match="without weights"):
        merge.run(config(tmp_path, empty, adapter_dir))
    with pytest.raises(CptkitError, match="not an adapter"):
        merge.run(config(tmp_path, tiny_model_dir, empty))
    assert_nothing_written(tmp_path)


def test_base_that_is_neither_a_folder_nor_on_the_hub_is_refused(tmp_path, adapter_dir):
    with pytest.raises(CptkitError, match="not a local folder, and it could not be fetched from the hub"):
        merge.run(config(tmp_path, "cptkit-tests/no-such-model", adapter_dir))
    assert_nothing_written(tmp_path)


def test_no_disk_space_is_refused_before_writing(tmp_path):
    with pytest.raises(CptkitError, match="not enough disk space"):
        check_disk_space(tmp_path / "run" / "merged", 10**18)
    assert not (tmp_path / "run").exists()


def test_failure_while_writing_leaves_no_partial_model(tmp_path, tiny_model_dir, adapter_dir):
    merge.run(config(tmp_path, tiny_model_dir, adapter_dir))  # a previous, complete merge
    before = sorted(p.name for p in (tmp_path / "run/merged").iterdir())
    damaged = tmp_path / "damaged"  # a base whose weights end early: the merge fails half-way
    shutil.copytree(tiny_model_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CptkitError, match="truncated"):
        merge.run(config(tmp_path, damaged, adapter_dir))
    assert sorted(p.name for p in (tmp_path / "run/merged").iterdir()) == before
    assert not any(p.name.startswith(".merged") for p in (tmp_path / "run").iterdir())


def test_fan_in_fan_out_delta_is_transposed():
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    plain = LoraModule("m", a, b, 0.5)
    conv1d = LoraModule("m", a, b, 0.5, fan_in_fan_out=True)
    assert plain.delta().shape == (5, 6) and conv1d.delta().shape == (6, 5)
    assert torch.allclose(conv1d.delta(), 0.5 * (b @ a).T)


def test_shard_plan_and_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 10**5
    with pytest.raises(CptkitError):
        parse_size("lots")
    specs = [TensorSpec(k, "U8", (n,)) for k, n in (("a", 6), ("b", 5), ("c", 20), ("d", 1))]
    assert [[s.key for s in shard] for shard in plan_shards(specs, 10)] == [["a"], ["b"], ["c"], ["d"]]
    specs = [TensorSpec(k, "BF16", (n,)) for k, n in (("a", 2), ("b", 2), ("c", 1), ("d", 1))]
    assert [[s.key for s in shard] for shard in plan_shards(specs, 10)] == [["a", "b", "c"], ["d"]]


def test_streamed_shards_read_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "i": torch.arange(7), "f": torch.randn(2)}
    specs = [TensorSpec(k, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    writer = ShardWriter(tmp_path, plan_shards(specs, 40))
    for k, t in tensors.items():
        writer.add(k, t)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    back = {}
    for name in set(index["weight_map"].values()):
        back.update(load_file(tmp_path / name))
    assert all(torch.equal(back[k], t) for k, t in tensors.items())

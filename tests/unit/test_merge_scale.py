"""merge.scale: a LoRA merge at scale s is the adapter with its update times s (trained module copies s of
the way from the base's), a full model's merge is base + s * (trained - base), the ends are exact, and a
scale outside [0, 1] is refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

from cptkit.commands import merge
from cptkit.config import Config, build_config
from cptkit.errors import ConfigError, CptkitError
from cptkit.merge.checkpoint import TensorReader, read_checkpoint
from cptkit.pipeline.stages import STAGES
from cptkit.testing.stages import make_lora_adapter, train_module_copies
from cptkit.testing.tiny import make_tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """Linear layers and the embedding adapted (rank-stabilised scaling) and a trained lm_head copy."""
    torch.manual_seed(0)
    adapter = make_lora_adapter(
        tiny_model_dir,
        tmp_path_factory.mktemp("adapter"),
        target_modules=TARGETS,
        use_rslora=True,
        modules_to_save=["lm_head"],
        scale=0.1,
    )
    return train_module_copies(adapter)


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory, tiny_tokenizer):
    """A 'fully fine-tuned' model: the tiny Llama's architecture with other weights."""
    return make_tiny_llama(tmp_path_factory.mktemp("full"), tokenizer=tiny_tokenizer, seed=1)


def config(tmp_path, base, trained, **merge_opts) -> Config:
    return build_config(
        Config,
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"name_or_path": str(base)},
            "merge": {"adapter": str(trained), "dtype": "float32", **merge_opts},
        },
    )


def logits(model, ids=None):
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0)) if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def tensors(folder) -> dict[str, torch.Tensor]:
    checkpoint = read_checkpoint(folder)
    with TensorReader(checkpoint) as reader:
        return {k: reader.read(k).clone() for k in checkpoint.tensors}


def adapter_scaled_by_hand(base, adapter, scale):
    """The adapter on its base with every LoRA layer's scaling times `scale` and the lm_head copy at
    base + scale * (trained - base): what merge.scale means, set up without cptkit."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base), str(adapter)).eval()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "scaling", None), dict):
                for name in module.scaling:
                    module.scaling[name] *= scale
        for name, p in params.items():
            if ".modules_to_save.default." in name:
                b = params[name.replace(".modules_to_save.default.", ".original_module.")]
                p.copy_(b + scale * (p - b))
    return model


@pytest.mark.parametrize("scale", [0.3, 0.75])
def test_lora_merge_at_a_scale_equals_the_adapter_with_its_scaling_times_it(
    tmp_path, tiny_model_dir, adapter_dir, scale
):
    report = merge.run(config(tmp_path, tiny_model_dir, adapter_dir, scale=scale))
    merged = logits(load(tmp_path / "run/merged"))
    reference = logits(adapter_scaled_by_hand(tiny_model_dir, adapter_dir, scale))
    full_update = logits(adapter_scaled_by_hand(tiny_model_dir, adapter_dir, 1.0))
    assert (merged - full_update).abs().max() > 1e-3  # the scale matters
    assert (merged - reference).abs().max() < 1e-5
    assert report["scale"] == scale
    assert json.loads((tmp_path / "run/merged/merge_report.json").read_text())["scale"] == scale


def test_lora_merge_ends_are_exact(tmp_path, tiny_model_dir, adapter_dir):
    """Scale 0 writes the base's weights bit for bit (the lm_head copy too); scale 1 writes W + (alpha /
    sqrt(r)) * B @ A and the trained copy, bit for bit, as the merge always has."""
    from safetensors.torch import load_file

    base = tensors(tiny_model_dir)
    merge.run(config(tmp_path / "zero", tiny_model_dir, adapter_dir, scale=0.0))
    zero = tensors(tmp_path / "zero/run/merged")
    assert zero.keys() == base.keys() and all(torch.equal(zero[k], base[k]) for k in base)

    merge.run(config(tmp_path / "one", tiny_model_dir, adapter_dir))  # the default: 1
    one = tensors(tmp_path / "one/run/merged")
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    rslora = 8 / 4**0.5
    for key, w in base.items():
        module = "base_model.model." + key.removesuffix(".weight")
        if f"{module}.lora_A.weight" in saved:
            a, b = saved[f"{module}.lora_A.weight"], saved[f"{module}.lora_B.weight"]
            expected = w.float() + (b.float() @ a.float()) * rslora
        elif f"{module}.lora_embedding_A" in saved:
            a, b = saved[f"{module}.lora_embedding_A"], saved[f"{module}.lora_embedding_B"]
            expected = w.float() + ((b.float() @ a.float()) * rslora).T
        elif f"{module}.weight" in saved:  # a trained copy (lm_head)
            expected = saved[f"{module}.weight"]
            assert not torch.equal(expected, w)
        else:
            expected = w
        assert torch.equal(one[key], expected.float()), key


def test_trained_head_of_a_tied_base_starts_from_the_input_embeddings(tmp_path, tiny_tokenizer):
    """A base that ties lm_head to its input embeddings stores no lm_head; the trained head is merged
    from the embeddings: at scale s the written head is embed + s * (trained head - embed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config_ = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config_).save_pretrained(tmp_path / "tied")
    tiny_tokenizer.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in read_checkpoint(tmp_path / "tied").tensors
    adapter = train_module_copies(
        make_lora_adapter(tmp_path / "tied", tmp_path / "adapter", target_modules=["q_proj"],
                          modules_to_save=["lm_head"])
    )  # fmt: skip
    merge.run(config(tmp_path, tmp_path / "tied", adapter, scale=0.5))
    merged = logits(load(tmp_path / "run/merged"))
    assert (merged - logits(adapter_scaled_by_hand(tmp_path / "tied", adapter, 0.5))).abs().max() < 1e-5
    assert (merged - logits(adapter_scaled_by_hand(tmp_path / "tied", adapter, 1.0))).abs().max() > 1e-3


def test_full_merge_at_a_scale_is_base_plus_scale_times_the_change(tmp_path, tiny_model_dir, full_dir):
    report = merge.run(config(tmp_path, tiny_model_dir, full_dir, scale=0.4, max_shard_size="40KB"))
    out = tmp_path / "run/merged"
    assert report["mode"] == "full" and report["scale"] == 0.4 and report["kept"] == "interpolated"
    assert (out / "model.safetensors.index.json").is_file()  # streamed into several shards
    assert {"config.json", "generation_config.json", "tokenizer.json", "config.yaml"} <= {
        p.name for p in out.iterdir()
    }
    base, trained = load(tiny_model_dir), load(full_dir)
    in_memory = load(tiny_model_dir)
    trained_state = trained.state_dict()
    in_memory.load_state_dict({k: v + 0.4 * (trained_state[k] - v) for k, v in base.state_dict().items()})
    written = logits(load(out))
    assert (written - logits(base)).abs().max() > 1e-3 and (written - logits(trained)).abs().max() > 1e-3
    assert (written - logits(in_memory)).abs().max() < 1e-5


def test_full_merge_at_scale_0_is_the_base(tmp_path, tiny_model_dir, full_dir):
    merge.run(config(tmp_path, tiny_model_dir, full_dir, scale=0.0))
    base, zero = tensors(tiny_model_dir), tensors(tmp_path / "run/merged")
    assert zero.keys() == base.keys() and all(torch.equal(zero[k], base[k]) for k in base)


def test_full_model_at_scale_1_has_nothing_to_merge(tmp_path, tiny_model_dir, full_dir):
    with pytest.raises(CptkitError, match="a full model .* nothing to merge"):
        merge.run(config(tmp_path, tiny_model_dir, full_dir))
    assert not (tmp_path / "run/merged").exists()


def test_full_model_of_another_architecture_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer):
    other = make_tiny_llama(tmp_path / "other", tokenizer=tiny_tokenizer, hidden_size=64)
    with pytest.raises(CptkitError, match="not a fine-tuned copy of the base .* base \\[.*\\], trained"):
        merge.run(config(tmp_path, tiny_model_dir, other, scale=0.5))
    assert not (tmp_path / "run/merged").exists()


@pytest.mark.parametrize("scale", [1.5, -0.1])
def test_scale_outside_0_1_is_refused_by_the_config(tmp_path, scale):
    with pytest.raises(
        ConfigError, match=rf"merge.scale: {scale}: must be in \[0, 1\] \(0: the base, 1: the"
    ):
        build_config(Config, {"run_dir": str(tmp_path), "merge": {"scale": scale}})


@pytest.mark.parametrize("scale, why_not", [(1.0, "nothing to merge"), (0.5, None)])
def test_cptkit_run_merges_a_full_model_only_below_scale_1(tmp_path, tiny_model_dir, scale, why_not):
    cfg = build_config(
        Config,
        {
            "run_dir": str(tmp_path),
            "model": {"name_or_path": str(tiny_model_dir)},
            "train": {"mode": "full"},
            "merge": {"scale": scale},
        },
    )
    found = next(s for s in STAGES if s.name == "merge").why_not(cfg)
    assert (found is None) if why_not is None else (why_not in found)

"""`train.regularize.l2_to_base`: the squared drift from the base weights, in full and LoRA mode."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cptkit.errors import ConfigError
from cptkit.testing.regularize import (
    perturb_trainable,
    source_rows,
    tiny_train_config,
    train_regularized,
    value_and_grads,
)
from cptkit.train.losses import LossContext, build_loss_terms


def _built(cfg, tmp_path):
    from cptkit.model.load import load_model_and_tokenizer

    model = load_model_and_tokenizer(cfg.model, cfg.train).model
    terms = build_loss_terms(cfg.train, LossContext(model, tmp_path))
    assert [t.name for t in terms] == ["causal_lm", "l2_to_base"]
    return model, terms[1]


def _assert_same(term, model, naive):
    """The term's value and gradients equal `naive()`'s."""
    (value, grads), (naive_value, naive_grads) = (
        value_and_grads(lambda: term(model, {}, {})[0], model),
        value_and_grads(naive, model),
    )
    assert value > 0
    torch.testing.assert_close(value, naive_value, rtol=1e-5, atol=1e-6)
    assert grads.keys() == naive_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], naive_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rslora, embeddings", [(False, False), (True, True)])
def test_lora_penalty_is_the_norm_of_each_scaled_update_and_so_is_its_gradient(
    tmp_path, tiny_model_dir, rslora, embeddings
):
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    lora = {"use_rslora": rslora, "train_embeddings": embeddings}
    cfg = tiny_train_config(tiny_model_dir, tmp_path, "lora", {"l2_to_base": {"weight": 0.5}}, lora=lora)
    model, term = _built(cfg, tmp_path)
    assert float(term(model, {}, {})[0]) == 0.0  # B = 0 and the trained copies equal the originals
    perturb_trainable(model)

    def naive():  # the d_out x d_in updates formed in full, with the scale from the config
        scale = 8 / (math.sqrt(4) if rslora else 4)
        total = torch.zeros(())
        for module in model.modules():
            if isinstance(module, LoraLayer):
                update = scale * module.lora_B["default"].weight @ module.lora_A["default"].weight
                total = total + update.square().sum()
            if isinstance(module, ModulesToSaveWrapper):
                trained, original = module.modules_to_save["default"].weight, module.original_module.weight
                total = total + (trained - original.detach()).square().sum()
        return 0.5 * total

    _assert_same(term, model, naive)
    value, metrics = term(model, {}, {})
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in name for name in trained) == embeddings
    assert metrics["loss/l2_to_base"] == value
    torch.testing.assert_close(metrics["regularize/drift_norm"], (value / 0.5).sqrt())


def test_full_penalty_sums_the_squared_drift_of_every_trained_weight_from_the_base(
    tmp_path, tiny_model_dir, caplog
):
    from transformers import AutoModelForCausalLM

    cfg = tiny_train_config(tiny_model_dir, tmp_path, "full", {"l2_to_base": {"weight": 2.0}})
    with caplog.at_level("INFO", logger="cptkit.train.l2"):
        model, term = _built(cfg, tmp_path)
    assert "a frozen copy of the base weights takes" in caplog.text
    assert float(term(model, {}, {})[0]) == 0.0
    perturb_trainable(model)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())

    def naive():
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return 2.0 * sum((p - base[n].detach()).square().sum() for n, p in trained)

    _assert_same(term, model, naive)


def test_gradient_accumulation_counts_the_penalty_once_per_optimizer_step(tmp_path, tiny_model_dir):
    """4 rows in one micro-batch and 4 micro-batches of one row make the same steps: a penalty counted
    at every micro-batch would pull the weights back four times as hard."""
    rows = source_rows(512, 12)
    regularize = {"l2_to_base": {"weight": 20.0}}

    def train(name, batch, accumulation):
        cfg = tiny_train_config(
            tiny_model_dir,
            tmp_path / name,
            regularize=regularize,
            max_steps=3,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        return train_regularized(cfg, rows)

    one_batch, _, one_lines = train("one", 4, 1)
    accumulated, _, accumulated_lines = train("accumulated", 1, 4)
    for a, b in zip(one_lines, accumulated_lines, strict=True):
        assert a["loss/l2_to_base"] == pytest.approx(b["loss/l2_to_base"], rel=1e-3, abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert one_lines[-1]["loss/l2_to_base"] > 0
    for (name, p), (_, q) in zip(one_batch.named_parameters(), accumulated.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-4, msg=name)


def test_a_resumed_run_measures_the_drift_from_the_base_not_from_its_checkpoint(tmp_path, tiny_model_dir):
    rows = source_rows(512, 24)
    regularize = {"l2_to_base": {"weight": 1.0}}

    def cfg(name):
        return tiny_train_config(
            tiny_model_dir, tmp_path / name, regularize=regularize, max_steps=6, save_steps=3
        )

    _, _, whole = train_regularized(cfg("whole"), rows)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", part / "checkpoint-3")
    shutil.copy(tmp_path / "whole" / "run_meta.json", part / "run_meta.json")
    _, _, resumed = train_regularized(cfg("part"), rows, resume_from=str(part / "checkpoint-3"))
    assert [line["step"] for line in resumed] == [4, 5, 6]
    assert json.loads((part / "run_meta.json").read_text())["resumed_from"].endswith("checkpoint-3")
    plain = {line["step"]: line for line in whole}
    for line in resumed:
        for key in ("loss", "loss/l2_to_base", "regularize/drift_norm"):
            assert line[key] == pytest.approx(plain[line["step"]][key], rel=1e-4), (key, line["step"])


def test_a_negative_weight_is_refused_in_the_config(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"train\.regularize\.l2_to_base\.weight: -1"):
        tiny_train_config(tiny_model_dir, tmp_path, regularize={"l2_to_base": {"weight": -1}})


def test_weight_zero_builds_no_term(tmp_path, tiny_model_dir):
    cfg = tiny_train_config(tiny_model_dir, tmp_path, regularize={"l2_to_base": {"weight": 0}})
    assert [t.name for t in build_loss_terms(cfg.train)] == ["causal_lm"]

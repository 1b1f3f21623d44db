"""The memory plan: the model's shape read without weights, the saved-tensor accounting checked by hand
on the Llama-3-8B shape, estimates that fall as more blocks recompute, the fastest plan that fits a
budget, budgets as the config writes them, the refusal of a run no plan fits, and the predicted peak
against a measured one."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from cptkit.config import Config, build_config
from cptkit.config.train import TrainConfig
from cptkit.errors import ConfigError
from cptkit.model.shape import ModelShape, shape_from_config, shape_of_model
from cptkit.train.checkpointing import unfittable
from cptkit.train.memory import (
    DEFAULT_MARGIN,
    NF4_BYTES_PER_PARAM,
    PREDICTION_HEADROOM,
    MemorySetup,
    RunShape,
    estimate_memory,
    expected_setup,
    parse_budget,
    plan_memory,
    relative_step_time,
    spread_layers,
)
from cptkit.train.memory_report import peak_record
from cptkit.train.saved_tensors import block_saved_bytes, liger_chunk_tokens

GiB = 2**30
H, KV, F, V = 4096, 1024, 14336, 128256
LLAMA3_8B = ModelShape(
    model_type="llama",
    hidden=H,
    layers=32,
    heads=32,
    kv_heads=8,
    head_dim=128,
    intermediate=F,
    vocab=V,
    tied_embeddings=False,
    block_linears={
        "self_attn.q_proj": (H, H),
        "self_attn.k_proj": (H, KV),
        "self_attn.v_proj": (H, KV),
        "self_attn.o_proj": (H, H),
        "mlp.gate_proj": (H, F),
        "mlp.up_proj": (H, F),
        "mlp.down_proj": (F, H),
    },
    block_other_params=2 * H,
    embedding_params=V * H,
    head_params=V * H,
    other_params=H,
)


@pytest.fixture(autouse=True)
def _global_rng_as_it_was():
    """Loading LoRA models and training draw from torch's global generator (cptkit train seeds it):
    the tests after these find it as they left it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        yield


def run_setup(mode="lora", fast=False, fused=False, **kw) -> MemorySetup:
    values = dict(
        mode=mode,
        seq_length=2048,
        micro_batch=8,
        lora_r=16,
        lora_targets="all-linear",
        train_embeddings=mode == "full",
        fused_cross_entropy=True,
        fast_lora=fast,
        fused_mlp=fused,
        fused_norm=fused,
    )
    return MemorySetup(**{**values, **kw})


# --- the shape -----------------------------------------------------------------------------------------


def test_the_8b_shape_counts_its_parameters_and_adapters():
    assert LLAMA3_8B.total_params() == 8_030_261_248  # Llama-3-8B's published count
    assert LLAMA3_8B.lora_params(16, "all-linear") == 41_943_040  # what peft reports for r=16 all-linear
    assert LLAMA3_8B.lora_params(32, ["q_proj", "v_proj"]) == 32 * 32 * (H + H + H + KV)


def test_the_shape_from_the_config_is_the_shape_of_the_loaded_peft_and_4bit_models(tiny_model_dir):
    from transformers import AutoConfig

    from cptkit.config.model import ModelConfig
    from cptkit.model.load import load_model_and_tokenizer

    expected = shape_from_config(AutoConfig.from_pretrained(tiny_model_dir))
    assert expected.layers == 2 and set(expected.block_linears) >= {"self_attn.q_proj", "mlp.down_proj"}
    model_cfg = ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")
    modes = ["full", "lora"]
    try:
        import bitsandbytes  # noqa: F401

        modes.append("qlora")
    except ImportError:
        pass
    for mode in modes:
        cfg = TrainConfig(mode=mode, gradient_checkpointing=False)
        cfg.lora.train_embeddings = mode == "lora"  # modules_to_save copies are not the model's
        assert shape_of_model(load_model_and_tokenizer(model_cfg, cfg).model) == expected, mode


# --- the accounting, by hand on the 8B shape -----------------------------------------------------------


def test_the_stock_lora_block_keeps_what_was_counted_by_hand():
    e = 2
    norm = 4 * H + 4  # the stock RMSNorm keeps its fp32 upcast and an fp32 rstd
    attention = e * H + e * H + 2 * e * KV + (e * H + 4 * 32) + e * H  # normed, q, k, v, out + lse, o input
    mlp = e * H + 4 * e * F  # normed, gate, act(gate), up, product
    adapters = e * 16 * 7  # x A^T in each of the seven adapted linears
    copies = e * (3 * H + H + 2 * H + F)  # peft's cast: one copy of each adapted input
    assert (
        sum(block_saved_bytes(LLAMA3_8B, run_setup()).values())
        == 2 * norm + attention + mlp + adapters + copies
    )
    assert 2 * norm + attention + mlp + adapters + copies == 270_696


def test_the_fused_paths_keep_no_input_copies_and_no_activation():
    stock = block_saved_bytes(LLAMA3_8B, run_setup())
    fast = block_saved_bytes(LLAMA3_8B, run_setup(fast=True, fused=True))
    assert "lora_input_copies" not in fast and "act_gate" not in fast
    assert "down_proj_input" not in fast  # the fused MLP recomputes act(gate) * up in its backward
    # peft's input copies, act(gate) and the product, and fp32 -> bf16 norm inputs
    assert sum(stock.values()) - sum(fast.values()) == 2 * (6 * H + F) + 2 * 2 * F + 2 * (2 * H)
    liger = block_saved_bytes(LLAMA3_8B, run_setup(fast=False, fused_swiglu=True))
    assert "act_gate" not in liger and "down_proj_input" in liger  # liger's SwiGLU keeps the product
    # a 4-bit base skips peft's cast on its own: QLoRA keeps no copies even on peft's path
    assert "lora_input_copies" not in block_saved_bytes(LLAMA3_8B, run_setup("qlora"))
    dropout = block_saved_bytes(LLAMA3_8B, run_setup("qlora", lora_dropout=0.05))
    assert dropout["lora_dropout_masks"] == 6 * H + F and dropout["lora_dropped_inputs"] == 2 * (6 * H + F)


def test_weights_optimizer_and_logits_by_hand():
    tokens = 2048 * 8
    linears = 32 * (2 * H * H + 2 * H * KV + 3 * H * F)
    qlora = estimate_memory(LLAMA3_8B, run_setup("qlora"), 0)
    assert qlora.weights == round(linears * NF4_BYTES_PER_PARAM) + (LLAMA3_8B.total_params() - linears) * 2
    lora = estimate_memory(LLAMA3_8B, run_setup(), 0)
    adapters = 41_943_040
    assert (lora.trainable, lora.gradients, lora.optimizer) == (4 * adapters, 4 * adapters, 8 * adapters)
    full = estimate_memory(LLAMA3_8B, run_setup("full", optimizer="adamw_torch_fused"), 0)
    params = LLAMA3_8B.total_params()  # bf16 parameters: bf16 gradients and AdamW states
    assert (full.weights, full.gradients, full.optimizer, full.optimizer_step) == (
        2 * params,
        2 * params,
        4 * params,
        0,
    )
    assert (
        estimate_memory(LLAMA3_8B, run_setup("full", optimizer="adamw_torch"), 0).optimizer_step == 2 * params
    )
    assert (
        estimate_memory(LLAMA3_8B, run_setup("full", optimizer="paged_adamw_8bit"), 0).optimizer == 2 * params
    )
    # liger sizes a chunk so its logits hold about as many values as the hidden states
    assert liger_chunk_tokens(tokens, H, V) == 512
    assert lora.logits == 512 * V * 2 + tokens * H * 2  # a bf16 chunk, its gradient in place
    unfused = estimate_memory(LLAMA3_8B, run_setup(fused_cross_entropy=False), 0)
    assert unfused.logits == tokens * V * (2 + 4 + 4)


def test_a_checkpointed_block_keeps_its_input_and_one_block_is_recomputed_at_a_time():
    s = run_setup()
    per_block = sum(block_saved_bytes(LLAMA3_8B, s).values()) * s.tokens
    none, one, every = (estimate_memory(LLAMA3_8B, s, k) for k in (0, 1, 32))
    assert none.checkpoints == 0 and one.checkpoints == s.tokens * H * 2 == every.checkpoints / 32
    assert none.activations - one.activations == 0  # one block fewer kept, one block recomputed
    assert none.activations - every.activations == 31 * per_block
    offload = estimate_memory(LLAMA3_8B, s, 32, offload=True)
    assert offload.checkpoints == 0 and offload.total == every.total - every.checkpoints


def test_estimates_fall_as_blocks_recompute_and_grow_with_tokens():
    for mode in ("lora", "qlora", "full"):
        totals = [estimate_memory(LLAMA3_8B, run_setup(mode), k).total for k in range(33)]
        # one block recomputing frees nothing (its saved set comes back in the backward) and costs its
        # input; from there on each block more frees one block's worth
        assert totals[0] < totals[1] and totals[1:] == sorted(totals[1:], reverse=True), mode
        assert totals[0] > totals[-1]
        longer = estimate_memory(LLAMA3_8B, run_setup(mode, seq_length=4096), 0).total
        assert longer > totals[0]
        offload = estimate_memory(LLAMA3_8B, run_setup(mode), 32, offload=True)
        assert offload.checkpoints == 0
        # in full mode the gradients and AdamW's states, not the activations, set the peak
        assert offload.total < totals[-1] if mode != "full" else offload.total == totals[-1]
    assert (
        estimate_memory(LLAMA3_8B, run_setup("qlora"), 0).total
        < estimate_memory(LLAMA3_8B, run_setup(), 0).total
    )
    with pytest.raises(ValueError):
        estimate_memory(LLAMA3_8B, run_setup(), 33)


def test_sharded_weights_are_planned_per_process():
    one = estimate_memory(LLAMA3_8B, run_setup("full"), 32)
    eight = estimate_memory(LLAMA3_8B, run_setup("full", shards=8), 32)
    assert eight.weights == one.weights // 8 and eight.optimizer == one.optimizer // 8
    assert eight.activations == one.activations and eight.workspace > one.workspace


# --- the planner -----------------------------------------------------------------------------------


def test_the_fastest_plan_that_fits():
    s = run_setup()
    # budgets that leave auto's headroom for the estimate's error above each plan's total
    totals = [
        math.ceil(estimate_memory(LLAMA3_8B, s, k).total / (1 - PREDICTION_HEADROOM)) for k in range(33)
    ]
    assert plan_memory(LLAMA3_8B, s, totals[0]).checkpointing == "none"
    some = plan_memory(LLAMA3_8B, s, totals[8])
    assert some.checkpointing == "some" and some.checkpointed_layers == (2, 6, 10, 14, 18, 22, 26, 30)
    assert some.estimate.total == estimate_memory(LLAMA3_8B, s, 8).total and some.fits
    assert some.relative_time == pytest.approx(1 + 0.5 * 8 / 32)
    assert plan_memory(LLAMA3_8B, s, totals[32]).checkpointing == "all"
    offload = plan_memory(LLAMA3_8B, s, totals[32] - 2)
    assert offload.checkpointing == "offload" and offload.fits and not offload.warnings
    assert offload.relative_time == pytest.approx(1.5 * 1.03)
    assert "32 blocks, inputs offloaded" in offload.describe()


def test_a_budget_nothing_fits_plans_offload_and_says_by_how_much():
    plan = plan_memory(LLAMA3_8B, run_setup("full"), 24 * GiB)
    assert plan.checkpointing == "offload" and not plan.fits
    (warning,) = plan.warnings
    over = (plan.estimate.total - 24 * GiB) / GiB
    assert f"by {over:.1f} GiB" in warning and "per_device_train_batch_size" in warning
    assert "over budget" in plan.describe()


def test_true_and_false_force_the_plan_and_are_estimated_all_the_same():
    s = run_setup()
    forced_on = plan_memory(LLAMA3_8B, s, 1000 * GiB, forced=True)
    assert (forced_on.checkpointing, forced_on.forced, len(forced_on.checkpointed_layers)) == (
        "all",
        True,
        32,
    )
    forced_off = plan_memory(LLAMA3_8B, s, 24 * GiB, forced=False)
    assert forced_off.checkpointing == "none" and forced_off.estimate.total > 24 * GiB
    assert "train.gradient_checkpointing: auto" in forced_off.warnings[0]
    assert json.loads(json.dumps(forced_off.to_json()))["predicted_peak_bytes"] == forced_off.estimate.total


def test_the_24gib_budget_plans_the_8b_qlora_run_at_8192_tokens():
    plan = plan_memory(
        LLAMA3_8B, run_setup("qlora", fast=True, fused=True, seq_length=8192, micro_batch=1), 24 * GiB
    )
    assert plan.fits and plan.checkpointing in ("none", "some", "all")


def test_relative_time_and_spread():
    assert relative_step_time("lora", 0, 32) == 1.0
    assert relative_step_time("full", 32, 32) == pytest.approx(4 / 3)
    assert spread_layers(4, 32) == (4, 12, 20, 28)
    assert spread_layers(0, 32) == () and spread_layers(32, 32) == tuple(range(32))
    assert all(len(spread_layers(k, 32)) == k for k in range(33))


# --- budgets and refusals --------------------------------------------------------------------------


def test_budgets_as_the_config_writes_them():
    total = 80 * GiB
    assert parse_budget(None, total) == int(total * (1 - DEFAULT_MARGIN))
    assert parse_budget("24GiB", total) == 24 * GiB
    assert parse_budget("80GB", total) == 80 * 10**9
    assert parse_budget("20000MiB", total) == 20000 * 2**20
    assert parse_budget("0.8", total) == int(0.8 * total)
    for bad in ("lots", "24", "0", "-1GiB", "12 parsecs"):
        with pytest.raises(ValueError):
            parse_budget(bad, total)


def test_a_budget_the_config_cannot_read_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train.memory_budget.*'24'.*GiB"):
        build_config(Config, {"train": {"memory_budget": "24"}})
    assert (
        build_config(Config, {"run_dir": "r", "train": {"memory_budget": 0.5}}).train.memory_budget == "0.5"
    )


def test_a_run_no_plan_fits_on_the_gpu_is_refused_and_one_that_fits_is_not():
    s = run_setup("full")
    message = unfittable(LLAMA3_8B, s, 24 * GiB)
    assert "per_device_train_batch_size" in message and "24.0 GiB" in message and "qlora" in message
    assert unfittable(LLAMA3_8B, run_setup("qlora"), 24 * GiB) is None


def test_the_setup_of_a_config():
    cfg = build_config(
        Config,
        {
            "run_dir": "r",
            "train": {
                "mode": "full",
                "regularize": {"kl_to_base": {"weight": 0.1}},
                "hf": {"optim": "adamw_torch", "per_device_train_batch_size": 2},
            },
        },
    ).train
    shape = RunShape.of(cfg, 1024)
    assert (shape.seq_length, shape.micro_batch) == (1024, 2)
    assert RunShape.of(TrainConfig(), 512).micro_batch == 8  # cptkit's default
    s = MemorySetup.from_config(cfg, shape, fused_cross_entropy=True, fast_lora=True, fused_mlp=False)
    assert (s.extra_model_copies, s.optimizer, s.train_embeddings, s.fast_lora) == (
        1,
        "adamw_torch",
        True,
        False,
    )


# --- predicted against measured ----------------------------------------------------------------------


def test_the_measured_peak_is_recorded_and_a_wrong_prediction_says_so():
    plan = plan_memory(LLAMA3_8B, run_setup(), 140 * GiB)
    predicted = plan.estimate.total
    record, warning = peak_record(plan, int(predicted * 1.05))
    assert warning is None and record["measured_peak_bytes"] == int(predicted * 1.05)
    assert record["checkpointing"] == plan.checkpointing
    record, warning = peak_record(plan, int(predicted * 0.8))
    assert record["prediction_error"] == pytest.approx(-0.2, abs=1e-3)
    assert "-20%" in warning and "train.gradient_checkpointing" in warning and "memory_budget" in warning


def test_cptkit_train_records_the_plan_in_run_meta(tmp_path, tiny_model_dir, tiny_tokenizer):
    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_train import make_cfg, write_dataset

    from cptkit.commands.train import run

    prepared = write_dataset(tmp_path / "prepared", tiny_tokenizer, documents=12)
    cfg = make_cfg(tmp_path / "out", tiny_model_dir, prepared, mode="lora", max_steps=2)
    cfg.train.gradient_checkpointing, cfg.train.memory_budget = "auto", "1GiB"
    run(cfg)
    meta = json.loads((tmp_path / "out" / "run_meta.json").read_text())
    assert meta["memory_plan"]["checkpointing"] == "none"  # a tiny model fits 1 GiB without recompute
    assert meta["memory_plan"]["budget_bytes"] == GiB and meta["memory_plan"]["predicted_peak_bytes"] > 0
    assert "measured_peak_bytes" not in meta["memory_plan"]  # measured on a GPU only


def test_the_setup_expected_before_loading_follows_train_kernels():
    cfg = TrainConfig(mode="lora")
    s = expected_setup(cfg, RunShape(2048, 8), fused_cross_entropy=True)
    assert (s.fast_lora, s.fused_mlp, s.fused_norm) == (True, True, True)
    cfg.kernels.swiglu, cfg.lora.dropout = "off", 0.05
    s = expected_setup(cfg, RunShape(2048, 8), fused_cross_entropy=True)
    assert (s.fast_lora, s.fused_mlp, s.fused_norm, s.lora_dropout) == (False, False, True, 0.05)
    assert not expected_setup(cfg, RunShape(2048, 8), fused_cross_entropy=False).fused_norm


def test_ewc_s_fisher_and_a_q_v_only_adapter_are_planned_as_they_run():
    """LoRA's EWC keeps an fp32 Fisher of every adapted base weight on the GPU; an adapter on q/v only
    leaves the MLP to its stock path (the fused MLP needs gate, up and down adapted)."""
    from cptkit.config.forgetting import RegularizeConfig
    from cptkit.train.memory import expected_setup

    plain = TrainConfig(mode="lora")
    ewc = dataclasses.replace(
        plain, regularize=RegularizeConfig(ewc=dataclasses.replace(RegularizeConfig().ewc, weight=1.0))
    )
    shape = RunShape(2048, 8)
    with_fisher = estimate_memory(LLAMA3_8B, expected_setup(ewc, shape, True), 0).weights
    without = estimate_memory(LLAMA3_8B, expected_setup(plain, shape, True), 0).weights
    assert with_fisher - without == 4 * LLAMA3_8B.layers * LLAMA3_8B.block_linear_params
    qv = dataclasses.replace(plain, lora=dataclasses.replace(plain.lora, target_modules=["q_proj", "v_proj"]))
    assert expected_setup(qv, shape, True).fused_mlp is False
    assert expected_setup(plain, shape, True).fused_mlp is True

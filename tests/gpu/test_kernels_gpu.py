"""On a CUDA GPU: the varlen attention with the collator's document boundaries (same losses and
gradients as deriving them, no host sync), liger's RMSNorm/SwiGLU/RoPE each on and off (same losses and
gradients to bf16 tolerance, nothing left patched beyond the model) and the compiled decoder blocks.
Run through the device tool: pytest -m gpu tests/gpu/test_kernels_gpu.py."""

from __future__ import annotations

import json

import pytest
import torch

from cptkit.config.model import ModelConfig
from cptkit.config.train import KernelsConfig, TrainConfig
from cptkit.model import attention
from cptkit.model.kernels import LIGER_KERNELS, decoder_blocks
from cptkit.model.load import load_model_and_tokenizer
from cptkit.train.collator import PackedCollator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16 = {"atol": 2e-2, "rtol": 2e-2}


def _rows(seed: int = 0, lengths=((70, 120, 50), (90, 30), (40, 100, 60, 36))):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for docs in lengths:
        rows.append(
            {
                "input_ids": torch.randint(3, 500, (sum(docs),), generator=gen).tolist(),
                "position_ids": [p for n in docs for p in range(n)],
            }
        )
    return rows


def _cuda(batch: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _load(model_dir, mode: str = "lora", **kernels):
    torch.manual_seed(0)
    train = TrainConfig(mode=mode, gradient_checkpointing=False, kernels=KernelsConfig(**kernels))
    loaded = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)), train)
    gen = torch.Generator().manual_seed(1)
    for name, param in loaded.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            param.data = (torch.randn(param.shape, generator=gen) * 0.05).to(param)
    return loaded


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, tol=BF16):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        scale = grads_b[name].abs().max().clamp_min(1e-6)  # bf16 gradients: compare relative to their size
        torch.testing.assert_close(grads_a[name] / scale, grads_b[name] / scale, **tol, msg=name)


def test_collator_boundaries_give_the_derived_losses_and_gradients(tiny_model_dir):
    loaded = _load(tiny_model_dir, rms_norm="off", swiglu="off", rope="off")
    assert loaded.attention == attention.VARLEN
    rows = _rows()
    given = _cuda(PackedCollator(0, pad_to_multiple_of=8, varlen_metadata=True)(rows))
    derived = {k: v for k, v in given.items() if k not in attention.VARLEN_KEYS}
    _assert_same(_loss_and_grads(loaded.model, given), _loss_and_grads(loaded.model, derived), tol={})


def test_the_attention_with_given_boundaries_makes_no_host_sync():
    batch = _cuda(PackedCollator(0, varlen_metadata=True)(_rows()))
    rows, width = batch["input_ids"].shape
    query = torch.randn(rows, 8, width, 64, device="cuda", dtype=torch.bfloat16)
    key, value = torch.randn(2, rows, 2, width, 64, device="cuda", dtype=torch.bfloat16)
    given = {k: batch[k] for k in (*attention.VARLEN_KEYS, "position_ids")}
    module = torch.nn.Module()
    attention.varlen_attention_forward(module, query, key, value, None, **given)  # lazy initialisation first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attention.varlen_attention_forward(module, query, key, value, None, **given)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_loaded_model_records_the_liger_kernels_on_a_gpu(tiny_model_dir):
    pytest.importorskip("liger_kernel")
    loaded = _load(tiny_model_dir)
    assert loaded.kernels == {
        "rms_norm": True,
        "swiglu": True,
        "rope": True,
        "fast_lora": {"layers": 2 * 7, "mlps": 2},
        "compile": False,
    }


@pytest.mark.parametrize("kernel", ["rms_norm", "swiglu", "rope"])
def test_each_liger_kernel_gives_the_stock_losses_and_gradients(tiny_model_dir, kernel):
    pytest.importorskip("liger_kernel")
    from transformers.models.llama import modeling_llama

    stock_rope, stock_norm, stock_mlp = (
        modeling_llama.apply_rotary_pos_emb,
        modeling_llama.LlamaRMSNorm,
        modeling_llama.LlamaMLP,
    )
    off = {"rms_norm": "off", "swiglu": "off", "rope": "off"}
    batch = _cuda(PackedCollator(0, pad_to_multiple_of=8, varlen_metadata=True)(_rows()))
    fused = _load(tiny_model_dir, **{**off, kernel: "on"})
    # the other liger kernels off (the record also holds fast_lora's counts and compile)
    assert fused.kernels[kernel] and not any(fused.kernels[k] for k in LIGER_KERNELS if k != kernel)
    with_kernel = _loss_and_grads(fused.model, batch)
    # nothing of liger's is left in transformers' module beyond the RoPE function it needs
    assert modeling_llama.LlamaRMSNorm is stock_norm and modeling_llama.LlamaMLP is stock_mlp
    assert (modeling_llama.apply_rotary_pos_emb is not stock_rope) == (kernel == "rope")
    plain = _load(tiny_model_dir, **off)
    assert modeling_llama.apply_rotary_pos_emb is stock_rope  # rope off puts transformers' own back
    _assert_same(with_kernel, _loss_and_grads(plain.model, batch))


def _explain_first_block(loaded):
    model = loaded.model.train()
    seen = {}
    handle = decoder_blocks(model)[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    model(**_cuda(PackedCollator(0, varlen_metadata=True)(_rows())), use_cache=False)
    handle.remove()
    torch._dynamo.reset()
    return torch._dynamo.explain(decoder_blocks(model)[0])(*seen["args"], **seen["kwargs"])


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_a_block_compiles_to_one_graph_on_the_gpu(tiny_model_dir, mode):
    """cptkit's own block (the varlen attention, the fused LoRA linears and MLP, bitsandbytes' 4-bit
    weights in qlora) traces to one graph; liger 0.8.5 runs each of its kernels through
    `liger_kernel.backends.dispatch.dispatch`, which it marks torch.compiler.disable: one break per
    call, the block's two RMSNorms and its RoPE (its SwiGLU is not called: the fused LoRA MLP replaces
    it), 3 breaks as measured on the H200, and no other."""
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    own = _explain_first_block(_load(tiny_model_dir, mode=mode, rms_norm="off", swiglu="off", rope="off"))
    assert own.graph_break_count == 0, [r.reason for r in own.break_reasons]
    with_liger = _explain_first_block(_load(tiny_model_dir, mode=mode))
    reasons = [str(r.reason) for r in with_liger.break_reasons]
    assert with_liger.graph_break_count == 3, reasons
    assert all("torch.compiler.disable" in r and "function dispatch" in r for r in reasons), reasons


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_compiled_blocks_give_the_plain_losses_and_gradients_on_the_gpu(tiny_model_dir, mode):
    torch._dynamo.reset()
    batches = [
        _cuda(PackedCollator(0, pad_to_multiple_of=8, varlen_metadata=True)(rows))
        for rows in (_rows(0), _rows(1, ((64, 30), (50, 44))), _rows(2))  # other widths and boundaries
    ]
    plain = _load(tiny_model_dir, mode=mode, compile="off")
    compiled = _load(tiny_model_dir, mode=mode, compile="on")
    assert compiled.kernels["compile"] is True
    for batch in batches:
        _assert_same(_loss_and_grads(compiled.model, batch), _loss_and_grads(plain.model, batch))


def test_train_records_the_kernels_in_run_meta(tmp_path, tiny_model_dir, tiny_tokenizer):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
    from test_train import make_cfg, write_dataset

    from cptkit.commands.train import run

    prepared = write_dataset(tmp_path / "prepared", tiny_tokenizer)
    cfg = make_cfg(tmp_path / "out", tiny_model_dir, prepared, mode="lora", max_steps=4, schedule="constant")
    cfg.train.kernels.compile = "on"
    run(cfg)
    meta = json.loads((tmp_path / "out" / "run_meta.json").read_text())
    assert meta["kernels"]["compile"] is True and set(meta["kernels"]) >= {"rms_norm", "swiglu", "rope"}

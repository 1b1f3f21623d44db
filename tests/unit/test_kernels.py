"""`train.kernels`: liger's RMSNorm, SwiGLU and RoPE each its own switch (refused where they cannot
apply, before the weights load), what was applied recorded, and regional torch.compile of the decoder
blocks giving the losses and gradients of the plain model, without graph breaks from cptkit's code."""

from __future__ import annotations

import pytest
import torch

from cptkit.config.model import ModelConfig
from cptkit.config.train import KernelsConfig, TrainConfig
from cptkit.errors import CptkitError
from cptkit.model.kernels import (
    COMPILE_BACKEND_ENV,
    LigerSupport,
    check_kernels,
    choose_liger_kernels,
    compile_pays,
    decoder_blocks,
    liger_support,
)
from cptkit.model.load import load_model_and_tokenizer
from cptkit.train.collator import PackedCollator
from cptkit.train.optional import optional_needs

ALL = LigerSupport(frozenset({"rms_norm", "swiglu", "rope"}))
NO_GPU = LigerSupport(frozenset(), "liger-kernel's Triton kernels need a CUDA GPU")


def test_auto_takes_each_kernel_liger_has_and_off_leaves_it():
    assert choose_liger_kernels(KernelsConfig(), "llama", ALL) == {
        "rms_norm": True,
        "swiglu": True,
        "rope": True,
    }
    gemma_like = LigerSupport(frozenset({"rms_norm", "rope"}))
    assert choose_liger_kernels(KernelsConfig(swiglu="auto"), "gemma", gemma_like)["swiglu"] is False
    chosen = choose_liger_kernels(KernelsConfig(rms_norm="off", rope="off"), "llama", ALL)
    assert chosen == {"rms_norm": False, "swiglu": True, "rope": False}
    assert not any(choose_liger_kernels(KernelsConfig(), "llama", NO_GPU).values())


def test_on_where_a_kernel_cannot_apply_names_every_one():
    with pytest.raises(CptkitError) as e:
        choose_liger_kernels(KernelsConfig(rms_norm="on", rope="on"), "llama", NO_GPU, where="sft.kernels")
    assert "sft.kernels.rms_norm: on, but liger-kernel's Triton kernels need a CUDA GPU" in str(e.value)
    assert "sft.kernels.rope: on" in str(e.value) and "swiglu" not in str(e.value)
    with pytest.raises(CptkitError, match="no swiglu kernel for model type gemma"):
        choose_liger_kernels(KernelsConfig(swiglu="on"), "gemma", LigerSupport(frozenset({"rms_norm"})))


def test_liger_support_says_why_it_cannot_be_used():
    assert "CUDA" in liger_support("llama", on_gpu=False).unusable
    try:
        import liger_kernel.transformers.monkey_patch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        assert "liger-kernel cannot be used here" in liger_support("llama", on_gpu=True).unusable
    else:
        assert liger_support("llama", on_gpu=True) == ALL
        assert liger_support("no-such-model", on_gpu=True) == LigerSupport(frozenset())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_a_kernel_on_without_a_gpu_is_refused_before_the_weights_load(tiny_model_dir):
    train = TrainConfig(kernels=KernelsConfig(rope="on"))
    with pytest.raises(CptkitError, match="train.kernels.rope: on, but"):
        check_kernels(train, ModelConfig(name_or_path=str(tiny_model_dir)))
    check_kernels(TrainConfig(), ModelConfig(name_or_path="/does/not/matter"))  # nothing on: no config read
    with pytest.raises(CptkitError, match="train.kernels.rope: on, but"):  # and at load, for other callers
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)), train)


def test_a_kernel_on_needs_liger_installed():
    needs = optional_needs(TrainConfig(kernels=KernelsConfig(swiglu="on")), None, "sft")
    assert needs["liger-kernel"] == "sft.kernels.swiglu: on"
    assert "liger-kernel" not in optional_needs(TrainConfig(), None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU auto turns them on")
def test_the_loaded_model_records_its_kernels(tiny_model_dir):
    loaded = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)), TrainConfig())
    assert loaded.kernels == {
        "rms_norm": False,
        "swiglu": False,
        "rope": False,
        "compile": False,
        "fast_lora": {"layers": 2 * 7, "mlps": 2},  # LoRA all-linear on both blocks, dropout 0
    }


def test_compile_auto_waits_for_a_measurement():
    assert not any(
        compile_pays(mode, device) for mode in ("full", "lora", "qlora") for device in ("cuda", "cpu")
    )


def _load(model_dir, compile_: str, checkpointing: bool, mode: str = "lora"):
    torch.manual_seed(0)  # the same LoRA initialisation in every load
    train = TrainConfig(
        mode=mode, gradient_checkpointing=checkpointing, kernels=KernelsConfig(compile=compile_)
    )
    loaded = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir)), train)
    gen = torch.Generator().manual_seed(1)
    for name, param in loaded.model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    return loaded


def _batches():
    gen = torch.Generator().manual_seed(2)
    rows = [
        {"input_ids": torch.randint(3, 400, (n,), generator=gen).tolist(), "position_ids": positions}
        for n, positions in ((14, [*range(9), *range(5)]), (11, [*range(11)]), (6, [*range(2), *range(4)]))
    ]
    collate = PackedCollator(0)
    return [collate(rows[:2]), collate(rows[2:])]  # the second is shorter: the blocks recompile once


def _losses_and_grads(loaded, batches):
    model = loaded.model.train()
    losses = []
    for batch in batches:
        model.zero_grad()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), grads


@pytest.mark.parametrize(
    ("checkpointing", "batches"),
    [
        (True, 1),
        # the second, shorter batch recompiles the blocks with dynamic sizes (15 s on a CPU)
        pytest.param(False, 2, marks=pytest.mark.slow),
    ],
)
def test_compiled_blocks_give_the_losses_and_gradients_of_the_plain_model(
    tiny_model_dir, monkeypatch, checkpointing, batches
):
    from torch._dynamo.utils import counters

    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")  # inductor's C++ build is slow on a CPU
    torch._dynamo.reset()
    counters.clear()
    plain = _load(tiny_model_dir, "off", checkpointing)
    compiled = _load(tiny_model_dir, "on", checkpointing)
    assert plain.kernels["compile"] is False and compiled.kernels["compile"] is True
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())  # saved under the same names
    want_loss, want_grads = _losses_and_grads(plain, _batches()[:batches])
    got_loss, got_grads = _losses_and_grads(compiled, _batches()[:batches])
    # one graph serves every block, for each shape; without checkpointing the first block's input (the
    # frozen embeddings' output) needs no gradient, unlike the others': a graph of its own
    assert counters["stats"]["unique_graphs"] == batches * (1 if checkpointing else 2)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and any("lora_A" in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _block_inputs(model, batch):
    """What the first decoder block is called with during a forward of `batch` (a public hook)."""
    seen = {}

    def keep(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)

    handle = decoder_blocks(model)[0].register_forward_pre_hook(keep, with_kwargs=True)
    model(**batch, use_cache=False)
    handle.remove()
    return seen["args"], seen["kwargs"]


def _graph_breaks(model_dir, mode: str) -> list:
    loaded = _load(model_dir, "off", checkpointing=False, mode=mode)
    model = loaded.model.train()
    block = decoder_blocks(model)[0]
    args, kwargs = _block_inputs(model, _batches()[0])
    torch._dynamo.reset()
    return torch._dynamo.explain(block)(*args, **kwargs).break_reasons


def test_a_lora_block_compiles_to_one_graph(tiny_model_dir):
    assert _graph_breaks(tiny_model_dir, "lora") == []


@pytest.mark.slow
def test_a_4bit_lora_block_compiles_to_one_graph_on_cpu(tmp_path, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    from cptkit.testing.tiny import make_tiny_llama

    wide = make_tiny_llama(tmp_path / "wide", tokenizer=tiny_tokenizer, hidden_size=128)  # 4-bit blocks of 64
    assert _graph_breaks(wide, "qlora") == []

"""On a CUDA GPU in bf16: the fused LoRA path (train.kernels.fast_lora) gives peft's losses and gradients
to bf16 tolerance, for LoRA and QLoRA, and a lower peak memory over forward and backward. Run through
the device tool: pytest -m gpu tests/gpu."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROWS, LENGTH = 4, 512


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    from cptkit.testing.tiny import make_tiny_llama

    return make_tiny_llama(
        tmp_path_factory.mktemp("llama-256"), tokenizer=tiny_tokenizer, hidden_size=256, num_layers=4
    )


def load(model_dir, fast, mode):
    from cptkit.config import Config, build_config
    from cptkit.model.load import load_model_and_tokenizer

    train = dict(
        mode=mode,
        output_dir="unused",
        report_to=["none"],
        gradient_checkpointing=False,
        fused_cross_entropy="off",
        lora={"r": 16, "alpha": 32, "target_modules": "all-linear"},
        kernels={"fast_lora": fast},
    )
    model = {"name_or_path": str(model_dir), "dtype": "bfloat16", "attention": "sdpa"}
    cfg = build_config(Config, {"model": model, "train": train})
    torch.manual_seed(0)
    loaded = load_model_and_tokenizer(cfg.model, cfg.train).model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in loaded.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.device) * 0.05)
    return loaded


def step(model):
    """Loss, gradients and the activation peak (bytes over what was allocated before) of one forward and
    backward under bf16 autocast, as the Trainer runs it."""
    ids = torch.randint(3, 500, (ROWS, LENGTH), generator=torch.Generator().manual_seed(2)).cuda()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, peak


# activation peak fused / peft at most; predicted about 0.67 for LoRA (per block 4 x tokens x hidden +
# 2 x tokens x intermediate fewer bf16 values kept, of about 22 MB) and 0.8 for QLoRA (2 x tokens x
# intermediate fewer, of about 18 MB)
@pytest.mark.parametrize(("mode", "most"), [("lora", 0.8), ("qlora", 0.9)])
def test_fast_path_equals_peft_path_in_bf16_with_a_lower_peak(model_dir, mode, most):
    from cptkit.model.fast_lora import fast_lora_status

    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
    fast = load(model_dir, "on", mode)
    assert fast_lora_status(fast) == {"layers": 4 * 7, "mlps": 4}
    loss_f, grads_f, peak_f = step(fast)
    del fast
    stock = load(model_dir, "off", mode)
    loss_s, grads_s, peak_s = step(stock)
    torch.testing.assert_close(loss_f, loss_s, atol=2e-2, rtol=2e-2)
    assert grads_f.keys() == grads_s.keys()
    for name in grads_s:
        scale = grads_s[name].abs().max()
        assert (grads_f[name] - grads_s[name]).abs().max() <= 5e-2 * scale, name
    print(f"{mode}: activation peak fused {peak_f / 2**20:.1f} MiB, peft {peak_s / 2**20:.1f} MiB")
    assert peak_f < most * peak_s, (peak_f, peak_s)

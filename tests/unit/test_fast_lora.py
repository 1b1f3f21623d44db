"""The fused LoRA path (train.kernels.fast_lora) computes what peft's path computes, keeps fewer saved
tensors, and steps aside wherever it does not apply (adapters disabled, merged, dropout)."""

from __future__ import annotations

import pytest
import torch

from cptkit.config import Config, build_config
from cptkit.errors import CptkitError
from cptkit.model.fast_lora import fast_lora_status
from cptkit.model.load import load_model_and_tokenizer


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_tokenizer):
    """bitsandbytes' CPU 4-bit kernels need input features of at least one quantisation block (64)."""
    from cptkit.testing.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), tokenizer=tiny_tokenizer, hidden_size=64)


def config(model_dir, fast="auto", mode="lora", dtype="float32", **train):
    lora = {"r": 4, "alpha": 8, "target_modules": "all-linear", **train.pop("lora", {})}
    section = dict(
        mode=mode,
        output_dir="unused",
        report_to=["none"],
        gradient_checkpointing=train.pop("gradient_checkpointing", False),
        lora=lora,
        kernels={"fast_lora": fast},
    )
    if mode == "qlora":  # fp32 compute, so that peft's path and the fused one round alike
        section["quantization"] = {"compute_dtype": "float32" if dtype == "float32" else "bfloat16"}
    return build_config(
        Config, {"model": {"name_or_path": str(model_dir), "dtype": dtype}, "train": {**section, **train}}
    )


def load(model_dir, fast="auto", mode="lora", dtype="float32", **train):
    """The model as cptkit train loads it, with a non-zero B (peft starts it at 0, which would hide a
    wrong update or a wrong gradient of A)."""
    cfg = config(model_dir, fast, mode, dtype, **train)
    torch.manual_seed(0)
    model = load_model_and_tokenizer(cfg.model, cfg.train).model.train()  # as the Trainer runs it
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def batch(vocab=500, rows=2, length=24):
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids, "labels": ids.clone()}


def loss_logits_grads(model, inputs, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach().float(), out.logits.detach().float(), grads


def assert_same(fast, stock, atol, rtol=0.0):
    (loss_f, logits_f, grads_f), (loss_s, logits_s, grads_s) = fast, stock
    torch.testing.assert_close(logits_f, logits_s, atol=atol, rtol=rtol)
    torch.testing.assert_close(loss_f, loss_s, atol=atol, rtol=rtol)
    assert grads_f.keys() == grads_s.keys() and len(grads_f) > 0
    for name in grads_s:
        torch.testing.assert_close(grads_f[name], grads_s[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_fast_path_equals_peft_path(tiny_model_dir, checkpointing):
    fast = load(tiny_model_dir, "on", gradient_checkpointing=checkpointing)
    stock = load(tiny_model_dir, "off", gradient_checkpointing=checkpointing)
    assert fast_lora_status(fast) == {"layers": 2 * 7, "mlps": 2}
    assert fast_lora_status(stock) == {"layers": 0, "mlps": 0}
    inputs = batch()
    result = loss_logits_grads(fast, inputs)
    assert_same(result, loss_logits_grads(stock, inputs), atol=1e-5)
    assert all(g.abs().sum() > 0 for g in result[2].values())  # A and B both get a gradient


def test_qlora_fast_path_equals_peft_path(wide_model_dir):
    pytest.importorskip("bitsandbytes")
    fast, stock = load(wide_model_dir, "on", mode="qlora"), load(wide_model_dir, "off", mode="qlora")
    assert fast_lora_status(fast) == {"layers": 2 * 7, "mlps": 2}
    inputs = batch()
    assert_same(loss_logits_grads(fast, inputs), loss_logits_grads(stock, inputs), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_fast_path_under_bf16_autocast_equals_peft_path_to_bf16_tolerance(
    tiny_model_dir, wide_model_dir, mode
):
    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
        tiny_model_dir = wide_model_dir
    fast = load(tiny_model_dir, "on", mode=mode, dtype="bfloat16")
    stock = load(tiny_model_dir, "off", mode=mode, dtype="bfloat16")
    inputs = batch()
    got, want = (
        loss_logits_grads(fast, inputs, autocast=True),
        loss_logits_grads(stock, inputs, autocast=True),
    )
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], want[1], atol=5e-2, rtol=5e-2)
    for name in want[2]:
        scale = want[2][name].abs().max()
        assert (got[2][name] - want[2][name]).abs().max() <= 5e-2 * scale, name


def saved_activations(model, inputs):
    """The distinct tensors (by storage) that one forward under bf16 autocast saves for backward, less
    the parameters: {storage pointer: (shape, dtype, bytes)}."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = (tuple(t.shape), t.dtype, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs, use_cache=False).loss.backward()
    return saved


def test_fast_path_saves_no_copy_of_the_layer_inputs_and_not_the_mlp_product(tiny_model_dir):
    """Per block, peft's path saves a bf16 copy (made from its fp32 copy) of the input of each of the 7
    adapted linears, and its MLP keeps silu(gate); the fused path keeps the inputs themselves, of which
    q/k/v share one, gate/up one, and o_proj's is the attention output its backward keeps anyway, and it
    keeps gate and up but neither silu(gate) nor the product: 4 x (tokens x hidden) + 2 x (tokens x
    intermediate) fewer per block."""
    inputs = batch()
    fast = saved_activations(load(tiny_model_dir, "on", dtype="bfloat16"), inputs)
    stock = saved_activations(load(tiny_model_dir, "off", dtype="bfloat16"), inputs)
    config = load(tiny_model_dir, "off", dtype="bfloat16").config
    tokens, d, f, blocks = inputs["input_ids"].numel(), config.hidden_size, config.intermediate_size, 2
    expected = blocks * (4 * tokens * d + 2 * tokens * f) * 2  # bf16 bytes
    removed = sum(b for _, _, b in stock.values()) - sum(b for _, _, b in fast.values())
    adapter_casts = blocks * 7 * 2 * 4 * max(d, f) * 2  # bf16 casts of A and B peft saves, at most
    assert expected <= removed <= expected + adapter_casts, (removed, expected)
    # the MLP's intermediate activations (tokens x f): the fused MLP saves gate and up only
    rows, length = inputs["input_ids"].shape
    assert sum(1 for shape, _, _ in fast.values() if shape == (rows, length, f)) == 2 * blocks


def test_disabled_adapter_gives_the_base_exactly(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    fast, inputs = load(tiny_model_dir, "on"), batch()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        want = base(input_ids=inputs["input_ids"]).logits
        with fast.disable_adapter():
            got = fast(input_ids=inputs["input_ids"]).logits
        changed = fast(input_ids=inputs["input_ids"]).logits
    assert torch.equal(got, want)
    assert (changed - want).abs().max() > 1e-3  # the adapter is on again, and moves the logits


def test_adapter_trained_on_the_fast_path_saves_and_merges_as_peft_s(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fast, inputs = load(tiny_model_dir, "on"), batch()
    optimizer = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        fast(**inputs, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    fast.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        trained = fast(input_ids=inputs["input_ids"]).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
        torch.testing.assert_close(merged(input_ids=inputs["input_ids"]).logits, trained, atol=1e-5, rtol=0)


def test_packed_rows_equal_documents_one_at_a_time_on_the_fast_path(tiny_model_dir):
    from cptkit.train.collator import PackedCollator

    fast = load(tiny_model_dir, "on").eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (7, 12, 5)]
    row = {"input_ids": sum(docs, []), "position_ids": [p for d in docs for p in range(len(d))]}
    packed = PackedCollator(pad_token_id=0)([row])
    with torch.no_grad():
        logits = fast(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        separate = torch.cat([fast(input_ids=torch.tensor([d])).logits[0] for d in docs])
    torch.testing.assert_close(logits, separate, atol=1e-5, rtol=1e-5)


def fp32_copies(model, inputs):
    """Elements of the fp32 copies made during one forward and backward under bf16 autocast."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("dtype") == torch.float32:
                Count.elements += out.numel()
            return out

    with Count(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(**inputs, use_cache=False).loss.backward()
    return Count.elements


def test_dropout_takes_peft_s_path_without_its_fp32_copy_of_each_input(tiny_model_dir):
    """With dropout, peft's path runs; under autocast x is no longer copied to fp32 in front of lora_A
    (autocast casts it to bf16 itself), which made 7 input-sized fp32 copies per block in forward and
    as many gradients in backward."""
    inputs = batch()
    auto = load(tiny_model_dir, "auto", dtype="bfloat16", lora={"dropout": 0.1})
    assert fast_lora_status(auto) == {"layers": 0, "mlps": 0}
    stock = load(tiny_model_dir, "off", dtype="bfloat16", lora={"dropout": 0.1})
    tokens, d, f = inputs["input_ids"].numel(), auto.config.hidden_size, auto.config.intermediate_size
    removed = fp32_copies(stock, inputs) - fp32_copies(auto, inputs)
    forward = 2 * (6 * tokens * d + tokens * f)  # 2 blocks; backward casts the gradients back too
    assert forward <= removed <= 2 * forward, (removed, forward)


@pytest.mark.parametrize(
    ("train", "why"),
    [
        ({"lora": {"dropout": 0.05}}, "lora.dropout 0"),
        ({"mode": "full"}, "mode lora or qlora"),
    ],
)
def test_fast_lora_on_is_refused_where_it_cannot_apply(tiny_model_dir, train, why):
    from cptkit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"train.kernels.fast_lora.*{why}"):
        config(tiny_model_dir, "on", **train)


def test_fast_lora_on_is_refused_for_layers_it_cannot_route(tiny_model_dir):
    cfg = config(tiny_model_dir, "on", lora={"target_modules": ["q_proj", "embed_tokens"]})
    with pytest.raises(CptkitError, match="1 LoRA layers cannot take the fused path"):
        load_model_and_tokenizer(cfg.model, cfg.train)
    auto = config(tiny_model_dir, "auto", lora={"target_modules": ["q_proj", "embed_tokens"]})
    model = load_model_and_tokenizer(auto.model, auto.train).model
    assert fast_lora_status(model) == {"layers": 2, "mlps": 0}


def test_hooks_on_lora_layers_and_their_parts_still_run(tiny_model_dir):
    """A hook on a LoRA layer (cptkit's EWC Fisher hooks them) or on its lora_A runs once per forward:
    the fused MLP and the fused linear step aside for the modules they would skip."""
    from cptkit.model.fast_lora import lora_layers

    fast, inputs = load(tiny_model_dir, "on"), batch()
    with torch.no_grad():
        want = fast(input_ids=inputs["input_ids"]).logits
    calls = []
    layers = lora_layers(fast)
    handles = [m.register_forward_hook(lambda m, a, o, n=n: calls.append(n)) for n, m in layers]
    handles += [m.lora_A["default"].register_forward_hook(lambda *a: calls.append("A")) for _, m in layers]
    with torch.no_grad():
        got = fast(input_ids=inputs["input_ids"]).logits
    for handle in handles:
        handle.remove()
    assert sorted(calls) == sorted([n for n, _ in layers] + ["A"] * len(layers))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

"""kl_to_base: the chunked divergence equals the one from full logits (value and gradients), the base
is the adapters-off network (LoRA) or a frozen copy (full), and bad settings are refused before any
model loads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cptkit.config import Config, build_config
from cptkit.config.forgetting import KlToBaseConfig
from cptkit.config.load import ConfigError
from cptkit.data.prepared import Prepared
from cptkit.errors import CptkitError
from cptkit.train.checks import check_regularizers
from cptkit.train.kl import KlToBase, chunked_kl


def naive_kl(hidden, weight, bias, base_hidden, base_weight, base_bias, temperature):
    """T^2 * mean KL(base || model) from the full logits of every token."""
    log_q = F.log_softmax(F.linear(hidden, weight, bias) / temperature, dim=-1)
    log_p = F.log_softmax(F.linear(base_hidden, base_weight, base_bias) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature**2 * kl.mean()


def _leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_kl_equals_the_full_logits_kl_with_its_gradients(temperature, chunk):
    n, h, v = 10, 6, 23
    hidden, weight, bias = _leaves((n, h), (v, h), (v,))
    base_hidden, base_weight, base_bias = (t.detach() for t in _leaves((n, h), (v, h), (v,), seed=1))
    value = chunked_kl(hidden, weight, bias, base_hidden, base_weight, base_bias, temperature, chunk)
    value.backward(torch.tensor(0.7, dtype=torch.float64))
    grads = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    expected = naive_kl(hidden, weight, bias, base_hidden, base_weight, base_bias, temperature)
    (0.7 * expected).backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    for got, want in zip(grads, (hidden.grad, weight.grad, bias.grad), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_chunked_kl_of_no_tokens_is_zero_without_nan():
    hidden, weight = _leaves((0, 4), (9, 4))
    value = chunked_kl(hidden, weight, None, torch.zeros(0, 4, dtype=torch.float64), weight.detach(), None)
    value.backward()
    assert value.item() == 0.0
    assert not torch.isnan(weight.grad).any() and weight.grad.abs().sum() == 0


def test_chunked_kl_of_a_frozen_head_gives_no_weight_gradient():
    hidden, weight = _leaves((5, 4), (9, 4))
    frozen = weight.detach()
    value = chunked_kl(hidden, frozen, None, hidden.detach() + 1, frozen, None, 1.0, 2)
    value.backward()
    assert hidden.grad is not None and frozen.grad is None and value.item() > 0


# --- on a tiny Llama ---------------------------------------------------------------------------------

SOURCES = {0: "domain", 1: "general"}


@pytest.fixture()
def llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def lora(model, train_embeddings=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules="all-linear",
        modules_to_save=["lm_head"] if train_embeddings else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two packed rows of three segments each (domain, general, domain / general, domain, padding)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (2, 12), generator=g)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    source_ids = torch.tensor([[0] * 4 + [1] * 5 + [0] * 3, [1] * 5 + [0] * 5 + [-1] * 2])
    labels = torch.where(position_ids == 0, -100, input_ids)
    labels[1, 10:] = -100
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "source_ids": source_ids}


def forward(model, inputs):
    keep = ("input_ids", "position_ids", "labels")
    return model(**{k: inputs[k] for k in keep}, output_hidden_states=True)


def naive_term(model, base_logits, inputs, tokens, temperature):
    """The term from the model's full logits and the base's, on the selected next-token positions."""
    logits = forward(model, inputs).logits
    mask = inputs["labels"][:, 1:] != -100
    if tokens == "replay":
        mask &= inputs["source_ids"][:, 1:] == 1
    log_q = F.log_softmax(logits[:, :-1][mask] / temperature, -1)
    log_p = F.log_softmax(base_logits[:, :-1][mask] / temperature, -1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def perturb(model, names=("lora_B", "lm_head", "q_proj")):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and any(n in name for n in names):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def grads_of(model, compute):
    model.zero_grad()
    compute().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tokens", ["replay", "all"])
@pytest.mark.parametrize("train_embeddings", [False, True])
def test_lora_term_equals_the_naive_kl_to_the_adapters_off_model(llama, tokens, train_embeddings):
    with torch.no_grad():
        base_logits = llama(
            **{k: v for k, v in batch(llama.config.vocab_size).items() if k != "source_ids"}
        ).logits
    model = lora(llama, train_embeddings)
    cfg = KlToBaseConfig(weight=0.5, tokens=tokens, temperature=1.7, chunk_tokens=5)
    term = KlToBase.build(cfg, model, general_sources={1})
    assert term.reference is None  # the base is the model itself, adapters off
    inputs = batch(llama.config.vocab_size)
    model.train()
    at_start, metrics = term(model, inputs, forward(model, inputs))
    assert at_start.item() == pytest.approx(0.0, abs=1e-6)  # B = 0 (and modules_to_save a copy)
    perturb(model)

    def through_term():
        value, metrics = term(model, inputs, forward(model, inputs))
        assert metrics["loss/kl_to_base"] == pytest.approx(0.5 * metrics["regularize/kl_to_base"].item())
        return value

    ours = grads_of(model, through_term)
    naive = grads_of(model, lambda: 0.5 * naive_term(model, base_logits, inputs, tokens, 1.7))
    assert ours.keys() == naive.keys() and ours
    value = through_term().item()
    assert value > 1e-4
    assert value == pytest.approx(0.5 * naive_term(model, base_logits, inputs, tokens, 1.7).item(), rel=1e-4)
    for name in ours:
        torch.testing.assert_close(ours[name], naive[name], rtol=1e-4, atol=1e-6)


def test_full_term_uses_a_frozen_copy_and_trains_the_lm_head(llama):
    inputs = batch(llama.config.vocab_size)
    with torch.no_grad():
        base_logits = llama(**{k: v for k, v in inputs.items() if k != "source_ids"}).logits
    base_state = copy.deepcopy(llama.state_dict())
    term = KlToBase.build(
        KlToBaseConfig(weight=1.0, tokens="all", chunk_tokens=4), llama, general_sources={1}
    )
    assert not term.reference.training and not any(p.requires_grad for p in term.reference.parameters())
    llama.train()
    assert term(llama, inputs, forward(llama, inputs))[0].item() == pytest.approx(0.0, abs=1e-6)
    perturb(llama, names=("lm_head", "q_proj", "embed_tokens"))
    ours = grads_of(llama, lambda: term(llama, inputs, forward(llama, inputs))[0])
    naive = grads_of(llama, lambda: naive_term(llama, base_logits, inputs, "all", 1.0))
    assert "lm_head.weight" in ours
    for name in naive:
        torch.testing.assert_close(ours[name], naive[name], rtol=1e-4, atol=1e-6)
    for name, value in term.reference.state_dict().items():  # the copy stayed the base
        assert torch.equal(value, base_state[name])


def test_gradient_checkpointing_keeps_the_hidden_states_post_norm_and_the_gradients(llama):
    inputs = batch(llama.config.vocab_size)
    model = lora(llama)
    perturb(model)
    term = KlToBase.build(
        KlToBaseConfig(weight=1.0, tokens="all", chunk_tokens=3), model, general_sources=set()
    )
    model.train()
    plain = grads_of(model, lambda: term(model, inputs, forward(model, inputs))[0])
    model.get_base_model().gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.enable_input_require_grads()
    outputs = forward(model, inputs)
    torch.testing.assert_close(model.get_output_embeddings()(outputs.hidden_states[-1]), outputs.logits)
    checkpointed = grads_of(model, lambda: term(model, inputs, forward(model, inputs))[0])
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_replay_tokens_without_source_ids_are_a_programming_error(llama):
    model = lora(llama)
    term = KlToBase.build(KlToBaseConfig(weight=1.0), model, general_sources={1})
    inputs = {k: v for k, v in batch(llama.config.vocab_size).items() if k != "source_ids"}
    with pytest.raises(ValueError, match="source_ids"):
        term(model, inputs, forward(model, inputs))


# --- refusals before any model loads -------------------------------------------------------------------


def test_config_refuses_negative_weight_temperature_and_chunk():
    kl = {"weight": -1, "temperature": 0, "chunk_tokens": 0}
    with pytest.raises(ConfigError) as e:
        build_config(Config, {"train": {"regularize": {"kl_to_base": kl}}})
    message = str(e.value)
    for field in ("weight", "temperature", "chunk_tokens"):
        assert f"train.regularize.kl_to_base.{field}" in message


def prepared_with(tmp_path, general_tokens: int | None = 100, source_index: bool = True) -> Prepared:
    sources = {"domain": {"role": "domain", "mixed_tokens": 500}}
    if general_tokens is not None:
        sources["general"] = {"role": "general", "mixed_tokens": general_tokens}
    manifest = {"sources": sources, "heldout": {}}
    if source_index:
        manifest["source_index"] = {name: i for i, name in enumerate(sources)}
    return Prepared(tmp_path, manifest)


def cfgs(model_dir, mode="lora", **kl):
    cfg = build_config(
        Config,
        {
            "run_dir": str(model_dir.parent / "run"),
            "model": {"name_or_path": str(model_dir)},
            "train": {"mode": mode, "regularize": {"kl_to_base": kl}},
        },
    )
    return cfg.train, cfg.model


@pytest.mark.parametrize(
    ("general_tokens", "source_index", "expected"),
    [(None, True, "no general source"), (0, True, "no general source"), (100, False, "prepare` again")],
)
def test_replay_tokens_need_a_training_general_source_with_source_ids(
    tmp_path, tiny_model_dir, general_tokens, source_index, expected
):
    prepared = prepared_with(tmp_path, general_tokens, source_index)
    with pytest.raises(CptkitError, match=expected) as e:
        check_regularizers(*cfgs(tiny_model_dir, weight=0.1), prepared)
    assert "train.regularize.kl_to_base.tokens" in str(e.value)
    check_regularizers(*cfgs(tiny_model_dir, weight=0.1, tokens="all"), prepared)  # all tokens: fine
    check_regularizers(*cfgs(tiny_model_dir, weight=0.0), prepared)  # off: nothing asked


def test_full_mode_refuses_a_reference_copy_the_gpu_cannot_hold(tmp_path, tiny_model_dir):
    prepared = prepared_with(tmp_path)
    train, model = cfgs(tiny_model_dir, mode="full", weight=0.1)
    with pytest.raises(CptkitError, match="regularizers' copies") as e:
        check_regularizers(train, model, prepared, gpu_memory=100_000)
    assert "kl_to_base" in str(e.value) and "train.mode: lora" in str(e.value)
    check_regularizers(train, model, prepared, gpu_memory=2**30)
    lora_train, _ = cfgs(tiny_model_dir, mode="lora", weight=0.1)
    check_regularizers(lora_train, model, prepared, gpu_memory=100_000)  # LoRA makes no copy


def test_every_regularizer_copy_and_the_ewc_fisher_count_against_the_gpu(tmp_path, tiny_model_dir):
    """Full mode: l2_to_base's and ewc's copies count as kl_to_base's does; LoRA: ewc's float32 Fisher."""
    prepared = prepared_with(tmp_path)
    for mode, name in (("full", "l2_to_base"), ("full", "ewc"), ("lora", "ewc")):
        train, model = cfgs(tiny_model_dir, mode=mode, weight=0.0)
        getattr(train.regularize, name).weight = 1.0
        with pytest.raises(CptkitError, match=rf"train.regularize.{name}: the regularizers' copies"):
            check_regularizers(train, model, prepared, gpu_memory=10_000)
        check_regularizers(train, model, prepared, gpu_memory=2**30)
    train, model = cfgs(tiny_model_dir, mode="lora", weight=0.0)
    train.regularize.l2_to_base.weight = 1.0
    check_regularizers(train, model, prepared, gpu_memory=10_000)  # LoRA's L2 reads the adapters only


def test_a_lora_adapted_lm_head_is_refused(tmp_path, tiny_model_dir):
    train, model = cfgs(tiny_model_dir, weight=0.1)
    train.lora.target_modules = ["q_proj", "lm_head"]
    with pytest.raises(CptkitError, match="lm_head"):
        check_regularizers(train, model, prepared_with(tmp_path))


def test_chunked_kl_computes_in_its_own_dtypes_under_autocast():
    hidden, weight = (t.float().detach().requires_grad_() for t in _leaves((6, 8), (40, 8)))
    base = hidden.detach() + 0.5
    plain = chunked_kl(hidden, weight, None, base, weight.detach(), None, 1.0, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = chunked_kl(hidden, weight, None, base, weight.detach(), None, 1.0, 4)
    assert autocast.dtype == torch.float32
    assert autocast.item() == pytest.approx(plain.item(), rel=1e-6)

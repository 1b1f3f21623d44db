"""`train.regularize.ewc`: a diagonal Fisher from general training rows, saved beside the run, and the
penalty it weighs the drift from the base with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cptkit.data.prepared import Prepared
from cptkit.errors import ConfigError, CptkitError
from cptkit.paths import EWC_FISHER
from cptkit.testing.regularize import (
    DOMAIN,
    GENERAL,
    SourceCollator,
    perturb_trainable,
    source_rows,
    tiny_train_config,
    train_regularized,
    value_and_grads,
)
from cptkit.train.collator import PackedCollator
from cptkit.train.ewc import check_ewc
from cptkit.train.losses import LossContext, build_loss_terms

NAMES = {DOMAIN: "domain", GENERAL: "general"}
VOCAB = 512


def _config(tmp_path, model_dir, mode="full", weight=1.0, fisher_rows=2, **more):
    regularize = {"ewc": {"weight": weight, "fisher_rows": fisher_rows}}
    return tiny_train_config(model_dir, tmp_path / "run", mode, regularize, **more)


def _model(cfg):
    from cptkit.model.load import load_model_and_tokenizer

    return load_model_and_tokenizer(cfg.model, cfg.train).model


def _ewc(cfg, rows, model, collator=None, resume_from=None):
    general = frozenset({GENERAL})
    context = LossContext(
        model, cfg.train.output_dir, NAMES, general, rows, collator or SourceCollator(), resume_from
    )
    terms = build_loss_terms(cfg.train, context)
    assert [t.name for t in terms] == ["causal_lm", "loss_per_source", "ewc"]
    return terms[-1]


def _saved_fisher(cfg):
    return load_file(str(Path(cfg.train.output_dir) / EWC_FISHER))


def _direct_fisher(model, rows, params, general_only=True):
    """Mean over the rows of the squared gradients of `params` (name -> tensor that requires grad), each
    row on its own, its labels kept on general tokens only (or on all)."""
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    model.eval()
    for row in rows:
        batch = SourceCollator()([row])
        source_ids = batch.pop("source_ids")
        if general_only:
            batch["labels"] = torch.where(source_ids == GENERAL, batch["labels"], -100)
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, p in params.items():
            sums[name] += p.grad.float().square()
    model.zero_grad(set_to_none=True)
    return {name: s / len(rows) for name, s in sums.items()}


def test_the_fisher_comes_from_the_general_tokens_of_general_training_rows(tmp_path, tiny_model_dir, caplog):
    rows = source_rows(VOCAB, 6, kinds=("domain", "mixed", "general"))
    cfg = _config(tmp_path, tiny_model_dir, fisher_rows=2)
    model = _model(cfg)
    model.train()
    with caplog.at_level("INFO", logger="cptkit.train.ewc"):
        term = _ewc(cfg, rows, model)
    assert "Fisher estimated on 2 general training rows in" in caplog.text
    assert "the frozen copy of the base weights" in caplog.text
    assert term.estimated and term.fisher_seconds > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    fisher = _saved_fisher(cfg)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert fisher.keys() == trained.keys()
    chosen = rows[1:3]  # row 0 holds no general token; the first two that do
    expected = _direct_fisher(model, chosen, trained)
    with_domain = _direct_fisher(model, chosen, trained, general_only=False)
    for name in trained:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-10)
    differs = sum(float((with_domain[n] - expected[n]).abs().sum()) for n in trained)
    assert differs > 0.05 * sum(float(expected[n].sum()) for n in trained)


def test_lora_fisher_of_the_base_weights_equals_their_gradients_squared(tmp_path, tiny_model_dir, caplog):
    """The hooks give each adapted base weight W the Fisher that gradients of W itself would give;
    the embeddings trained in full (modules_to_save) get their own."""
    from peft.tuners.lora import LoraLayer

    rows = source_rows(VOCAB, 4, kinds=("mixed", "general"))
    cfg = _config(tmp_path, tiny_model_dir, "lora", fisher_rows=3, lora={"train_embeddings": True})
    model = _model(cfg)
    with caplog.at_level("INFO", logger="cptkit.train.ewc"):
        _ewc(cfg, rows, model)
    assert "the Fisher of the adapted weights takes" in caplog.text
    fisher = _saved_fisher(cfg)
    adapted = {
        f"{name}.base_layer.weight": module.base_layer.weight
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert adapted and saved and fisher.keys() == adapted.keys() | saved.keys()
    for weight in adapted.values():
        weight.requires_grad_(True)
    expected = _direct_fisher(model, rows[:3], {**adapted, **saved})
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-10)


def test_the_fisher_is_saved_and_reused_and_estimated_again_for_other_settings(
    tmp_path, tiny_model_dir, caplog
):
    rows = source_rows(VOCAB, 6)
    cfg = _config(tmp_path, tiny_model_dir, fisher_rows=2)
    model = _model(cfg)
    assert _ewc(cfg, rows, model).estimated
    path = Path(cfg.train.output_dir) / EWC_FISHER
    written = path.stat().st_mtime_ns
    again = _ewc(cfg, rows, model, resume_from=str(tmp_path / "run" / "checkpoint-3"))
    assert not again.estimated and path.stat().st_mtime_ns == written
    assert again.fisher.keys() == _saved_fisher(cfg).keys()
    more = _config(tmp_path, tiny_model_dir, fisher_rows=3)
    with caplog.at_level("INFO", logger="cptkit.train.ewc"):
        assert _ewc(more, rows, model).estimated
    assert "estimated with other fisher_rows, rows, rows_sha256" in caplog.text
    assert not _ewc(more, rows, model).estimated


def test_a_full_mode_train_folder_with_its_fisher_reads_as_the_model_alone(tmp_path, tiny_model_dir):
    # merge and the eval sweep read every *.safetensors of an unindexed model folder
    import shutil

    from cptkit.merge.checkpoint import read_checkpoint
    from cptkit.train.checks import remove_run

    cfg = _config(tmp_path, tiny_model_dir)
    _ewc(cfg, source_rows(VOCAB, 4), _model(cfg))
    run = Path(cfg.train.output_dir)
    assert (run / EWC_FISHER).is_file()
    shutil.copytree(tiny_model_dir, run, dirs_exist_ok=True)  # the trained model as a full run saves it

    def weights(folder):
        return {
            k: (t.file.name, t.shape, t.dtype, t.start) for k, t in read_checkpoint(folder).tensors.items()
        }

    # every *.safetensors at the root is a weight file; the Fisher holds the same names as the weights
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["model.safetensors"]
    assert weights(run) == weights(tiny_model_dir)
    (run / "run_meta.json").write_text("{}")
    remove_run(run)  # the Fisher is the run's own file
    assert not (run / EWC_FISHER).exists() and not (run / EWC_FISHER).parent.exists()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_penalty_is_half_the_weight_times_the_normalised_fisher_times_squared_drift(
    tmp_path, tiny_model_dir, mode
):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    rows = source_rows(VOCAB, 4)
    cfg = _config(tmp_path, tiny_model_dir, mode, weight=3.0)
    model = _model(cfg)
    term = _ewc(cfg, rows, model)
    assert float(term(model, {}, {})[0]) == 0.0
    fisher = _saved_fisher(cfg)
    mean = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    perturb_trainable(model)
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())

    def naive():
        total = torch.zeros(())
        if mode == "full":
            for name, p in model.named_parameters():
                total = total + (fisher[name] * (p - base[name].detach()).square()).sum()
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                update = 2.0 * module.lora_B["default"].weight @ module.lora_A["default"].weight
                total = total + (fisher[f"{name}.base_layer.weight"] * update.square()).sum()
        return 3.0 / 2 * total / mean

    value, grads = value_and_grads(lambda: term(model, {}, {})[0], model)
    naive_value, naive_grads = value_and_grads(naive, model)
    assert value > 0
    torch.testing.assert_close(value, naive_value, rtol=1e-5, atol=1e-7)
    for name in grads:
        torch.testing.assert_close(grads[name], naive_grads[name], rtol=1e-4, atol=1e-7)


def test_training_with_ewc_logs_it_and_stays_closer_to_the_base_where_the_fisher_says(
    tmp_path, tiny_model_dir
):
    rows = source_rows(VOCAB, 16)
    plain_cfg = tiny_train_config(tiny_model_dir, tmp_path / "plain", max_steps=4)
    ewc_cfg = _config(tmp_path, tiny_model_dir, weight=50.0, fisher_rows=8, max_steps=4)
    plain, _, plain_lines = train_regularized(plain_cfg, rows)
    held, terms, lines = train_regularized(ewc_cfg, rows)
    term = terms[-1]
    assert all("loss/ewc" in line for line in lines) and "loss/ewc" not in plain_lines[0]
    assert lines[-1]["loss/ewc"] > 0
    base = dict(_model(plain_cfg).named_parameters())

    def weighted_distance(model):
        return sum(
            float((term.fisher[n] * (p.detach() - base[n].detach()).square()).sum())
            for n, p in model.named_parameters()
        )

    assert weighted_distance(held) < 0.5 * weighted_distance(plain)


def test_rows_without_source_ids_are_refused(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    with pytest.raises(CptkitError, match="do not record their sources"):
        rows = [{k: v for k, v in row.items() if k != "source_ids"} for row in source_rows(VOCAB, 2)]
        _ewc(cfg, rows, _model(cfg), collator=PackedCollator(0))


def _prepared(sources, index):
    """A manifest's sources as prepare records them: a source with a weight has tokens in the rows."""
    sources = {n: {**s, "mixed_tokens": 100 if s["weight"] > 0 else 0} for n, s in sources.items()}
    return Prepared(Path("run/data"), {"sources": sources, "source_index": index})


def test_check_ewc_refuses_a_dataset_without_general_training_rows(tmp_path, tiny_model_dir):
    train = _config(tmp_path, tiny_model_dir).train
    domain = {"role": "domain", "weight": 1.0}
    unmixed = {"role": "general", "weight": 0.0}
    for sources in ({"med": domain}, {"med": domain, "web": unmixed}):
        with pytest.raises(CptkitError, match="trains on no general source") as info:
            check_ewc(train, _prepared(sources, {"med": 0, "web": 1}))
        assert "train.regularize.ewc.weight" in str(info.value)
    mixed = {"med": domain, "web": {"role": "general", "weight": 0.2}}
    with pytest.raises(CptkitError, match="do not record which source"):
        check_ewc(train, _prepared(mixed, {}))
    check_ewc(train, _prepared(mixed, {"med": 0, "web": 1}))
    check_ewc(_config(tmp_path, tiny_model_dir, weight=0).train, _prepared({"med": domain}, {}))


@pytest.mark.parametrize(
    "regularize",
    [{"ewc": {"weight": 1.0}}, {"l2_to_base": {"weight": 1.0}}, {"kl_to_base": {"weight": 1.0}}],
)
def test_sharded_weights_are_refused_for_every_regularizer(tmp_path, tiny_model_dir, monkeypatch, regularize):
    from cptkit.train.checks import check_regularizers

    mixed = {"med": {"role": "domain", "weight": 1.0}, "web": {"role": "general", "weight": 0.2}}
    cfg = tiny_train_config(tiny_model_dir, tmp_path, regularize=regularize)
    prepared = _prepared(mixed, {"med": 0, "web": 1})
    check_regularizers(cfg.train, cfg.model, prepared, gpu_memory=2**40)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with FSDP sets
    with pytest.raises(
        CptkitError, match=f"train.regularize.{next(iter(regularize))}: the weights are sharded"
    ):
        check_regularizers(cfg.train, cfg.model, prepared, gpu_memory=2**40)


def test_preflight_refuses_ewc_on_a_dataset_with_no_general_source(tmp_path, tiny_model_dir, tiny_tokenizer):
    from cptkit.testing.stages import write_prepared
    from cptkit.testing.tiny import sample_texts
    from cptkit.train.checks import preflight

    folder = write_prepared(tmp_path / "data", {"web": ("general", sample_texts()[:4])}, tiny_tokenizer, 64)
    cfg = _config(tmp_path, tiny_model_dir)
    with pytest.raises(CptkitError, match="trains on no general source"):
        preflight(cfg.train, cfg.model, folder, cfg.train.output_dir)


def test_negative_weights_and_no_fisher_rows_are_refused_in_the_config(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, tiny_model_dir, weight=-0.5, fisher_rows=0)
    assert "train.regularize.ewc.weight: -0.5 is negative" in str(info.value)
    assert "train.regularize.ewc.fisher_rows: 0 is too small" in str(info.value)


def test_qlora_fisher_is_taken_on_the_4bit_base_weights_through_the_hooks(tmp_path, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer

    from cptkit.testing.tiny import make_tiny_llama

    # bitsandbytes' CPU 4-bit kernels need input features of at least one quantisation block (64)
    wider = make_tiny_llama(tmp_path / "wider", tokenizer=tiny_tokenizer, hidden_size=64)
    cfg = _config(tmp_path, wider, "qlora")
    model = _model(cfg)
    term = _ewc(cfg, source_rows(VOCAB, 2), model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert term.fisher.keys() == {f"{n}.base_layer.weight" for n in layers}
    for name, layer in layers.items():
        assert "4bit" in type(layer.base_layer).__name__
        shape = (layer.base_layer.out_features, layer.base_layer.in_features)
        assert term.fisher[f"{name}.base_layer.weight"].shape == shape
    perturb_trainable(model)
    value, grads = value_and_grads(lambda: term(model, {}, {})[0], model)
    assert value > 0 and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)

"""Training with the per-source loss and kl_to_base on CPU with a tiny Llama: the model never sees the
batch's source ids, each source's loss is logged on logging steps, and the KL term is logged and keeps
the adapted model nearer the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import make_cfg, write_dataset

from cptkit.data.prepared import Prepared


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer):
    return write_dataset(tmp_path_factory.mktemp("prepared"), tiny_tokenizer)


def train_records(folder: Path) -> list[dict]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["type"] == "train"]


def test_kl_to_base_is_logged_and_keeps_the_model_nearer_the_base(tmp_path, tiny_model_dir, prepared):
    """Two full fine-tuning runs (the base a frozen copy) on every labelled token: a weight so small
    that it does not pull (it only measures the divergence) and a strong one, which ends nearer the base."""
    from cptkit.commands import train

    def run(name: str, weight: float) -> list[dict]:
        cfg = make_cfg(tmp_path / name, tiny_model_dir, prepared, mode="full", max_steps=8)
        cfg.train.regularize.kl_to_base.weight = weight
        cfg.train.regularize.kl_to_base.tokens = "all"
        cfg.train.regularize.kl_to_base.chunk_tokens = 50
        train.run(cfg)
        return train_records(tmp_path / name)

    measured, pulled = run("measured", 1e-9), run("pulled", 100.0)
    for records, weight in ((measured, 1e-9), (pulled, 100.0)):
        assert [r["step"] for r in records] == list(range(1, 9))
        assert records[0]["regularize/kl_to_base"] == pytest.approx(0.0, abs=1e-7)  # the copy, at step 1
        for r in records:
            assert r["loss/kl_to_base"] == pytest.approx(
                weight * r["regularize/kl_to_base"], rel=1e-4, abs=1e-9
            )
    assert measured[-1]["regularize/kl_to_base"] > 1e-3
    assert pulled[-1]["regularize/kl_to_base"] < 0.5 * measured[-1]["regularize/kl_to_base"]


class SourceTagging:
    """The collator with per-token source ids added by hand, as prepared rows that record their sources
    give them: here by position (8 tokens domain 0, 8 general 1, ...), -1 on padding."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        batch = self.collator(rows)
        ids = (batch["position_ids"] // 8) % 2
        for i, row in enumerate(rows):
            ids[i, len(row["input_ids"]) :] = -1
        batch["source_ids"] = ids
        return batch


def test_source_ids_reach_the_terms_not_the_model(tmp_path, tiny_model_dir, prepared):
    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.train.build import build_trainer
    from cptkit.train.collator import PackedCollator

    cfg = make_cfg(tmp_path / "o", tiny_model_dir, prepared, mode="lora", max_steps=3)
    cfg.train.regularize.kl_to_base.weight = 1.0  # on replay tokens: source 1
    base = Prepared.load(prepared)
    tagged = Prepared(base.folder, {**base.manifest, "source_index": {"domain": 0, "general": 1}})
    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    seen: list[set[str]] = []
    loaded.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    collator = SourceTagging(PackedCollator(loaded.tokenizer.pad_token_id))
    trainer, _ = build_trainer(
        cfg.train,
        loaded,
        base.train_rows(),
        [],
        cfg.train.output_dir,
        data_collator=collator,
        prepared=tagged,
    )
    trainer.train()
    assert seen and not any("source_ids" in keys for keys in seen)
    # the terms read the final norm's output through a hook: the forward never keeps every layer's
    assert not any("output_hidden_states" in keys for keys in seen)
    records = train_records(tmp_path / "o")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        per_source = [r["loss/source/domain"], r["loss/source/general"]]
        assert min(per_source) <= r["loss/causal_lm"] <= max(per_source)  # the loss is their token mean
    assert records[0]["regularize/kl_to_base"] == 0.0  # LoRA's B = 0: the base itself
    assert all(r["regularize/kl_to_base"] > 0 for r in records[1:])


class StepRecorder:
    """A measuring term: records the step being computed each time the trainer calls it."""

    name = "recorder"
    logging_steps_only = True

    def __init__(self):
        self.trainer = None
        self.calls: list[int] = []

    def __call__(self, model, inputs, outputs):
        self.calls.append(self.trainer.state.global_step + 1)
        return outputs["loss"].new_zeros(()), {}


def test_measuring_terms_run_on_the_micro_batches_of_logging_steps_only(tmp_path, tiny_model_dir, prepared):
    from test_train import _trainer

    from cptkit.train.losses import CausalLMLoss

    recorder = StepRecorder()
    cfg = make_cfg(
        tmp_path / "o", tiny_model_dir, prepared, max_steps=5, logging_steps=2, gradient_accumulation_steps=2
    )
    trainer, _ = _trainer(cfg, [CausalLMLoss(), recorder])
    recorder.trainer = trainer
    trainer.train()
    assert recorder.calls == [2, 2, 4, 4]
    assert [r["step"] for r in train_records(tmp_path / "o")] == [2, 4]


def test_kl_on_replay_tokens_of_rows_without_sources_stops_before_the_model_loads(
    tmp_path, tiny_model_dir, prepared
):
    import shutil

    from cptkit.commands import train
    from cptkit.errors import CptkitError

    older = tmp_path / "older"  # prepared before rows recorded their source
    shutil.copytree(prepared, older)
    manifest = json.loads((older / "manifest.json").read_text())
    manifest.pop("source_index", None)
    (older / "manifest.json").write_text(json.dumps(manifest))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_model_dir.iterdir():  # a model that cannot load: the refusal must come first
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    cfg = make_cfg(tmp_path / "o", no_weights, older, mode="lora")
    cfg.train.regularize.kl_to_base.weight = 0.1
    with pytest.raises(CptkitError, match="prepare` again") as e:
        train.run(cfg)
    assert "train.regularize.kl_to_base.tokens" in str(e.value)
    assert not (tmp_path / "o" / "run_meta.json").exists()

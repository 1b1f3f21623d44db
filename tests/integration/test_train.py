"""`cptkit train` end to end on CPU with a tiny Llama: every mode trains, gradient accumulation and
resume reproduce the plain run, and each bad input stops with a clear message before the model loads."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cptkit.config import Config, build_config
from cptkit.errors import CptkitError
from cptkit.testing.tiny import sample_texts

SEQ = 64


def write_dataset(folder: Path, tokenizer, seq_length: int = SEQ, documents: int = 40) -> Path:
    """A dataset made by `cptkit prepare` from the first `documents` sample texts: a domain and a
    general source, each with its held-out set (inputs and tokenizer in a folder beside it)."""
    from cptkit.commands import prepare

    inputs = folder.parent / f"{folder.name}-inputs"
    tokenizer.save_pretrained(inputs / "tokenizer")
    texts = sample_texts()[:documents]
    sources = []
    for name, part in (("domain", texts[::2]), ("general", texts[1::2])):
        path = inputs / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in part), encoding="utf-8")
        sources.append({"name": name, "path": str(path), "role": name})
    data = {
        "tokenizer": str(inputs / "tokenizer"),
        "sources": sources,
        "output_dir": str(folder),
        "seq_length": seq_length,
        "heldout_fraction": 0.1,
        "num_proc": 1,
    }
    prepare.run(build_config(Config, {"data": data}))
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer):
    return write_dataset(tmp_path_factory.mktemp("prepared"), tiny_tokenizer)


def make_cfg(out: Path, model_dir, dataset, mode="full", **hf) -> Config:
    train = {
        "mode": mode,
        "dataset": str(dataset),
        "output_dir": str(out),
        "report_to": ["none"],
        "eval_steps": hf.pop("eval_steps", 1000),
        "eval_max_tokens": 300,
        "schedule": {"type": hf.pop("schedule", "cosine"), "warmup": 0.1},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **hf.pop("lora", {})},
        "gradient_checkpointing": hf.pop("gradient_checkpointing", False),
        "embedding_lr": hf.pop("embedding_lr", None),
        "hf": {
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "learning_rate": 3e-3,
            "logging_steps": 1,
            "save_steps": 1000,
            "dataloader_drop_last": True,
            **hf,
        },
    }
    return build_config(Config, {"model": {"name_or_path": str(model_dir)}, "train": train})


def losses(folder: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["type"] == "train"}


@pytest.fixture(scope="module")
def wider_model_dir(tmp_path_factory, tiny_tokenizer):
    """bitsandbytes' CPU 4-bit kernels need input features of at least one quantisation block (64)."""
    from cptkit.testing.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), tokenizer=tiny_tokenizer, hidden_size=64)


@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
def test_each_mode_trains_and_loss_falls(tmp_path, tiny_model_dir, wider_model_dir, prepared, mode):
    from cptkit.commands.train import run

    if mode == "qlora":
        pytest.importorskip("bitsandbytes")
        tiny_model_dir = wider_model_dir

    # a tiny random model's lm_head decides its loss: LoRA runs train it too (with its own learning rate)
    lora = {"train_embeddings": True, "embedding_lr": 3e-3}
    summary = run(
        make_cfg(
            tmp_path / "t",
            tiny_model_dir,
            prepared,
            mode=mode,
            learning_rate=3e-3,
            max_steps=12,
            schedule="constant",
            eval_steps=6,
            gradient_checkpointing=mode != "full",
            lora=lora,
        )
    )
    out = tmp_path / "t"
    steps = losses(out)
    assert len(steps) == 12
    first, last = sum(list(steps.values())[:3]) / 3, sum(list(steps.values())[-3:]) / 3
    assert last < first - 0.05, steps
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert {(e["step"], e["set"], e["role"]) for e in evals} >= {
        (0, "domain", "domain"),
        (12, "general", "general"),
    }
    assert all(e["perplexity"] > 1 and e["tokens"] > 0 and "bits_per_byte" in e for e in evals)
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["mode"] == mode and meta["attention"] == "sdpa"
    assert meta["versions"]["transformers"] and meta["dataset_manifest_hash"]
    assert (out / "config.yaml").is_file() and (out / "tokenizer.json").is_file()
    weights = "adapter_model.safetensors" if mode != "full" else "model.safetensors"
    assert (out / weights).is_file()
    assert summary["trained_tokens"] > 0 and summary["steps"] == 12


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_model_dir, prepared):
    from cptkit.commands.train import run

    run(
        make_cfg(
            tmp_path / "a",
            tiny_model_dir,
            prepared,
            max_steps=2,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
        )
    )
    run(
        make_cfg(
            tmp_path / "b",
            tiny_model_dir,
            prepared,
            max_steps=2,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=8,
        )
    )
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() == {1, 2}
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (a, b)
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=1e-4)


def test_resume_continues_at_the_same_data_position(tmp_path, tiny_model_dir, prepared):
    from cptkit.commands.train import run

    whole = tmp_path / "whole"
    run(make_cfg(whole, tiny_model_dir, prepared, mode="lora", max_steps=6, save_steps=3))
    # an interrupted run: only the first checkpoint made it to disk
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(whole / "checkpoint-3", part / "checkpoint-3")
    shutil.copy(whole / "run_meta.json", part / "run_meta.json")
    summary = run(make_cfg(part, tiny_model_dir, prepared, mode="lora", max_steps=6, save_steps=3))
    resumed, plain = losses(part), losses(whole)
    assert set(resumed) == {4, 5, 6}
    for step in resumed:
        assert abs(resumed[step] - plain[step]) < 1e-5, (resumed, plain)
    meta = json.loads((part / "run_meta.json").read_text())
    assert meta["resumed_from"].endswith("checkpoint-3")
    assert (
        summary["trained_tokens"]
        == json.loads((whole / "run_meta.json").read_text())["final"]["trained_tokens"]
    )


def test_overwrite_trains_anew_over_another_run(tmp_path, tiny_model_dir, prepared):
    """overwrite_output_dir removes the other run first: its checkpoint is not resumed (another
    adapter shape would not even load) and its metrics lines do not mix into the new ones."""
    from cptkit.commands.train import run

    out = tmp_path / "out"
    run(make_cfg(out, tiny_model_dir, prepared, mode="lora", max_steps=4, save_steps=2))
    assert (out / "checkpoint-4").is_dir()
    other = make_cfg(out, tiny_model_dir, prepared, mode="lora", max_steps=3, lora={"r": 4})
    with pytest.raises(CptkitError, match="holds another run"):
        run(other)
    other.train.overwrite_output_dir = True
    summary = run(other)
    assert summary["steps"] == 3 and set(losses(out)) == {1, 2, 3}
    assert not (out / "checkpoint-4").exists()
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["resumed_from"] is None
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4

    # a folder of someone else's files is written into, never emptied, and nothing in it is resumed
    mine = tmp_path / "mine"
    (mine / "checkpoint-9").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    cfg = make_cfg(mine, tiny_model_dir, prepared, mode="lora", max_steps=2)
    cfg.train.overwrite_output_dir = True
    assert run(cfg)["steps"] == 2 and (mine / "notes.txt").read_text() == "keep me"


def _error(cfg) -> str:
    from cptkit.commands.train import run

    with pytest.raises(CptkitError) as e:
        run(cfg)
    return str(e.value)


def test_bad_inputs_stop_before_the_model_loads(tmp_path, tiny_model_dir, prepared, monkeypatch):
    import json as _json

    assert "not a dataset made by `cptkit prepare`" in _error(
        make_cfg(tmp_path / "o1", tiny_model_dir, tmp_path)
    )
    assert "does not exist" in _error(make_cfg(tmp_path / "o2", tmp_path / "no-such-model", prepared))

    other = tmp_path / "other-tokenizer"
    shutil.copytree(prepared, other)
    manifest = _json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (other / "manifest.json").write_text(_json.dumps(manifest))
    assert "fingerprint" in _error(make_cfg(tmp_path / "o3", tiny_model_dir, other))

    manifest["tokenizer"] = _json.loads((prepared / "manifest.json").read_text())["tokenizer"]
    manifest["seq_length"] = 4096
    (other / "manifest.json").write_text(_json.dumps(manifest))
    assert "positions" in _error(make_cfg(tmp_path / "o4", tiny_model_dir, other))

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert "needs bitsandbytes" in _error(make_cfg(tmp_path / "o5", tiny_model_dir, prepared, mode="qlora"))
    monkeypatch.delitem(sys.modules, "bitsandbytes")

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone else's")
    assert "no cptkit train run wrote" in _error(make_cfg(busy, tiny_model_dir, prepared))
    (busy / "run_meta.json").write_text(_json.dumps({"identity": "another-run"}))
    assert "holds another run" in _error(make_cfg(busy, tiny_model_dir, prepared))


def test_nan_loss_stops_with_a_clear_message(tmp_path, tiny_model_dir, prepared):
    message = _error(
        make_cfg(
            tmp_path / "nan",
            tiny_model_dir,
            prepared,
            learning_rate=1e12,
            max_steps=6,
            schedule="constant",
            max_grad_norm=0.0,
        )
    )
    assert "training stopped" in message
    assert not (tmp_path / "nan" / "model.safetensors").exists()
    assert json.loads((tmp_path / "nan" / "run_meta.json").read_text())["status"] == "failed"


def _trainer(cfg: Config, loss_terms=None):
    """build_trainer on the configured model and the prepared rows, as `cptkit train` builds it."""
    from cptkit.data.prepared import Prepared
    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.train.build import build_trainer

    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    rows = Prepared.load(cfg.train.dataset).train_rows()
    return build_trainer(cfg.train, loaded, rows, [], cfg.train.output_dir, loss_terms=loss_terms)


def test_loss_through_the_terms_equals_the_models_loss_and_gradients(tmp_path, tiny_model_dir, prepared):
    trainer, _ = _trainer(make_cfg(tmp_path / "o", tiny_model_dir, prepared))
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    items = int((batch["labels"][:, 1:] != -100).sum())

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    model.train()
    seam, seam_grads = loss_and_grads(
        lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    )
    plain, plain_grads = loss_and_grads(lambda: model(**batch, num_items_in_batch=items).loss)
    assert seam == plain
    for a, b in zip(seam_grads, plain_grads, strict=True):
        assert torch.equal(a, b)


class ConstantTerm:
    """A toy regularizer: a constant half nat, to show that a term is summed and logged."""

    name = "constant"

    def __call__(self, model, inputs, outputs):
        value = torch.tensor(0.5)
        return value, {"loss/constant": value}


def test_a_second_loss_term_is_summed_into_the_loss_and_logged(tmp_path, tiny_model_dir, prepared):
    from cptkit.train.losses import CausalLMLoss

    def train(out, terms):
        cfg = make_cfg(out, tiny_model_dir, prepared, max_steps=3, gradient_accumulation_steps=2)
        trainer, _ = _trainer(cfg, terms)
        trainer.train()
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    plain = train(tmp_path / "plain", None)
    summed = train(tmp_path / "summed", [CausalLMLoss(), ConstantTerm()])
    assert [r["step"] for r in summed] == [1, 2, 3]
    for a, b in zip(plain, summed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"] + 0.5, abs=1e-5)
        assert b["loss/constant"] == pytest.approx(0.5)
        assert b["loss/causal_lm"] == pytest.approx(a["loss"], abs=1e-6) == pytest.approx(a["loss/causal_lm"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"])  # a constant moves no weight


def test_full_mode_trains_embeddings_and_lm_head_at_their_own_learning_rate(
    tmp_path, tiny_model_dir, prepared
):
    cfg = make_cfg(tmp_path / "o", tiny_model_dir, prepared, learning_rate=1e-3, embedding_lr=5e-2)
    trainer, _ = _trainer(cfg)
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(names[id(p)] for p in group["params"])
    assert set(by_lr) == {1e-3, 5e-2}
    assert by_lr[5e-2] and all("embed_tokens" in n or "lm_head" in n for n in by_lr[5e-2])
    assert not any("embed_tokens" in n or "lm_head" in n for n in by_lr[1e-3])


def test_heldout_sets_keep_whole_documents_and_count_their_bytes(prepared):
    from cptkit.data.prepared import Prepared
    from cptkit.train.heldout import load_heldout_sets

    data = Prepared.load(prepared)
    domain = data.heldout_set("domain")
    lengths, sizes = [len(ids) for ids in domain["input_ids"]], list(domain["num_bytes"])
    assert len(lengths) >= 2

    def domain_set(budget):
        return {s.name: s for s in load_heldout_sets(data, SEQ, budget)}["domain"]

    everything = domain_set(sum(lengths))
    assert (everything.num_documents, everything.num_bytes) == (len(lengths), sum(sizes))
    cut = domain_set(10)  # no document fits: the first one cut, and no bytes to divide by
    assert min(lengths) > 10
    assert cut.num_bytes is None and sum(len(r["input_ids"]) for r in cut.rows) == 10


def _train_lines(folder: Path) -> list[tuple]:
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], round(r["loss"], 5), r["learning_rate"]) for r in lines if r["type"] == "train"]


def test_a_killed_save_is_skipped_and_each_step_is_logged_once(tmp_path, tiny_model_dir, prepared, caplog):
    """A kill during the save of checkpoint-9 (some files written) and one just after checkpoint-8's
    folder was made: the rerun resumes from the whole checkpoint-6, says which it skipped, trains the
    same losses as an uninterrupted run, and metrics.jsonl holds each step once."""
    from cptkit.commands.train import run

    whole = tmp_path / "whole"
    run(make_cfg(whole, tiny_model_dir, prepared, mode="lora", max_steps=9, save_steps=3))
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(whole / "checkpoint-6", part / "checkpoint-6")
    (part / "checkpoint-8").mkdir()
    (part / "checkpoint-9").mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(whole / "checkpoint-9" / name, part / "checkpoint-9" / name)
    shutil.copy(whole / "run_meta.json", part / "run_meta.json")
    # the killed run had logged steps 7 to 9 (and half a line) after its last whole checkpoint
    logged = (whole / "metrics.jsonl").read_text()
    (part / "metrics.jsonl").write_text(logged + '{"type": "train", "step": 10, "lo')

    with caplog.at_level("WARNING", logger="cptkit.train.checks"):
        run(make_cfg(part, tiny_model_dir, prepared, mode="lora", max_steps=9, save_steps=3))
    skipped = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint-8" in skipped and "checkpoint-9" in skipped and "did not finish" in skipped
    meta = json.loads((part / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_from"].endswith("checkpoint-6")
    resumed, plain = losses(part), losses(whole)
    for step in (7, 8, 9):
        assert abs(resumed[step] - plain[step]) < 1e-5, (resumed, plain)
    lines = _train_lines(part)
    assert [s for s, *_ in lines] == list(range(1, 10))
    assert lines == _train_lines(whole)
    assert not (part / "checkpoint-8").exists()  # what the killed save left is gone
    assert (part / "checkpoint-9" / "cptkit_complete.json").is_file()


class FreezeAfter:
    """A toy failure: after `steps` optimizer steps the loss keeps its value but carries no gradient,
    as in a run that collapsed (grad norm exactly 0 from then on)."""

    name = "freeze"

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self, model, inputs, outputs):
        self.calls += 1
        zero = torch.zeros(())
        if self.calls > self.steps:
            zero = outputs["loss"].detach() - outputs["loss"]  # cancels the causal-LM gradient
        return zero, {}


def test_a_collapse_stops_at_the_last_good_checkpoint_and_a_lower_rate_continues_there(
    tmp_path, tiny_model_dir, prepared
):
    from cptkit.commands.train import run
    from cptkit.data.prepared import Prepared
    from cptkit.train.checks import run_identity
    from cptkit.train.fit import fit
    from cptkit.train.losses import CausalLMLoss
    from cptkit.train.schedules import lr_multiplier

    out = tmp_path / "out"
    cfg = make_cfg(out, tiny_model_dir, prepared, max_steps=10, save_steps=2)
    cfg.train.guard.patience = 3
    trainer, callbacks = _trainer(cfg, [CausalLMLoss(), FreezeAfter(4)])
    identity = run_identity(cfg.train, cfg.model, Prepared.load(prepared).manifest_hash)
    with pytest.raises(CptkitError) as stopped:
        fit(trainer, callbacks, out, {"identity": identity})
    message = str(stopped.value)
    # steps 5, 6, 7 had no gradient: stopped at 7; checkpoint-6 holds the frozen model
    assert "training stopped at step 7" in message and "grad norm was exactly 0" in message
    assert f"last good checkpoint is {out / 'checkpoint-4'}" in message and "checkpoint-6" in message
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "failed" and meta["diverged"]["since"] == 5
    assert meta["diverged"]["last_good_checkpoint"] == str(out / "checkpoint-4")
    assert (out / "checkpoint-6" / "cptkit_diverged.json").is_file()

    # the advice works: the same command at a lower rate continues from checkpoint-4, with that rate
    lower = make_cfg(out, tiny_model_dir, prepared, max_steps=10, save_steps=2, learning_rate=1e-3)
    assert run(lower)["steps"] == 10
    meta = json.loads((out / "run_meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_from"] == str(out / "checkpoint-4")
    lines = _train_lines(out)
    assert [s for s, *_ in lines] == list(range(1, 11))
    rates = {s: lr for s, _, lr in lines}  # step 5 trains at the schedule's value after 4 steps
    assert rates[5] == pytest.approx(1e-3 * lr_multiplier(4, lower.train.schedule, 10))
    assert (out / "diverged-checkpoint-6" / "cptkit_diverged.json").is_file()  # kept aside
    assert not (out / "checkpoint-6" / "cptkit_diverged.json").exists()


def test_the_guard_never_stops_a_healthy_run_from_random_weights(tmp_path, tiny_model_dir, prepared):
    """A random model starts at about ln(vocabulary size): the collapse rule must not take that for one."""
    from cptkit.commands.train import run

    cfg = make_cfg(tmp_path / "o", tiny_model_dir, prepared, max_steps=12, learning_rate=1e-4)
    cfg.train.guard.patience, cfg.train.guard.window = 2, 4
    assert run(cfg)["steps"] == 12

"""Which source every trained token came from: prepared rows carry one source id per packed segment,
the manifest names the ids (`source_index`), and the collator turns them into one id per token, so
training can tell replay tokens from domain tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cptkit.commands import prepare
from cptkit.config import Config, build_config
from cptkit.data.prepared import Prepared
from cptkit.errors import CptkitError
from cptkit.testing.tiny import sample_texts
from cptkit.train.collator import IGNORE_INDEX, PackedCollator, padded_batch


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    """Three sources of real text, no text shared between them."""
    paragraphs = list(dict.fromkeys(p.strip() for t in sample_texts() for p in t.split("\n\n")))
    paragraphs = [p for p in paragraphs if len(p) >= 80 and p.isascii()]
    return {"dom": paragraphs[:60], "gen": paragraphs[60:100], "held": paragraphs[100:130]}


def prepare_three(tmp_path, tokenizer_dir, texts, **data) -> Prepared:
    """`dom` (domain) and `gen` (general) train, `held` (general, weight 0) is held out only; `gen`
    comes first in the config, so ids follow the config's order, not the roles'."""
    settings = {"gen": {"role": "general"}, "dom": {}, "held": {"role": "general", "weight": 0}}
    sources = []
    for name, extra in settings.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[name]), encoding="utf-8")
        sources.append({"name": name, "path": str(path), **extra})
    d = {"tokenizer": str(tokenizer_dir), "seq_length": 64, "num_proc": 1, "sources": sources, **data}
    cfg = build_config(Config, {"run_dir": str(tmp_path / "run"), "data": d})
    prepare.run(cfg)
    return Prepared.load(cfg.stage_dir("prepare"))


@pytest.mark.parametrize(
    "settings",
    [
        {"chunking": "packing"},
        {"chunking": "tokens", "chunk_tokens": 24},
        {"chunking": "sentences", "chunk_tokens": 24},
        {"chunking": "chars", "chunk_chars": 120},
        {"mix": "upsample"},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_each_segment_names_the_source_it_came_from(
    tmp_path, tiny_tokenizer_dir, tiny_tokenizer, texts, settings
):
    prepared = prepare_three(tmp_path, tiny_tokenizer_dir, texts, **settings)
    assert prepared.source_index == {"gen": 0, "dom": 1, "held": 2}  # config order, held-out-only too
    assert prepared.general_source_ids == frozenset({0, 2}) and prepared.has_source_ids
    rows = prepared.train_rows()
    assert rows.column_names == ["input_ids", "position_ids", "source_ids"]
    joined = {name: "\n".join(texts[name]) for name in texts}
    names = {i: name for name, i in prepared.source_index.items()}
    tokens = dict.fromkeys(names.values(), 0)
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        assert len(row["source_ids"]) == len(starts) - 1
        for a, b, source in zip(starts, starts[1:], row["source_ids"], strict=False):
            text = tiny_tokenizer.decode(row["input_ids"][a:b], skip_special_tokens=True).strip()
            assert text in joined[names[source]]
            tokens[names[source]] += b - a
    assert tokens == {name: prepared.sources[name]["mixed_tokens"] for name in tokens}
    assert tokens["held"] == 0 and tokens["gen"] > 0 and tokens["dom"] > 0


@pytest.mark.parametrize("version", [1, 2])
def test_a_folder_prepared_before_the_token_store_is_refused(tmp_path, tiny_tokenizer_dir, texts, version):
    """Formats 1 (no source ids) and 2 (rows copied into an Arrow dataset) are prepared again."""
    prepared = prepare_three(tmp_path, tiny_tokenizer_dir, texts)
    old = tmp_path / "old"
    shutil.copytree(prepared.folder, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = version
    if version == 1:
        del manifest["source_index"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CptkitError) as e:
        Prepared.load(old)
    assert (
        str(e.value) == f"{old}: prepared by an older cptkit (format {version}): run cptkit prepare --force"
    )


def test_collator_gives_each_token_its_segments_source_and_padding_minus_one():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "position_ids": [0, 1, 2, 0, 1], "source_ids": [1, 0]},
        {"input_ids": [3, 4], "position_ids": [0, 1], "source_ids": [2]},
    ]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=4, max_length=8)(rows)
    assert batch["source_ids"].dtype == torch.long
    assert batch["source_ids"].tolist() == [[1, 1, 1, 0, 0, -1, -1, -1], [2, 2, -1, -1, -1, -1, -1, -1]]
    assert batch["source_ids"].shape == batch["input_ids"].shape
    assert batch["labels"][0].tolist()[:5] == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]  # unchanged


def test_rows_without_source_ids_sft_and_eval_rows_are_unchanged():
    sft = [{"input_ids": [5, 6, 7], "position_ids": [0, 1, 2], "labels": [-100, 6, 7]}]
    assert set(padded_batch(sft, 0, width=4)) == {"input_ids", "position_ids", "labels"}
    scored = [{"input_ids": [5, 6], "position_ids": [0, 1], "doc_index": [3, 3]}]
    assert set(padded_batch(scored, 0)) == {"input_ids", "position_ids", "labels", "doc_index"}


def test_source_ids_that_do_not_match_the_segments_are_refused():
    with pytest.raises(ValueError, match="2 segment start"):
        padded_batch([{"input_ids": [5, 6, 7], "position_ids": [0, 0, 1], "source_ids": [1]}], 0)
    with pytest.raises(ValueError, match="1 segment start"):
        padded_batch([{"input_ids": [5, 6], "position_ids": [0, 1], "source_ids": [1, 0]}], 0)


def test_source_ids_reach_the_collator_through_the_trainer(
    tmp_path, tiny_tokenizer_dir, tiny_model_dir, texts
):
    from cptkit.model.load import load_model_and_tokenizer
    from cptkit.train.build import build_trainer

    prepared = prepare_three(tmp_path, tiny_tokenizer_dir, texts)
    cfg = build_config(
        Config,
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "train": {
                "mode": "full",
                "dataset": str(prepared.folder),
                "output_dir": str(tmp_path / "train"),
                "report_to": ["none"],
                "hf": {"max_steps": 1, "per_device_train_batch_size": 4},
            },
        },
    )
    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    trainer, _ = build_trainer(cfg.train, loaded, prepared.train_rows(), [], tmp_path / "train")
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["source_ids"].shape == batch["input_ids"].shape
    real = batch["source_ids"][batch["labels"] != IGNORE_INDEX]
    assert set(real.tolist()) <= {0, 1} and len(real)  # trained sources only; -1 only where padded

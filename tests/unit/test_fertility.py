"""Fertility: words and spaceless-script characters counted while tokenizing, the manifest's entry from
them, and inspect and the report showing it (before -> after with a vocabulary extension)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from cptkit.commands import report
from cptkit.data.document import Document
from cptkit.data.fertility import SCRIPT_SAMPLE_CHARS, count_words, fertility
from cptkit.data.prepared import Prepared
from cptkit.data.shards import ShardStats
from cptkit.data.summary import print_summary
from cptkit.data.vocabulary_file import NewToken, Vocabulary, write_vocabulary
from cptkit.testing.stages import write_prepared

ENGLISH = [
    "The patient presented with acute hypertension.",
    "  Blood pressure was   measured twice a day.\n",
]
CHINESE = [
    "高血压是一种常见的慢性疾病。",
    "患者每天测量两次血压，医生调整了用药。",
    "中文文本的词之间没有空格。",
]


def test_counts_words_and_spaceless_characters():
    assert count_words(ENGLISH) == (6 + 7, 0, sum(map(len, ENGLISH)))
    han = sum(1 for t in CHINESE for c in t if "\u4e00" <= c <= "\u9fff")
    # one "word" per line: why words are not the unit there
    assert count_words(CHINESE) == (3, han, sum(map(len, CHINESE)))
    assert count_words(["日本語のテキスト", "ภาษาไทย", "한국어 문장"])[:2] == (4, 8 + 7)  # Hangul has spaces
    # the script is judged on each document's start; words are counted in all of it
    long = "word " * (SCRIPT_SAMPLE_CHARS // 5) + "中文" * 10 + " 高血压" * 3
    assert count_words([long]) == (SCRIPT_SAMPLE_CHARS // 5 + 1 + 3, 0, SCRIPT_SAMPLE_CHARS)
    assert count_words([long[-30:]])[1] == 18 + 9


def test_fertility_unit_follows_the_script():
    english = fertility(characters=1000, tokens=250, words=180, spaceless=0)
    assert english == {
        "tokens_per_1k_chars": 250.0,
        "tokens_per_word": pytest.approx(250 / 180, abs=1e-4),
        "tokens_per_char": 0.25,
        "unit": "word",
    }
    chinese = fertility(characters=1000, tokens=900, words=40, spaceless=800)
    assert chinese["unit"] == "character" and chinese["tokens_per_word"] is None
    assert chinese["tokens_per_char"] == 0.9 and chinese["tokens_per_1k_chars"] == 900.0
    sampled = fertility(characters=10_000, tokens=9000, words=40, spaceless=700, sampled=1000)
    assert sampled["unit"] == "character"  # the share is of the characters searched
    unknown = fertility(characters=1000, tokens=250, words=None, spaceless=None)  # an older stats file
    assert unknown["unit"] is None and unknown["tokens_per_word"] is None
    assert unknown["tokens_per_1k_chars"] == 250.0
    assert fertility(0, 0, 0, 0)["tokens_per_1k_chars"] is None


def test_older_stats_files_load_and_leave_words_unknown():
    new = ShardStats(read=2, kept=2, characters=10, tokens=4, words=3, spaceless=0, sampled=10)
    assert ShardStats.from_dict(json.loads(json.dumps(new.to_dict()))) == new
    old = new.to_dict()
    del old["words"], old["spaceless"], old["sampled"]
    total = ShardStats()
    total.add(new)
    assert (total.words, total.spaceless, total.sampled) == (3, 0, 10)
    total.add(ShardStats.from_dict(old))
    assert total.words is None and total.spaceless is None and total.tokens == 8


def test_batch_counts_the_kept_documents(tiny_tokenizer):
    from cptkit.data.chunk import CHUNKERS
    from cptkit.data.steps import Drop
    from cptkit.data.tokenize import Encoder
    from cptkit.data.workers import BatchProcessor

    def drop_short(text):
        return text if len(text) > 12 else Drop("too_short")

    docs = [Document(t, f"f:{i}") for i, t in enumerate([*ENGLISH, "two words", *CHINESE])]
    processor = BatchProcessor(Encoder(tiny_tokenizer), [drop_short], CHUNKERS["packing"](64))
    batch = processor(docs)
    assert batch.dropped.drops["too_short"] == 1
    assert (batch.words, batch.spaceless, batch.sampled) == count_words([*ENGLISH, *CHINESE])


@pytest.fixture
def prepared(tmp_path, tiny_tokenizer):
    """A real prepared folder of an English and a Chinese held-out set."""
    return write_prepared(
        tmp_path / "run" / "data",
        {"en": ("domain", ENGLISH * 3), "zh": ("general", CHINESE * 2)},
        tiny_tokenizer,
    )


def test_manifest_fertility_is_the_tokens_of_the_kept_text(prepared):
    p = Prepared.read(prepared)
    for name, unit in (("en", "word"), ("zh", "character")):
        held = p.heldout_set(name)
        tokens = sum(len(ids) for ids in held["input_ids"])
        chars = sum(len(t) for t in held["text"])
        f = p.sources[name]["fertility"]
        assert f["unit"] == unit
        assert f["tokens_per_1k_chars"] == pytest.approx(1000 * tokens / chars, abs=1e-3)
        assert f["tokens_per_char"] == pytest.approx(tokens / chars, abs=1e-5)
        if unit == "word":
            words = sum(len(t.split()) for t in held["text"])
            assert f["tokens_per_word"] == pytest.approx(tokens / words, abs=1e-4)
        else:
            assert f["tokens_per_word"] is None


def _inspect(manifest) -> str:
    out = io.StringIO()
    print_summary(manifest, Console(file=out, width=160))
    return out.getvalue()


def test_inspect_and_report_show_fertility_before_and_after(prepared):
    manifest = Prepared.read(prepared).manifest
    en = manifest["sources"]["en"]["fertility"]
    shown = _inspect(manifest)
    assert "fertility" in shown and f"{en['tokens_per_1k_chars']:,.1f}" in shown
    assert f"{en['tokens_per_word']:.3f}" in shown and "- (no spaces)" in shown
    assert "base -> extended" not in shown
    md = report.run(prepared.parent)["data"]
    text = (prepared.parent / "report" / "report.md").read_text()
    assert "### Fertility" in text and f"{en['tokens_per_1k_chars']:.1f}" in text
    assert "base -> extended" not in text and "vocabulary" not in md

    before_after = {"en": {"before": 250.0, "after": 200.0}, "zh": {"before": 900.0, "after": 810.0}}
    shown = _inspect(manifest | {"vocabulary": {"added": 2, "fertility": before_after}})
    assert "250.0 -> 200.0 (-20.0%)" in shown and "900.0 -> 810.0 (-10.0%)" in shown
    token = NewToken(id=512, token="Ġhyp", text=" hyp", pieces=(1, 2), count=9, saved=9)
    write_vocabulary(prepared, Vocabulary("base", "fp0", 512, 513, "fp1", [token], fertility=before_after))
    saved = report.run(prepared.parent)["data"]["vocabulary"]
    assert saved["added"] == 1 and saved["fertility"] == before_after
    text = (prepared.parent / "report" / "report.md").read_text()
    assert "250.0 -> 200.0 (-20.0%)" in text and "extended by 1 tokens (512 -> 513)" in text


def test_an_old_manifest_without_fertility_still_inspects_and_reports(prepared):
    path = prepared / "manifest.json"
    manifest = json.loads(path.read_text())
    for s in manifest["sources"].values():
        del s["fertility"]
    path.write_text(json.dumps(manifest))
    shown = _inspect(manifest)
    assert "sources (chunking" in shown and "fertility" not in shown
    report.run(prepared.parent)
    assert "Fertility" not in (prepared.parent / "report" / "report.md").read_text()

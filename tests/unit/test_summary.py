"""The prepare summary stays readable with many sources, and says when the mix dropped most of the data."""

from __future__ import annotations

import io

from rich.console import Console

from cptkit.data.mix import mix_warning
from cptkit.data.summary import print_summary


def manifest(num_sources: int, mix: str = "upsample", tokens: int = 1_234_567) -> dict:
    sources, heldout = {}, {}
    for i in range(num_sources):
        name = f"source-number-{i}"
        sources[name] = {
            "role": "domain" if i % 2 else "general",
            "weight": 1.0,
            "read": 98_765 + i,
            "documents": 87_654 + i,
            "drops": {"too_short": 11_111 + i},
            "duplicates": 2_222 + i,
            "tokens": tokens + i,
            "heldout_documents": 333 + i,
            "heldout_tokens": 44_444 + i,
            "train_tokens": tokens - 44_444,
            "sampling_factor": 0.123456,
            "mixed_tokens": 555_555 + i,
            "mixed_share": 0.125,
        }
        heldout[name] = {
            "role": "domain",
            "dir": f"heldout/{name}",
            "documents": 333,
            "tokens": 44_444,
            "bytes": 9,
        }
    return {
        "chunking": "packing",
        "seq_length": 2048,
        "mix": mix,
        "train_dir": "train",
        "tokenizer": {"name_or_path": "tok", "vocab_size": 32_000, "fingerprint": "abc"},
        "sources": sources,
        "heldout": heldout,
        "totals": {"rows": 10, "trained_tokens": 20_480, "padding_tokens": 0, "packing_efficiency": 1.0},
    }


def printed(m: dict, width: int = 80) -> str:
    out = io.StringIO()
    print_summary(m, Console(file=out, width=width, color_system=None))
    return out.getvalue()


def test_eight_sources_at_80_columns_show_every_number_whole():
    m = manifest(8)
    text = printed(m)
    assert "…" not in text
    for name, s in m["sources"].items():
        assert name in text
        for key in (
            "read",
            "documents",
            "duplicates",
            "tokens",
            "heldout_documents",
            "heldout_tokens",
            "mixed_tokens",
        ):
            assert f"{s[key]:,}" in text, (name, key)
        assert f"{s['drops']['too_short']:,}" in text
    assert "0.1235" in text and "12.50%" in text


def test_a_few_sources_keep_one_column_each():
    text = printed(manifest(3))
    header = next(line for line in text.splitlines() if "source-number-0" in line)
    assert "source-number-1" in header and "…" not in text


def test_downsample_that_drops_most_tokens_is_warned_with_the_settings_that_keep_them():
    warning = mix_warning(
        {"big": 157_400, "small": 10_600},
        {"big": 5_300, "small": 5_300},
        {"big": 1.0, "small": 1.0},
        "downsample",
    )
    assert warning.startswith("the mix keeps 10,600 of 168,000 training tokens (6.3%)")
    assert "data.mix: upsample" in warning and "big: 0.937, small: 0.0631" in warning
    assert mix_warning({"a": 100, "b": 100}, {"a": 60, "b": 40}, {"a": 0.6, "b": 0.4}, "downsample") is None
    assert mix_warning({"a": 100, "b": 10}, {"a": 100, "b": 100}, {"a": 1, "b": 1}, "upsample") is None


def test_the_summary_repeats_the_mix_warning():
    m = manifest(2, mix="downsample")
    for s in m["sources"].values():
        s["mixed_tokens"] = 1_000
    text = " ".join(printed(m, width=200).split())
    assert "warning: the mix keeps 2,000 of" in text and "set data.mix: upsample" in text
    assert "warning" not in printed(manifest(2, mix="upsample"))

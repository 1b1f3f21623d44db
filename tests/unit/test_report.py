"""cptkit report: report.md, report.json and PNG plots hold the run's numbers; missing parts are named."""

from __future__ import annotations

import json

import pytest

from cptkit.commands import report
from cptkit.errors import CptkitError
from cptkit.testing.stages import write_metrics, write_prepared

RESULTS = {
    "results": [
        {
            "model": m,
            "set": s,
            "role": r,
            "loss": loss,
            "perplexity": 2.718281828**loss,
            "bits_per_byte": loss / 3,
            "tokens": 1000,
            "bytes": 4000,
            "documents": 10,
        }
        for m, s, r, loss in [
            ("base", "sql", "domain", 2.0),
            ("base", "bible", "general", 1.5),
            ("adapted", "sql", "domain", 1.6),
            ("adapted", "bible", "general", 1.55),
        ]
    ],
}
RESULTS["deltas"] = [
    {
        "model": "adapted",
        "set": "sql",
        "role": "domain",
        "loss_delta": -0.4,
        "perplexity_before": 7.389,
        "perplexity_after": 4.953,
        "bpb_delta": -0.133,
    },
    {
        "model": "adapted",
        "set": "bible",
        "role": "general",
        "loss_delta": 0.05,
        "perplexity_before": 4.482,
        "perplexity_after": 4.711,
        "bpb_delta": 0.0167,
    },
]


def test_full_run_report_holds_every_number(tmp_path, tiny_tokenizer):
    run = tmp_path / "run"
    write_prepared(
        run / "data",
        {"sql": ("domain", ["SELECT * FROM t;"] * 2 + [" "]), "bible": ("general", ["In the beginning"])},
        tiny_tokenizer,
    )
    write_metrics(run / "train", steps=20, sets={"sql": "domain", "bible": "general"})
    (run / "eval").mkdir()
    (run / "eval/results.json").write_text(json.dumps(RESULTS))
    out = report.run(run)
    folder = run / "report"
    for name in (
        "report.md",
        "report.json",
        "training.png",
        "heldout.png",
        "throughput.png",
        "perplexity.png",
    ):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, name
    saved = json.loads((folder / "report.json").read_text())
    assert saved["missing"] == [] and saved["plots"] == out["plots"]
    last = [json.loads(x) for x in (run / "train/metrics.jsonl").read_text().splitlines() if '"train"' in x][
        -1
    ]
    assert saved["train"]["final_loss"] == pytest.approx(last["loss"]) and saved["train"]["final_step"] == 20
    assert saved["train"]["heldout"]["sql"]["loss"][-1] == pytest.approx(2.0 - 0.02 * 20)
    assert saved["eval"]["results"] == RESULTS["results"]
    manifest = json.loads((run / "data/manifest.json").read_text())
    assert saved["data"]["sources"]["sql"]["tokens"] == manifest["sources"]["sql"]["tokens"]
    assert sum(s["mix_share"] for s in saved["data"]["sources"].values()) == pytest.approx(1.0)
    md = (folder / "report.md").read_text()
    assert "7.389 -> 4.953" in md and "gain" in md and "4.482 -> 4.711" in md and "forgetting" in md
    assert "![perplexity](perplexity.png)" in md and "| sql | domain |" in md and "empty 1" in md


def test_partial_run_reports_what_exists_and_names_what_is_missing(tmp_path):
    run = tmp_path / "run"
    write_metrics(run / "train", steps=6)
    out = report.run(run)
    assert "train" in out and "data" not in out and "eval" not in out
    assert any("cptkit prepare" in m for m in out["missing"]) and any(
        "cptkit eval" in m for m in out["missing"]
    )
    assert set(out["plots"]) == {"training", "heldout", "throughput"}
    assert "## Missing" in (run / "report/report.md").read_text()


def test_empty_run_folder_is_an_error(tmp_path):
    with pytest.raises(CptkitError, match="nothing to report"):
        report.run(tmp_path)
    with pytest.raises(CptkitError, match="no such run folder"):
        report.run(tmp_path / "absent")

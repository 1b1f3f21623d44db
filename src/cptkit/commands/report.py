"""`cptkit report RUN_DIR`: report.md, report.json and PNG plots from whatever stages the run has done."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.eval import plots
from cptkit.eval.report import gather, markdown
from cptkit.outputs import now, write_json

log = logging.getLogger(__name__)


def main(args) -> int:
    run(args.run_dir)
    return 0


def run(run_dir: str | Path) -> dict[str, Any]:
    """Write RUN_DIR/report/{report.md, report.json, *.png}; returns report.json's content."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CptkitError(f"{run_dir}: no such run folder")
    report = gather(run_dir)
    if not any(k in report for k in ("data", "train", "eval")):
        raise CptkitError(
            f"{run_dir}: nothing to report: no data/manifest.json, train/metrics.jsonl or eval/results.json"
        )
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    if "train" in report:
        made["training"] = plots.training(report["train"], out)
        made["heldout"] = plots.heldout(report["train"], out)
        made["throughput"] = plots.throughput(report["train"], out)
    if "eval" in report:
        made["perplexity"] = plots.perplexity(report["eval"]["results"], out)
    report["plots"] = {k: v for k, v in made.items() if v}
    report["created"] = now()
    write_json(out / "report.json", report)
    (out / "report.md").write_text(markdown(report, report["plots"]), encoding="utf-8")
    log.info(
        "report in %s (%d plots%s)",
        out,
        len(report["plots"]),
        f"; missing: {'; '.join(report['missing'])}" if report["missing"] else "",
    )
    return report

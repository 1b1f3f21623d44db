"""`cptkit report CONFIG.yaml [overrides]` or `cptkit report RUN_DIR`: report.md, report.json and PNG plots
from whatever stages the run has done. A config says where each stage wrote (`cptkit.paths.resolve`); a
run folder is read through the paths its stages recorded in their config.yaml, else its default layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.eval import plots
from cptkit.eval.report import gather, markdown
from cptkit.outputs import now, write_json
from cptkit.paths import REPORT_JSON, REPORT_MD, Paths, resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    run(_paths_of(args))
    return 0


def _paths_of(args) -> Paths:
    """A run folder (no overrides) as its stages recorded it, else the config file's resolved paths."""
    where = Path(args.config)
    if where.is_dir():
        if args.overrides:
            raise CptkitError(f"{args.config}: overrides need a config file, not a run folder")
        return Paths.of_run_dir(args.config)
    if not where.exists() and where.suffix not in (".yaml", ".yml"):
        raise CptkitError(f"{args.config}: no such run folder or config file")
    from cptkit.commands import load_for

    cfg = load_for(args)
    if cfg.run_dir is None:
        raise CptkitError(f"{args.config}: run_dir is not set; the report goes into RUN_DIR/report")
    return resolve(cfg)


def run(where: Paths | str | Path) -> dict[str, Any]:
    """Write the report folder's report.md, report.json and *.png; returns report.json's content.
    `where` is a run's resolved `Paths`, or a run folder."""
    paths = where if isinstance(where, Paths) else Paths.of_run_dir(where)
    if paths.run_dir is None or not paths.run_dir.is_dir():
        raise CptkitError(f"{paths.run_dir}: no such run folder (the report goes into RUN_DIR/report)")
    report = gather(paths)
    # a stage run alone (`cptkit sft`, `cptkit grpo`, `cptkit export` with a model section) is reportable
    if not any(k in report for k in ("data", "train", "eval", "sft", "grpo", "export")):
        raise CptkitError(
            f"{paths.run_dir}: nothing to report: no {paths.manifest}, {paths.train_metrics}, "
            f"{paths.eval_results}, nor an sft, grpo or export folder"
        )
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    if "train" in report:
        made["training"] = plots.training(report["train"], out)
        made["heldout"] = plots.heldout(report["train"], out)
        made["throughput"] = plots.throughput(report["train"], out)
    if "eval" in report:
        made["perplexity"] = plots.perplexity(report["eval"]["results"], out)
        made["tradeoff"] = plots.tradeoff(report["eval"].get("interpolation"), out)
    if "grpo" in report:
        made["grpo"] = plots.grpo(report["grpo"], out)
    report["plots"] = {k: v for k, v in made.items() if v}
    report["created"] = now()
    write_json(out / REPORT_JSON, report)
    (out / REPORT_MD).write_text(markdown(report, report["plots"]), encoding="utf-8")
    log.info(
        "report in %s (%d plots%s)",
        out,
        len(report["plots"]),
        f"; missing: {'; '.join(report['missing'])}" if report["missing"] else "",
    )
    return report

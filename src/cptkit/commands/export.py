"""`cptkit export CONFIG.yaml|MODEL_DIR [--to gguf] [--type f16|bf16|q8_0] [--output FILE]`: the final model
(or an adapter, merged into its base on the way) as one GGUF file for llama.cpp, with the tokenizer in its
metadata; checked by loading it back with transformers' GGUF loader (and llama-cpp-python where installed)
and comparing logits with the HF model. Writes `<name>.<type>.gguf` and export_report.json beside it."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.export import GGUF_TYPES, ExportConfig
from cptkit.errors import CptkitError
from cptkit.paths import EXPORT_REPORT, resolve

log = logging.getLogger(__name__)


def main(args) -> int:
    options = {k: v for k, v in (("to", args.to), ("type", args.type)) if v is not None}
    output = Path(args.output) if args.output else None
    if Path(args.config).is_dir():  # a model folder, no config
        ec = dataclasses.replace(ExportConfig(), **options)
        folder = Path(args.config)
        output = output or folder.parent / f"{folder.name}-gguf" / f"{folder.name}.{ec.type}.gguf"
        export(str(folder), ec, output, dataset=None, where=str(folder))
        return 0
    from cptkit.commands import load_for

    cfg = load_for(args)
    cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export or ExportConfig(), **options))
    run(cfg, output)
    return 0


def run(cfg: Config, output: Path | None = None) -> dict[str, Any]:
    """Export `resolve(cfg).export_source` as the config's export section says; returns export_report.json."""
    ec = cfg.export or ExportConfig()
    paths = resolve(cfg)
    source = paths.export_source
    name = Path(source).name if source else "model"
    output = output or paths.folder("export") / f"{name}.{ec.type}.gguf"
    base = cfg.model.name_or_path if cfg.model else None
    return export(source, ec, output, dataset=paths.eval_dataset, where="export", base=base)


def export(
    source: str | None,
    ec: ExportConfig,
    output: Path,
    dataset: str | Path | None,
    where: str,
    base: str | None = None,
) -> dict[str, Any]:
    """Check, (merge,) write, verify, report."""
    from cptkit.export.llama_cpp import llama_cpp_check
    from cptkit.export.source import check_architecture, check_source, full_model_folder
    from cptkit.export.verify import verify_gguf
    from cptkit.export.writer import write_gguf
    from cptkit.outputs import now, versions, write_json

    if ec.to != "gguf":
        raise CptkitError(f"{where}: export.to {ec.to!r}: only gguf is supported")
    if ec.type not in GGUF_TYPES:
        raise CptkitError(f"{where}: export.type {ec.type!r}: one of {', '.join(GGUF_TYPES)}")
    check_source(source, where)
    check_architecture(source, where, base)
    with full_model_folder(source, output.parent / f".{output.name}.merge", base) as folder:
        report = write_gguf(folder, output, ec.type, name=Path(source).name)
        report["source"] = str(source)
        log.info(
            "export: %s -> %s (%.1f MB, %.1f s)", source, output, report["bytes"] / 1e6, report["seconds"]
        )
        report["verify"], report["llama_cpp"] = None, None
        if ec.verify:
            report["verify"], text, ids, reference = verify_gguf(
                folder, output, ec.type, dataset, ec.verify_tokens
            )
            report["llama_cpp"] = llama_cpp_check(output, text, ids, reference, ec.type)
            _log_check(report)
    report = {"created": now(), **report, "versions": versions()}
    write_json(output.parent / EXPORT_REPORT, report)
    if report["verify"] is not None and not report["verify"]["passed"]:
        raise CptkitError(
            f"{output}: the GGUF round trip is off: {json.dumps(report['verify'])}; the file is kept for "
            f"inspection, see {output.parent / EXPORT_REPORT}"
        )
    if report["llama_cpp"] is not None and not report["llama_cpp"]["passed"]:
        c = report["llama_cpp"]
        said = c.get("error") or (
            f"top-1 agreement {c['top1_agreement']:.1%} (at least {c['top1_bar']:.0%} expected), "
            f"tokenizer ids {'equal' if c['tokenizer_ids_equal'] else 'different'}"
        )
        raise CptkitError(
            f"{output}: transformers reads the file back, but llama.cpp does not agree: {said}; the file is "
            f"kept for inspection, see {output.parent / EXPORT_REPORT}"
        )
    return report


def _log_check(report: dict[str, Any]) -> None:
    v = report["verify"]
    log.info(
        "export verify (%s tokens): max |dlogit| %.3g (relative %.3g, tolerance %.3g), top-1 %.1f%%, "
        "tokenizer ids %s",
        v["tokens"],
        v["max_abs_logit_diff"],
        v["relative_max_diff"],
        v["tolerance"],
        100 * v["top1_agreement"],
        "equal" if v["tokenizer_ids_equal"] else "DIFFERENT",
    )
    c = report["llama_cpp"]
    if c and "error" in c:
        log.error("llama.cpp: %s", c["error"])
    elif c:
        log.info(
            "llama.cpp: max |dlogit| %.3g, top-1 %.1f%%", c["max_abs_logit_diff"], 100 * c["top1_agreement"]
        )

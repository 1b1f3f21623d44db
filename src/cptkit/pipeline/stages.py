"""The stages `cptkit run` chains, each described once: when the config asks for it, what it reads
(config sections and input files, for its stamp), the file that says it finished, how to run it, and
a one-line account of what it did."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit.config import Config
from cptkit.config.evaluate import EvalConfig, EvalModel
from cptkit.paths import resolve


@dataclass
class Stage:
    name: str
    why_not: Callable[[Config], str | None]  # None when the config asks for this stage, else the reason
    sections: Callable[[Config], dict[str, Any]]  # config the stage depends on
    inputs: Callable[[Config], list[Path | str]]  # files and folders it reads
    marker: Callable[[Config], Path]  # the file that exists once it finished
    run: Callable[[Config], dict[str, Any]]
    describe: Callable[[dict[str, Any]], str]
    # a folder the stage would resume from: emptied before the stage reruns for other settings
    resumes_from: Callable[[Config], Path] | None = None


def _files(*paths: Path | None) -> list[Path]:
    """The input files a stage reads, leaving out those of stages with no output folder."""
    return [p for p in paths if p is not None]


# the stages' entry points, imported when they run so `cptkit run --help` stays instant
def _prepare(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import prepare

    return prepare.run(cfg)


def _train(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import train

    return train.run(cfg)


def _merge(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import merge

    return merge.run(cfg)


def _eval(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import eval as evaluate

    return evaluate.run(cfg)


def _report(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import report

    paths = resolve(cfg)
    return {**report.run(paths), "path": str(paths.report_md)}


def _sft(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import sft

    return sft.run(cfg)


def _export(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import export

    return export.run(cfg)


def sft_eval_config(cfg: Config) -> Config:
    """The eval section pointed at the SFT model: base, the CPT model it started from, and the SFT model.
    No interpolation sweep: `eval.interpolate` is between the base and the CPT model (`adapted`), which
    the CPT eval stage runs; here it would find no `adapted` model and refuse."""
    from cptkit.commands.sft import sft_base_model

    paths = resolve(cfg)
    base = cfg.model.name_or_path if cfg.model else None
    start = sft_base_model(cfg)
    out = str(paths.sft)
    sft_model = (
        EvalModel(name="sft", path=start, adapter=out) if cfg.sft.mode != "full" else EvalModel("sft", out)
    )
    models = [EvalModel(name="base", path=base)] if base else []
    if start != base:
        models.append(EvalModel(name="cpt", path=start))
    models.append(sft_model)
    ec = dataclasses.replace(
        cfg.eval or EvalConfig(), models=models, output_dir=str(paths.sft_eval), interpolate=[]
    )
    return dataclasses.replace(cfg, eval=ec)


def _sft_eval(cfg: Config) -> dict[str, Any]:
    return _eval(sft_eval_config(cfg))


def _grpo(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import grpo

    return grpo.run(cfg)


def _grpo_inputs(cfg: Config) -> list[Path | str]:
    """The prompt files, and the marker of the stage whose model GRPO starts from (SFT's run_meta, or
    the merge report / trained run's meta when there is no sft section)."""
    p = resolve(cfg)
    files = [cfg.grpo.prompts, *([cfg.grpo.heldout_prompts] if cfg.grpo.heldout_prompts else [])]
    if cfg.grpo.model:
        return files
    start = [p.sft_meta] if cfg.sft is not None else [p.merge_report, p.train_meta]
    return [*files, *_files(*start)]


# one-line accounts
def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "?"


def describe_prepare(manifest: dict[str, Any]) -> str:
    t = manifest["totals"]  # prepare returns the manifest it wrote
    return f"{t['rows']} rows, {t['trained_tokens']} tokens, packing {_fmt(t['packing_efficiency'], '.1%')}"


def describe_train(s: dict[str, Any]) -> str:
    return (
        f"{s.get('steps', '?')} steps, loss {_fmt(s.get('train_loss'))}, "
        f"{_fmt(s.get('tokens_per_second'), '.0f')} tokens/s"
    )


def describe_grpo(s: dict[str, Any]) -> str:
    before, after = s.get("heldout_reward_before"), s.get("heldout_reward_after")
    return f"{s.get('steps', '?')} steps, held-out reward {_fmt(before)} -> {_fmt(after)}"


def describe_eval(r: dict[str, Any]) -> str:
    from cptkit.eval.tradeoff import is_point

    last = {}
    for d in r.get("deltas", []):  # the last model listed (merged, or sft) on each set
        if not is_point(d["model"]):
            last[d["set"]] = d
    parts = [
        f"{s} ({d['role']}) ppl {d['perplexity_before']:.2f} -> {d['perplexity_after']:.2f}"
        for s, d in last.items()
    ]
    return "; ".join(parts) or f"{len(r.get('results', []))} results"


def _merge_why_not(cfg: Config) -> str | None:
    if cfg.merge is None:
        return "no merge section"
    if cfg.train and cfg.train.mode == "full" and cfg.merge.scale == 1:
        return "train.mode is full: nothing to merge (merge.scale below 1 writes a model toward the base)"
    return None


def _prepare_inputs(cfg: Config) -> list[str]:
    from cptkit.data.self_replay import source_inputs

    base = cfg.model.name_or_path if cfg.model else None
    return [p for s in cfg.data.sources for p in source_inputs(s, base)]


def _report_why_not(cfg: Config) -> str | None:
    if cfg.run_dir and (cfg.data or cfg.train or cfg.eval or cfg.sft or cfg.grpo or cfg.export):
        return None
    return "needs run_dir and a data, train, eval, sft, grpo or export section"


def _report_inputs(cfg: Config) -> list[Path]:
    p = resolve(cfg)
    return _files(
        p.manifest,
        p.train_meta,
        p.merge_report,
        p.eval_results,
        p.sft_meta,
        p.sft_eval_results,
        p.grpo_meta,
        p.grpo_scores,
        p.export_report,
    )


def _describe_merge(r: dict[str, Any]) -> str:
    if r.get("mode") == "full":
        return f"full model moved toward the base: {r.get('why')}"
    return f"{r.get('mode', '?')} adapter merged, kept the {r.get('kept', '?')} variant"


STAGES: list[Stage] = [
    Stage(
        name="prepare",
        why_not=lambda c: None if c.data else "no data section",
        sections=lambda c: {"data": c.data},
        inputs=_prepare_inputs,
        marker=lambda c: resolve(c).data_manifest,
        run=_prepare,
        describe=describe_prepare,
    ),
    Stage(
        name="train",
        why_not=lambda c: None if c.train and c.model else "no train (and model) section",
        sections=lambda c: {"seed": c.seed, "model": c.model, "train": c.train},
        inputs=lambda c: _files(resolve(c).manifest),
        marker=lambda c: resolve(c).train_meta,
        run=_train,
        describe=describe_train,
        resumes_from=lambda c: resolve(c).train,
    ),
    Stage(
        name="merge",
        why_not=_merge_why_not,
        sections=lambda c: {"model": c.model, "merge": c.merge},
        inputs=lambda c: [resolve(c).train_meta],
        marker=lambda c: resolve(c).merge_report,
        run=_merge,
        describe=_describe_merge,
    ),
    Stage(
        name="eval",
        why_not=lambda c: None if c.eval is not None else "no eval section",
        sections=lambda c: {
            "model": c.model,
            "eval": c.eval,
            "seq_length": c.data.seq_length if c.data else None,
            # the sweep's best point is chosen within the budget; the probe renders as sft does
            "forgetting_budget": c.train.forgetting_budget if c.train else None,
            "sft": c.sft,
        },
        inputs=lambda c: [
            *_files(resolve(c).eval_manifest, resolve(c).train_meta, resolve(c).merge_report),
            *([c.eval.chat_probe.path] if c.eval.chat_probe.path else []),  # its examples, by content
            *sorted({t.include for t in c.eval.tasks if t.include}),  # local task definitions and data
        ],
        marker=lambda c: resolve(c).eval_results,
        run=_eval,
        describe=describe_eval,
    ),
    Stage(
        name="sft",
        why_not=lambda c: None if c.sft else "no sft section",
        sections=lambda c: {"seed": c.seed, "model": c.model, "sft": c.sft},
        inputs=lambda c: [c.sft.data, *_files(resolve(c).merge_report, resolve(c).train_meta)],
        marker=lambda c: resolve(c).sft_meta,
        run=_sft,
        describe=describe_train,
        resumes_from=lambda c: resolve(c).sft,
    ),
    Stage(
        name="sft-eval",
        why_not=lambda c: None if c.sft and c.eval is not None else "needs sft and eval sections",
        sections=lambda c: {"model": c.model, "eval": c.eval, "sft": c.sft},
        inputs=lambda c: _files(resolve(c).eval_manifest, resolve(c).sft_meta),
        marker=lambda c: resolve(c).sft_eval_results,
        run=_sft_eval,
        describe=describe_eval,
    ),
    Stage(
        name="grpo",
        why_not=lambda c: None if c.grpo else "no grpo section",
        sections=lambda c: {"seed": c.seed, "model": c.model, "sft": c.sft, "grpo": c.grpo},
        inputs=_grpo_inputs,
        marker=lambda c: resolve(c).grpo_meta,
        run=_grpo,
        describe=describe_grpo,
        resumes_from=lambda c: resolve(c).grpo,
    ),
    Stage(
        name="export",
        why_not=lambda c: None if c.export is not None else "no export section",
        sections=lambda c: {"model": c.model, "export": c.export},
        inputs=lambda c: _files(
            resolve(c).merge_report, resolve(c).train_meta, resolve(c).sft_meta, resolve(c).grpo_meta
        ),
        marker=lambda c: resolve(c).export_report,
        run=_export,
        describe=lambda r: f"{r['type']} GGUF, {r['bytes'] / 1e6:.1f} MB, {r['seconds']:.1f} s: {r['path']}",
    ),
    Stage(
        name="report",
        why_not=_report_why_not,
        sections=lambda c: {},
        inputs=_report_inputs,
        marker=lambda c: resolve(c).report_json,
        run=_report,
        describe=lambda r: r["path"],
    ),
]

NAMES = [s.name for s in STAGES]

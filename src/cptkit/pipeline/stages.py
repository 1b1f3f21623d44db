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


# where each stage's finished output is recorded
def prepared_dir(cfg: Config) -> Path:
    return Path(cfg.train.dataset) if cfg.train and cfg.train.dataset else cfg.stage_dir("prepare")


def manifest(cfg: Config) -> Path:
    return prepared_dir(cfg) / "manifest.json"


def train_meta(cfg: Config) -> Path:
    return cfg.stage_dir("train") / "run_meta.json"


def merge_report(cfg: Config) -> Path:
    return cfg.stage_dir("merge") / "merge_report.json"


def sft_meta(cfg: Config) -> Path:
    return cfg.stage_dir("sft") / "run_meta.json"


def sft_eval_dir(cfg: Config) -> Path:
    return cfg.stage_dir("sft") / "eval"


def _existing(cfg: Config, *paths: Callable[[Config], Path]) -> list[Path]:
    found = []
    for path in paths:
        try:
            found.append(path(cfg))
        except Exception:  # a stage without an output folder contributes nothing
            continue
    return found


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

    return {**report.run(cfg.run_dir), "path": str(Path(cfg.run_dir) / "report" / "report.md")}


def _sft(cfg: Config) -> dict[str, Any]:
    from cptkit.commands import sft

    return sft.run(cfg)


def sft_eval_config(cfg: Config) -> Config:
    """The eval section pointed at the SFT model: base, the CPT model it started from, and the SFT model."""
    from cptkit.commands.sft import sft_base_model

    base = cfg.model.name_or_path if cfg.model else None
    start = sft_base_model(cfg)
    out = cfg.stage_dir("sft")
    sft_model = (
        EvalModel(name="sft", path=start, adapter=str(out))
        if cfg.sft.mode != "full"
        else EvalModel("sft", str(out))
    )
    models = [EvalModel(name="base", path=base)] if base else []
    if start != base:
        models.append(EvalModel(name="cpt", path=start))
    models.append(sft_model)
    ec = dataclasses.replace(cfg.eval or EvalConfig(), models=models, output_dir=str(sft_eval_dir(cfg)))
    return dataclasses.replace(cfg, eval=ec)


def _sft_eval(cfg: Config) -> dict[str, Any]:
    return _eval(sft_eval_config(cfg))


# one-line accounts
def _fmt(x: Any, spec: str = ".3f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "?"


def describe_prepare(m: dict[str, Any]) -> str:
    t = m.get("totals", {})
    return f"{t.get('rows', '?')} rows, {t.get('trained_tokens', '?')} tokens, packing {_fmt(t.get('packing_efficiency'), '.1%')}"


def describe_train(s: dict[str, Any]) -> str:
    return (
        f"{s.get('steps', '?')} steps, loss {_fmt(s.get('train_loss'))}, "
        f"{_fmt(s.get('tokens_per_second'), '.0f')} tokens/s"
    )


def describe_eval(r: dict[str, Any]) -> str:
    last = {}
    for d in r.get("deltas", []):  # the last model listed (merged, or sft) on each set
        last[d["set"]] = d
    parts = [
        f"{s} ({d['role']}) ppl {d['perplexity_before']:.2f} -> {d['perplexity_after']:.2f}"
        for s, d in last.items()
    ]
    return "; ".join(parts) or f"{len(r.get('results', []))} results"


STAGES: list[Stage] = [
    Stage(
        "prepare",
        lambda c: None if c.data else "no data section",
        lambda c: {"data": c.data},
        lambda c: [s.path for s in c.data.sources],
        manifest,
        _prepare,
        describe_prepare,
    ),
    Stage(
        "train",
        lambda c: None if c.train and c.model else "no train (and model) section",
        lambda c: {"seed": c.seed, "model": c.model, "train": c.train},
        lambda c: [manifest(c)],
        train_meta,
        _train,
        describe_train,
        resumes_from=lambda c: c.stage_dir("train"),
    ),
    Stage(
        "merge",
        lambda c: (
            "no merge section"
            if c.merge is None
            else ("train.mode is full: nothing to merge" if c.train and c.train.mode == "full" else None)
        ),
        lambda c: {"model": c.model, "merge": c.merge},
        lambda c: [train_meta(c)],
        merge_report,
        _merge,
        lambda r: f"{r.get('mode', '?')} adapter merged, kept the {r.get('kept', '?')} variant",
    ),
    Stage(
        "eval",
        lambda c: None if c.eval is not None else "no eval section",
        lambda c: {"model": c.model, "eval": c.eval, "seq_length": c.data.seq_length if c.data else None},
        lambda c: _existing(c, manifest, train_meta, merge_report),
        lambda c: c.stage_dir("eval") / "results.json",
        _eval,
        describe_eval,
    ),
    Stage(
        "sft",
        lambda c: None if c.sft else "no sft section",
        lambda c: {"seed": c.seed, "model": c.model, "sft": c.sft},
        lambda c: [c.sft.data, *_existing(c, merge_report, train_meta)],
        sft_meta,
        _sft,
        describe_train,
        resumes_from=lambda c: c.stage_dir("sft"),
    ),
    Stage(
        "sft-eval",
        lambda c: None if c.sft and c.eval is not None else "needs sft and eval sections",
        lambda c: {"model": c.model, "eval": c.eval, "sft": c.sft},
        lambda c: _existing(c, manifest, sft_meta),
        lambda c: sft_eval_dir(c) / "results.json",
        _sft_eval,
        describe_eval,
    ),
    Stage(
        "report",
        lambda c: (
            None
            if c.run_dir and (c.data or c.train or c.eval)
            else "needs run_dir and a data, train or eval section"
        ),
        lambda c: {},
        lambda c: _existing(
            c,
            manifest,
            train_meta,
            merge_report,
            lambda c: c.stage_dir("eval") / "results.json",
            sft_meta,
            lambda c: sft_eval_dir(c) / "results.json",
        ),
        lambda c: Path(c.run_dir) / "report" / "report.json",
        _report,
        lambda r: r["path"],
    ),
]

NAMES = [s.name for s in STAGES]

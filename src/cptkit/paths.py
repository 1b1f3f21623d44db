"""Where a run reads and writes: every folder and file name of a run, worked out once.

`resolve(cfg)` turns a config into `Paths`: each stage's output folder (a section's `output_dir`, else
its default name under `run_dir`) and the cross-section defaults (train reads `train.dataset`, else what
prepare wrote; merge merges `merge.adapter`, else the train folder; SFT starts from `sft.model`, else the
merged or fully trained CPT model, else the base model). Every command, the pipeline's stamps and the
report take their folders from here, so they cannot disagree. A folder that cannot be resolved (no
`run_dir` and no `output_dir`) is None; `Paths.folder(stage)` raises the error for whoever needs it.

The resolved paths are written into each output folder's config.yaml (`write_config`), under `paths:`,
so that `cptkit report RUN_DIR` finds stages whose `output_dir` points elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.errors import CptkitError

if TYPE_CHECKING:
    from cptkit.config.schema import Config

# the files each stage writes (their content is described in docs/CONTRACTS.md)
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
RUN_META = "run_meta.json"
METRICS = "metrics.jsonl"
# the diagonal Fisher EWC estimated before training, in a subfolder: a model reader takes every
# *.safetensors at the root of an unindexed model folder for weights
REGULARIZE_DIR = "regularize"
EWC_FISHER = f"{REGULARIZE_DIR}/ewc_fisher.safetensors"
MERGE_REPORT = "merge_report.json"
RESULTS = "results.json"
RESULTS_MD = "results.md"
SFT_DATA = "sft_data.json"
GRPO_PROMPTS = "grpo_prompts.json"
GRPO_SCORES = "grpo_scores.json"
EXPORT_REPORT = "export_report.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
STAGE_RECORDS = ".cptkit/stages.json"

# each stage's folder under run_dir when its section sets no output_dir
DEFAULT_FOLDERS = {
    "data": "data",
    "train": "train",
    "merged": "merged",
    "eval": "eval",
    "sft": "sft",
    "sft_eval": "sft/eval",
    "grpo": "grpo",
    "export": "export",
    "report": "report",
}
# `cptkit run`'s stage names -> the Paths field of the folder each writes
STAGE_FOLDERS = {
    "prepare": "data",
    "train": "train",
    "merge": "merged",
    "eval": "eval",
    "sft": "sft",
    "sft-eval": "sft_eval",
    "grpo": "grpo",
    "export": "export",
    "report": "report",
}
RECORD_KEY = "paths"  # the block of config.yaml that holds the resolved paths


@dataclass(frozen=True)
class Paths:
    """The folders of one run. Folders are Paths, or None when neither run_dir nor the section's
    output_dir says where they are; models that may be hub names are strings."""

    run_dir: Path | None = None
    """The run folder (`run_dir`): the stage records (.cptkit/) and the default home of every stage."""
    data: Path | None = None
    """Where `cptkit prepare` writes: data.output_dir, else RUN_DIR/data."""
    prepared: Path | None = None
    """The prepared dataset `cptkit train` trains on: train.dataset, else `data`."""
    train: Path | None = None
    """Where `cptkit train` writes its adapter or full model: train.output_dir, else RUN_DIR/train."""
    adapter: Path | None = None
    """The adapter `cptkit merge` merges: merge.adapter, else `train`."""
    merge_base: str | None = None
    """The base model `cptkit merge` merges into: merge.base, else model.name_or_path."""
    merge_dataset: Path | None = None
    """The prepared dataset whose held-out documents compare QLoRA merges: merge.dataset, else `prepared`."""
    merged: Path | None = None
    """Where `cptkit merge` writes the merged model: merge.output_dir, else RUN_DIR/merged."""
    eval: Path | None = None
    """Where `cptkit eval` writes results: eval.output_dir, else RUN_DIR/eval."""
    eval_dataset: Path | None = None
    """The prepared dataset whose held-out sets eval scores: eval.dataset, else `prepared`."""
    sft_base: str | None = None
    """The model SFT starts from: sft.model, else the merged CPT model (a merge section and train not
    full), else the fully trained CPT model (train.mode full), else model.name_or_path."""
    sft: Path | None = None
    """Where `cptkit sft` writes: sft.output_dir, else RUN_DIR/sft."""
    sft_eval: Path | None = None
    """Where the evaluation of the SFT model goes: `sft`/eval."""
    grpo_base: str | None = None
    """The model GRPO starts from: grpo.model, else the SFT output (an sft section), else `sft_base`
    (the merged or fully trained CPT model, else model.name_or_path)."""
    grpo: Path | None = None
    """Where `cptkit grpo` writes: grpo.output_dir, else RUN_DIR/grpo."""
    export_source: str | None = None
    """The model `cptkit export` writes out: export.model, else the last stage's model (grpo, sft,
    merged, or the fully trained CPT model), else model.name_or_path; an adapter is merged first."""
    export: Path | None = None
    """Where `cptkit export` writes the .gguf file and export_report.json: export.output_dir, else
    RUN_DIR/export."""
    report: Path | None = None
    """Where `cptkit report` writes: RUN_DIR/report."""

    def folder(self, stage: str) -> Path:
        """The output folder of a `cptkit run` stage (prepare, train, merge, eval, sft, sft-eval, report),
        or a CptkitError when the config does not say where it is."""
        if stage not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGE_FOLDERS)}")
        found = getattr(self, STAGE_FOLDERS[stage])
        if found is None:
            raise CptkitError(f"{stage}: no output folder: set run_dir or the section's output_dir")
        return found

    # each stage's marker and record files (None where the folder is unknown)
    @property
    def data_manifest(self) -> Path | None:
        """The manifest prepare writes last: the prepare stage is finished once it exists."""
        return _in(self.data, MANIFEST)

    @property
    def manifest(self) -> Path | None:
        """The manifest of the dataset train trains on."""
        return _in(self.prepared, MANIFEST)

    @property
    def eval_manifest(self) -> Path | None:
        """The manifest of the dataset whose held-out sets eval scores."""
        return _in(self.eval_dataset, MANIFEST)

    @property
    def train_meta(self) -> Path | None:
        return _in(self.train, RUN_META)

    @property
    def train_metrics(self) -> Path | None:
        return _in(self.train, METRICS)

    @property
    def merge_report(self) -> Path | None:
        return _in(self.merged, MERGE_REPORT)

    @property
    def eval_results(self) -> Path | None:
        return _in(self.eval, RESULTS)

    @property
    def sft_meta(self) -> Path | None:
        return _in(self.sft, RUN_META)

    @property
    def sft_metrics(self) -> Path | None:
        return _in(self.sft, METRICS)

    @property
    def sft_data(self) -> Path | None:
        return _in(self.sft, SFT_DATA)

    @property
    def sft_eval_results(self) -> Path | None:
        return _in(self.sft_eval, RESULTS)

    @property
    def grpo_meta(self) -> Path | None:
        return _in(self.grpo, RUN_META)

    @property
    def grpo_metrics(self) -> Path | None:
        return _in(self.grpo, METRICS)

    @property
    def grpo_prompts(self) -> Path | None:
        return _in(self.grpo, GRPO_PROMPTS)

    @property
    def grpo_scores(self) -> Path | None:
        return _in(self.grpo, GRPO_SCORES)

    @property
    def export_report(self) -> Path | None:
        return _in(self.export, EXPORT_REPORT)

    @property
    def report_json(self) -> Path | None:
        return _in(self.report, REPORT_JSON)

    @property
    def report_md(self) -> Path | None:
        return _in(self.report, REPORT_MD)

    @property
    def stage_records(self) -> Path | None:
        return _in(self.run_dir, STAGE_RECORDS)

    # the record in config.yaml, and a run folder read back through it
    def to_record(self) -> dict[str, str | None]:
        """Every field as a string (None stays None): the `paths:` block of config.yaml."""
        return {f.name: _text(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def under(cls, run_dir: str | Path) -> Paths:
        """The default layout of a run folder: every stage in its default-named subfolder."""
        run_dir = Path(run_dir)
        folders = {name: run_dir / sub for name, sub in DEFAULT_FOLDERS.items()}
        data, train = folders["data"], folders["train"]
        return cls(
            run_dir=run_dir, prepared=data, adapter=train, merge_dataset=data, eval_dataset=data, **folders
        )

    @classmethod
    def of_run_dir(cls, run_dir: str | Path) -> Paths:
        """Where the stages of the run in `run_dir` wrote: as the first config.yaml found in its default
        folders records it (folders that were under the recorded run_dir are taken under `run_dir`,
        so a moved run folder still reads), else the default layout."""
        import yaml

        default = cls.under(run_dir)
        for name in (
            "data",
            "train",
            "merged",
            "eval",
            "sft",
            "grpo",
            "export",
        ):  # each holds the run's whole config
            written = getattr(default, name) / CONFIG
            if not written.is_file():
                continue
            record = (yaml.safe_load(written.read_text(encoding="utf-8")) or {}).get(RECORD_KEY)
            if isinstance(record, dict):
                return cls._rebased(record, Path(run_dir))
        return default

    @classmethod
    def _rebased(cls, record: dict[str, Any], run_dir: Path) -> Paths:
        recorded_run = record.get("run_dir")
        default = cls.under(run_dir)  # what a config that set no run_dir left unresolved (the report)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = record.get(f.name)
            if value is None:
                values[f.name] = getattr(default, f.name)
                continue
            if f.name in (
                "merge_base",
                "sft_base",
                "grpo_base",
                "export_source",
            ):  # model names; a path under the run moves with it
                rebased = _moved(Path(value), recorded_run, run_dir)
                values[f.name] = str(rebased) if rebased is not None else value
                continue
            values[f.name] = _moved(Path(value), recorded_run, run_dir) or Path(value)
        values["run_dir"] = run_dir
        return cls(**values)


def resolve(cfg: Config) -> Paths:
    """Every folder `cfg` reads and writes, and the cross-section defaults (see `Paths`)."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None

    def own(section: Any, name: str) -> Path | None:
        explicit = getattr(section, "output_dir", None) if section is not None else None
        if explicit:
            return Path(explicit)
        return run_dir / DEFAULT_FOLDERS[name] if run_dir is not None else None

    train, merge, sft = cfg.train, cfg.merge, cfg.sft
    data = own(cfg.data, "data")
    prepared = Path(train.dataset) if train is not None and train.dataset else data
    train_dir = own(train, "train")
    merged = own(merge, "merged")
    sft_dir = own(sft, "sft")
    grpo_dir = own(cfg.grpo, "grpo")
    base_model = cfg.model.name_or_path if cfg.model is not None else None
    sft_base = _sft_base(cfg, merged, train_dir, base_model)
    return Paths(
        run_dir=run_dir,
        data=data,
        prepared=prepared,
        train=train_dir,
        adapter=Path(merge.adapter) if merge is not None and merge.adapter else train_dir,
        merge_base=(merge.base if merge is not None and merge.base else None) or base_model,
        merge_dataset=Path(merge.dataset) if merge is not None and merge.dataset else prepared,
        merged=merged,
        eval=own(cfg.eval, "eval"),
        eval_dataset=Path(cfg.eval.dataset) if cfg.eval is not None and cfg.eval.dataset else prepared,
        sft_base=sft_base,
        sft=sft_dir,
        sft_eval=sft_dir / "eval" if sft_dir is not None else None,
        grpo_base=_grpo_base(cfg, sft_dir, sft_base),
        grpo=grpo_dir,
        export_source=_export_source(cfg, grpo_dir, sft_dir, merged, train_dir, base_model),
        export=own(cfg.export, "export"),
        report=run_dir / DEFAULT_FOLDERS["report"] if run_dir is not None else None,
    )


def _sft_base(cfg: Config, merged: Path | None, train: Path | None, base_model: str | None) -> str | None:
    full = cfg.train is not None and cfg.train.mode == "full"
    if cfg.sft is not None and cfg.sft.model:
        return cfg.sft.model
    if cfg.merge is not None and not full:
        return _text(merged)
    if full:
        return _text(train)
    return base_model


def _grpo_base(cfg: Config, sft: Path | None, sft_base: str | None) -> str | None:
    if cfg.grpo is not None and cfg.grpo.model:
        return cfg.grpo.model
    if cfg.sft is not None:
        return _text(sft)  # a LoRA SFT output is an adapter folder: GRPO loads it on its base
    return sft_base


def _export_source(
    cfg: Config,
    grpo: Path | None,
    sft: Path | None,
    merged: Path | None,
    train: Path | None,
    base_model: str | None,
) -> str | None:
    if cfg.export is not None and cfg.export.model:
        return cfg.export.model
    if cfg.grpo is not None:
        return _text(grpo)
    if cfg.sft is not None:
        return _text(sft)
    if cfg.merge is not None and not (cfg.train is not None and cfg.train.mode == "full"):
        return _text(merged)
    if cfg.train is not None and cfg.train.mode == "full":
        return _text(train)
    return base_model


def _moved(path: Path, recorded_run: str | None, run_dir: Path) -> Path | None:
    """`path` under `run_dir` when it was under the recorded run folder, else None."""
    if recorded_run and path.is_relative_to(recorded_run):
        return run_dir / path.relative_to(recorded_run)
    return None


def _in(folder: Path | None, name: str) -> Path | None:
    return folder / name if folder is not None else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)

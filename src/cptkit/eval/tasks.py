"""Downstream tasks of lm-evaluation-harness (`eval.tasks`), run offline on models cptkit has loaded.

A task is found before any model loads (`check_tasks`): by its name among the YAML files under its
`include` (a folder, or the folder of one YAML file), else among lm-eval's own tasks. Its data must be
reachable without the network: local files (`dataset_path: json` with `dataset_kwargs.data_files`, read
relative to the task file's folder, so a task works from any working directory) or a hub dataset already
in the local cache. `run_tasks` then scores a model object as it is (a peft adapter on its base, a model
in training, an interpolated point) through lm-eval's HFLM, without loading it again.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cptkit.config.evaluate import EvalTask
from cptkit.errors import ConfigError, CptkitError
from cptkit.train.optional import install_hint, is_installed, missing_packages

log = logging.getLogger(__name__)

# datasets' packaged builders that read local files named in dataset_kwargs.data_files
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas"})
EXAMPLES = "examples/tasks"


@dataclass
class ReadyTask:
    """A configured task found offline: the lm-eval TaskManager that indexed it and the settings that
    point its local data at absolute paths (lm-eval alone reads them from the working directory)."""

    spec: EvalTask
    manager: Any
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def build(self) -> Any:
        """What simple_evaluate is given: the task's name, or, where its data paths are overridden, the
        task built (data loaded) through TaskManager.load's group syntax (a member's settings override
        its YAML's), without the group that carried them."""
        if not self.overrides:
            return self.name
        carrier = {"group": f"cptkit::{self.name}", "task": [{"task": self.name, **self.overrides}]}
        return self.manager.load([carrier])["tasks"][self.name]


def check_tasks(
    tasks: Sequence[EvalTask],
    where: str = "eval.tasks",
    installed: Callable[[str], bool] = is_installed,
    during_training: bool = False,
) -> list[ReadyTask]:
    """Every task of `tasks` (with `during_training`: those that also run during training) found
    offline, before any model loads; all problems in one ConfigError. `installed(module)` says whether
    a module is installed (default: this machine's packages)."""
    wanted = [(i, t) for i, t in enumerate(tasks) if t.during_training or not during_training]
    if not wanted:
        return []
    require_lm_eval(where, installed)
    managers: dict[str | None, Any] = {}
    ready, problems = [], []
    for i, spec in wanted:
        try:
            ready.append(_find(spec, f"{where}[{i}]", managers))
        except _Problem as p:
            problems.append(str(p))
    if problems:
        raise ConfigError(problems, where)
    return ready


def require_lm_eval(where: str = "eval.tasks", installed: Callable[[str], bool] = is_installed) -> None:
    if missing_packages(["lm-eval"], installed):
        raise CptkitError(f"{where} needs {install_hint('lm-eval')}, which is not installed")


class _Problem(Exception):
    """One task that cannot run offline, with what to do."""


def _find(spec: EvalTask, at: str, managers: dict[str | None, Any]) -> ReadyTask:
    folder = _include_folder(spec, at)
    key = str(folder) if folder else None
    if key not in managers:
        managers[key] = _manager(folder)
    manager = managers[key]
    entry = manager.task_index.get(spec.name)
    if entry is None:
        raise _Problem(_not_found(spec, at, manager.all_tasks, folder))
    return ReadyTask(spec, manager, _data_overrides(entry, manager.task_index, f"{at} ({spec.name})"))


def _include_folder(spec: EvalTask, at: str) -> Path | None:
    if spec.include is None:
        return None
    include = Path(spec.include).expanduser().resolve()
    if not include.exists():
        raise _Problem(
            f"{at}.include: {spec.include} does not exist (expected a folder of lm-eval task YAML files, "
            f"or one such file; {EXAMPLES} has examples)"
        )
    return include if include.is_dir() else include.parent


def _manager(folder: Path | None) -> Any:
    from lm_eval.tasks import TaskManager

    if folder is None:
        log.info("indexing lm-eval's own tasks (takes a few seconds)")
        return TaskManager()
    return TaskManager(include_path=str(folder), include_defaults=False)


def _not_found(spec: EvalTask, at: str, known: list[str], folder: Path | None) -> str:
    close = difflib.get_close_matches(spec.name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    if folder is not None:
        found = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "") if known else "none"
        return (
            f"{at}.name: no task {spec.name!r} in {folder}{hint}; tasks defined there: {found}. "
            "Tasks of the hub cannot be fetched offline: define the task in a YAML file on local data"
        )
    return (
        f"{at}.name: {spec.name!r} is not a task of lm-eval{hint}; a task of your own is a YAML file on "
        f"local data, found through `include` (see {EXAMPLES})"
    )


def _data_overrides(entry: Any, index: dict[str, Any], at: str) -> dict[str, Any]:
    """What points a task's local data at absolute paths; a problem where its data cannot be read
    offline. Groups and tags are checked member by member and run as lm-eval defines them."""
    cfg = entry.cfg or {}
    if entry.yaml_path is None or "task" not in cfg or isinstance(cfg.get("task"), list):
        for member in _members(entry, index):
            _data_overrides(member, index, at)
        return {}
    if cfg.get("custom_dataset"):
        return {}
    folder, dataset = Path(entry.yaml_path).parent, str(cfg.get("dataset_path") or "")
    if dataset in LOCAL_BUILDERS:
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        files = kwargs.get("data_files")
        if not files:
            raise _Problem(f"{at}: dataset_path {dataset} needs dataset_kwargs.data_files (the local files)")
        kwargs["data_files"] = _absolute(files, folder, at)
        return {"dataset_kwargs": kwargs}
    if (folder / dataset).is_dir():
        return {"dataset_path": str((folder / dataset).resolve())}
    if not in_hub_cache(dataset):
        raise _Problem(
            f"{at}: reads the hub dataset {dataset!r}, which is not in the local cache, and cptkit runs "
            f'lm-eval offline: fetch it once where the hub is reachable (python -c "import datasets; '
            f"datasets.load_dataset('{dataset}')\"), or define the task on local files (see {EXAMPLES})"
        )
    return {}


def _members(entry: Any, index: dict[str, Any]) -> list[Any]:
    names = list(entry.tags) if entry.cfg is None else (entry.cfg.get("task") or [])
    names = [n if isinstance(n, str) else n.get("task") for n in names if isinstance(n, (str, dict))]
    return [index[n] for n in names if isinstance(n, str) and n in index]


def _absolute(files: Any, folder: Path, at: str) -> Any:
    """data_files (a path, a list, or split -> path or list) with relative paths taken from `folder`."""
    if isinstance(files, dict):
        return {split: _absolute(f, folder, at) for split, f in files.items()}
    if isinstance(files, (list, tuple)):
        return [_absolute(f, folder, at) for f in files]
    path = (folder / Path(str(files)).expanduser()).resolve()
    if not any(c in str(files) for c in "*?[") and not path.exists():
        raise _Problem(
            f"{at}: data file {files} does not exist (relative paths are read from the task file's "
            f"folder, {folder})"
        )
    return str(path)


def in_hub_cache(dataset: str) -> bool:
    """Whether a hub dataset has been downloaded to this machine's cache (hub or datasets cache)."""
    import datasets
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    cached = Path(datasets.config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    return hub.is_dir() or cached.is_dir() or Path(dataset).is_dir()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network for the call: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE set, and the switches that
    huggingface_hub and datasets read from them when first imported turned on, then all restored."""
    import datasets
    from huggingface_hub import constants

    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    os.environ.update(dict.fromkeys(names, "1"))
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
        for n, value in saved_env.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


@contextlib.contextmanager
def _random_state_kept() -> Iterator[None]:
    """lm-eval seeds Python's, numpy's and torch's generators for reproducible scores; a run in
    training continues with the states it had."""
    import numpy as np

    saved = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


@contextlib.contextmanager
def _in_eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def run_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[EvalTask | ReadyTask],
    device: torch.device | str,
    batch_size: int,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Each task on `model` as it is (eval mode for the call, then as it was):
    {task: {metric: {value, stderr, higher_is_better, samples}}} (a group adds its own entry and its
    members'). Tasks not yet checked are checked first."""
    from cptkit.eval.task_results import scores_of

    ready = list(tasks)
    if not all(isinstance(t, ReadyTask) for t in ready):
        ready = check_tasks([t.spec if isinstance(t, ReadyTask) else t for t in ready])
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    out: dict[str, dict[str, dict[str, Any]]] = {}
    with offline(), _in_eval_mode(model), _random_state_kept(), torch.no_grad():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        for task in ready:
            result = simple_evaluate(
                model=lm,
                tasks=[task.build()],
                task_manager=task.manager,
                num_fewshot=task.spec.num_fewshot,
                limit=task.spec.limit,
                log_samples=False,
                bootstrap_iters=1000,
            )
            out.update(scores_of(result))
    return out


def score_tasks(
    models: Sequence[Any],
    tasks: Sequence[ReadyTask],
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    trust_remote_code: bool = False,
    scored: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """results.json's `tasks` ({model: {task: {metric: ...}}}) and `task_deltas` (against `base`) for
    every model of `eval.models` (EvalModel), loaded one at a time as `cptkit eval` scores them (the
    adapter on the NF4 base where it was trained on one and bitsandbytes runs), and the models already
    scored elsewhere (`scored`: the interpolation sweep's points); {} without tasks."""
    if not tasks:
        return {}
    from cptkit.eval.each_model import each_model
    from cptkit.eval.task_results import task_deltas

    scores = {}
    for spec, model, tokenizer in each_model(models, device, dtype, trust_remote_code):
        log.info("downstream tasks on %s", spec.name)
        scores[spec.name] = run_tasks(model, tokenizer, tasks, device, batch_size)
    scores.update(scored or {})  # the sweep's points after the models: summaries leave them out (is_point)
    return {"tasks": scores, "task_deltas": task_deltas(scores)}

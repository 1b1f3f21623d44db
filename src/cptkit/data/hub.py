"""Hub sources (`type: hub`): a Hugging Face dataset by name, or a local folder in the hub layout, read
as `datasets.load_dataset(path, name, split=..., revision=..., data_files=..., streaming=True)` reads
it: file by file, nothing downloaded whole first.

The stream's own shards (`IterableDataset.n_shards`: one per data file for parquet, json, csv, ...)
are the source's shards, so several workers read different files. What keys their store entries:
- a local folder: the content hashes of its data files, as for any input file (a folder has no
  revisions, so `revision` is refused there when the config is checked);
- a dataset on the hub: the commit the revision resolves to (`HfApi().dataset_info(...).sha`), and
  every shard is read at that commit, so a branch that moves during a long prepare is not mixed in.
  Where the hub cannot be reached (offline, `HF_HUB_OFFLINE=1`), the revision as written stands for the
  content (`None`: the default branch): a branch that moved since is not noticed; pin a commit sha
  for that.
Everything a user can get wrong (no such dataset, configuration or split, no such text column) is
found when the source is planned, before any tokenizing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptkit.data.document import Document, Ledger
from cptkit.data.streams import Progress
from cptkit.errors import CptkitError

if TYPE_CHECKING:
    from cptkit.config.data import HubConfig
    from cptkit.data.readers import SourcePlan

log = logging.getLogger(__name__)

_ROWS = 1000  # rows taken from the stream at a time


@dataclass(frozen=True)
class HubPlan:
    """A hub source as planned: what `load_dataset` is called with, the commit it resolved to, and the
    stream's shards with their data files."""

    path: str
    name: str | None
    split: str
    revision: str | None  # as configured
    data_files: str | list[str] | None
    local: bool  # a folder on this machine (else a dataset on the hub)
    sha: str | None  # the commit read (a hub dataset reached online); None: a local folder, or offline
    num_shards: int
    files: tuple[str, ...]  # the split's data files, in stream order (local paths or hf:// URLs)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each data file, where known
    hub_sha256: dict[str, str] = field(default_factory=dict)  # the hub's content hash of each, where known

    @property
    def label(self) -> str:
        """The dataset as a user names it, e.g. `stanfordnlp/imdb (plain_text, train)`."""
        return f"{self.path} ({', '.join(p for p in (self.name, self.split) if p)})"

    @property
    def file_per_shard(self) -> bool:
        """The stream has one shard a data file (parquet, json, csv, ...), in the files' order."""
        return len(self.files) == self.num_shards

    def shard_files(self, index: int) -> tuple[str, ...]:
        """The data files shard `index` reads: its one file, or all of them where the stream's shards are
        not one a file (what a shard holds is then not known from outside)."""
        return (self.files[index],) if self.file_per_shard else self.files

    def shard_bytes(self, index: int) -> int:
        """Bytes of the data shard `index` reads (an even share where its files are not known; 0 where
        their sizes are not known)."""
        if self.file_per_shard:
            return self.sizes.get(self.files[index], 0)
        return sum(self.sizes.values()) // max(self.num_shards, 1)

    def identity(self) -> dict[str, Any]:
        """What decides a remote shard's content, for its store key (a local one is keyed on its files)."""
        return {
            "hub": self.path,
            "name": self.name,
            "split": self.split,
            "data_files": self.data_files,
            "commit": self.sha or self.revision,
            "num_shards": self.num_shards,
        }

    def describe(self) -> dict[str, Any]:
        """The manifest's record of the dataset read."""
        return {
            "path": self.path,
            "name": self.name,
            "split": self.split,
            "revision": self.revision,
            "sha": self.sha,
            "data_files": self.data_files,
            "local": self.local,
            "shards": self.num_shards,
        }

    def open(self) -> Any:
        """The whole streamed split (`IterableDataset`), read at the resolved commit where there is one."""
        key = _stream_key(self.path, self.name, self.split, self.sha or self.revision, self.data_files)
        if key not in _OPENED:  # another process than the one that planned: open it again
            builder = _builder(self.path, self.name, self.sha or self.revision, self.data_files, self.label)
            _OPENED[key] = builder.as_streaming_dataset(split=self.split)
        return _OPENED[key]


# Streams opened in this process: the tasks run here reuse the one planning opened instead of resolving
# the data files again (for a remote dataset of many files that costs hub calls each time).
_OPENED: dict[tuple, Any] = {}


def _stream_key(*spec: Any) -> tuple:
    return tuple(tuple(v) if isinstance(v, list) else v for v in spec)


def plan_hub(hub: HubConfig, text_field: str, label: str) -> SourcePlan:
    """Open a hub source's stream and check it, or raise a CptkitError saying what to change: the
    dataset, its configuration (`name`), split and text column must exist."""
    from cptkit.data.readers import SourcePlan

    local = Path(hub.path).is_dir()  # what datasets does: an existing folder wins over a hub name
    sha, sizes, hub_sha256 = (None, {}, {}) if local else _resolve_commit(hub, label)
    revision = sha or hub.revision
    builder = _builder(hub.path, hub.name, revision, hub.data_files, label)
    files = _split_files(builder, hub, label)
    try:
        stream = builder.as_streaming_dataset(split=hub.split)
    except ValueError as e:
        if "Bad split" in str(e):
            raise CptkitError(f"{label}.hub.split: {e}") from None
        raise CptkitError(f"{label}.hub: {hub.path} cannot be streamed: {e}") from None
    _check_text_field(stream, text_field, hub.path, label)
    if not local and sha is None:
        _warn_unresolved(hub, label)
    plan = HubPlan(
        hub.path,
        hub.name,
        hub.split,
        hub.revision,
        hub.data_files,
        local,
        sha,
        stream.n_shards,
        tuple(files),
        {f: Path(f).stat().st_size for f in files} if local else _remote_sizes(files, sizes),
        {} if local else {f: hub_sha256[_repo_file(f)] for f in files if _repo_file(f) in hub_sha256},
    )
    _OPENED[_stream_key(hub.path, hub.name, hub.split, revision, hub.data_files)] = stream
    return SourcePlan(files=[Path(f) for f in files] if local else [], hub=plan)


def _resolve_commit(hub: HubConfig, label: str) -> tuple[str | None, dict[str, int], dict[str, str]]:
    """The commit `hub.revision` names on the hub now, with each repository file's size and content
    hash; (None, {}, {}) where the hub cannot be reached (then `datasets` finds what it can offline)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().dataset_info(hub.path, revision=hub.revision, files_metadata=True)
    except GatedRepoError:
        raise CptkitError(
            f"{label}.hub.path: {hub.path} is gated: accept its terms on huggingface.co and log in "
            "(`hf auth login`), or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise CptkitError(
            f"{label}.hub.revision: {hub.revision!r} is not a branch, tag or commit of {hub.path}"
        ) from None
    except RepositoryNotFoundError:
        raise CptkitError(
            f"{label}.hub.path: {hub.path} is not a dataset on the hub (nor a local folder); check the "
            "name, or log in (`hf auth login`) if it is private"
        ) from None
    except HFValidationError:
        raise CptkitError(
            f"{label}.hub.path: {hub.path} is neither a local folder nor a hub dataset name (owner/name)"
        ) from None
    except Exception as e:  # offline mode, no network, a timeout: httpx and huggingface_hub raise many kinds
        log.debug("%s: the hub cannot be reached: %s", label, e)
        return None, {}, {}
    sizes = {s.rfilename: s.size for s in info.siblings or () if s.size is not None}
    hashes = {s.rfilename: s.lfs.sha256 for s in info.siblings or () if s.lfs is not None}
    return info.sha, sizes, hashes


def _warn_unresolved(hub: HubConfig, label: str) -> None:
    log.warning(
        "%s: the hub cannot be reached: %s is read from what is available offline and keyed on its "
        "revision as written (%s); a branch that moved since is not noticed (pin hub.revision to a "
        "commit to be sure)",
        label,
        hub.path,
        hub.revision or "the default branch",
    )


def _builder(path: str, name: str | None, revision: str | None, data_files: Any, label: str) -> Any:
    """`datasets.load_dataset_builder` of the source (what `load_dataset` starts with), with each way it
    can fail said in the config's terms (`label`: where the source is in the config)."""
    import datasets

    try:
        return datasets.load_dataset_builder(path, name, revision=revision, data_files=data_files)
    except datasets.exceptions.DataFilesNotFoundError as e:
        where = "hub.data_files" if data_files is not None else "hub.path"
        raise CptkitError(f"{label}.{where}: no data files found ({e})") from None
    except datasets.exceptions.DatasetNotFoundError:
        raise CptkitError(
            f"{label}.hub.path: {path} is not a dataset on the hub (nor a local folder); check the "
            "name, or log in (`hf auth login`) if it is private"
        ) from None
    except ConnectionError:
        raise CptkitError(
            f"{label}.hub.path: {path}: no network, and not in the local cache; run prepare where "
            "the hub is reachable (or unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), or download it and "
            "point hub.path at the folder"
        ) from None
    except ValueError as e:
        text = str(e)
        if "Config name is missing" in text or "BuilderConfig" in text:
            names = _config_names(path, revision, data_files)
            given = f"{name!r} is not one" if name else "not set, and there is more than one"
            raise CptkitError(
                f"{label}.hub.name: {given} of {path}'s configurations: {', '.join(names)}"
            ) from None
        raise CptkitError(f"{label}.hub: {path} cannot be loaded: {text}") from None
    except FileNotFoundError as e:
        raise CptkitError(f"{label}.hub.path: {path}: {e}") from None


def _config_names(path: str, revision: str | None, data_files: Any) -> list[str]:
    import datasets

    try:
        return datasets.get_dataset_config_names(path, revision=revision, data_files=data_files)
    except Exception:  # the names are a hint; the error they go with is what matters
        return ["(could not be listed)"]


def _split_files(builder: Any, hub: HubConfig, label: str) -> list[str]:
    """The data files of the configured split (`a+b`: both, in that order), as `datasets` resolved them;
    [] where the builder does not list its files."""
    data_files = builder.config.data_files
    if not data_files:
        return []
    names = [s.strip() for s in hub.split.split("+")]
    missing = [s for s in names if s not in data_files]
    if missing:
        config = f" (configuration {builder.config.name})" if hub.name else ""
        raise CptkitError(
            f"{label}.hub.split: {missing[0]!r} is not a split of {hub.path}{config}; splits: "
            f"{', '.join(data_files)}"
        )
    return [str(f) for s in names for f in data_files[s]]


def _check_text_field(stream: Any, text_field: str, path: str, label: str) -> None:
    """The text column must exist and hold text, else nothing would be read."""
    features = stream.features
    if features is None:  # not declared and not inferable without reading: look at the first row
        first = next(iter(stream.take(1)), None)
        columns = list(first) if first is not None else []
    else:
        columns = list(features)
    if text_field not in columns:
        raise CptkitError(
            f"{label}.text_field: {text_field!r} is not a column of {path} (columns: {', '.join(columns)})"
        )
    import datasets

    feature = features.get(text_field) if features is not None else None
    if feature is not None and not (
        isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    ):
        raise CptkitError(
            f"{label}.text_field: {text_field!r} of {path} holds {feature}, not text; name the column "
            f"that holds the text (columns: {', '.join(columns)})"
        )


def _repo_file(url: str) -> str:
    """`hf://datasets/owner/name@sha/dir/file.parquet` -> `dir/file.parquet` (the hub's file name)."""
    rest = url.split("@", 1)[-1]
    return rest.split("/", 1)[-1]


def _remote_sizes(files: list[str], sizes: dict[str, int]) -> dict[str, int]:
    return {f: sizes[_repo_file(f)] for f in files if _repo_file(f) in sizes}


def read_hub_shard(
    plan: HubPlan, index: int, text_field: str, ledger: Ledger, progress: Progress | None = None
) -> Iterator[Document]:
    """The documents of shard `index` of the stream, rows without text recorded in `ledger`; `progress`
    is told of the shard's bytes (where known) once it is read. A read that fails (a damaged file, the
    network gone) raises: the shard is not finished and a rerun reads it again."""
    import datasets

    where = plan.files[index] if plan.file_per_shard else f"{plan.label} shard {index}"
    stream = plan.open()
    if stream.n_shards != plan.num_shards:
        raise CptkitError(
            f"{plan.label}: the dataset changed since prepare planned it ({stream.n_shards} shards, "
            f"{plan.num_shards} planned); run prepare again"
        )
    shard = stream.shard(num_shards=plan.num_shards, index=index)
    number = 0
    try:
        for batch in shard.select_columns([text_field]).iter(batch_size=_ROWS):
            for value in batch[text_field]:
                number += 1
                if isinstance(value, str):
                    yield Document(value, f"{where}:{number}")
                else:
                    reason = "no_text_field" if value is None else "text_not_a_string"
                    ledger.drop(reason, f"{where}:{number}")
    except (
        OSError,
        ValueError,
        RuntimeError,
        datasets.exceptions.DatasetsError,
    ) as e:  # pyarrow, fsspec, ...
        raise CptkitError(
            f"{plan.label}: reading shard {index} ({where}) failed after {number} rows: {e}. A damaged file: "
            "replace it, or leave it out with hub.data_files; the network gone: run prepare again (the "
            "finished shards are kept)"
        ) from e
    if progress is not None:
        progress(plan.shard_bytes(index))

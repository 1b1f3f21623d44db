"""The model to export as a full-precision model folder: a full model as it is; a LoRA adapter merged into
its base first (cptkit's streaming merge, in f32, into a temp folder removed afterwards); refused with the
next step to take when it is missing, quantised, or a QLoRA adapter (whose merge is chosen by `cptkit merge`
comparing the bf16 and dequantised bases)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)


def check_source(source: str | None, where: str) -> None:
    """Refuse a source that cannot be exported, before any work."""
    if not source:
        raise CptkitError(
            f"{where}: nothing to export: set export.model, or configure the stage that writes a model "
            "(model, train + merge, sft or grpo)"
        )
    folder = Path(source)
    if not folder.exists():
        raise CptkitError(
            f"{where}: {source} does not exist (expected a model or adapter folder); run the stage that "
            "writes it first (`cptkit run CONFIG.yaml`), or set export.model"
        )
    if (folder / "adapter_config.json").is_file():
        from cptkit.merge.adapter import training_mode

        mode, _ = training_mode(folder)
        if mode == "qlora":
            raise CptkitError(
                f"{where}: {source} is a QLoRA adapter on a 4-bit base; run `cptkit merge CONFIG.yaml` "
                "(it picks the closer of the bf16 and dequantised merges) and export the merged folder"
            )
        return
    if not (folder / "config.json").is_file():
        raise CptkitError(f"{where}: {source} is neither a model folder (config.json) nor an adapter folder")


@contextlib.contextmanager
def full_model_folder(source: str, scratch: Path, base: str | None = None) -> Iterator[Path]:
    """Yield a full model folder for `source`; an adapter is merged into the base it names (else `base`)
    inside `scratch`, which is removed on the way out."""
    folder = Path(source)
    if not (folder / "adapter_config.json").is_file():
        yield folder
        return
    from cptkit.config.evaluate import MergeConfig
    from cptkit.merge.run import merge_adapter

    base = adapter_base(folder) or base
    if not base:
        raise CptkitError(f"{folder}/adapter_config.json: no base_model_name_or_path; set model.name_or_path")
    merged = scratch / "merged"
    log.info("export: merging the adapter %s into %s first", folder, base)
    try:
        merge_adapter(base, folder, merged, MergeConfig(dtype="float32", mode="lora", device="cpu"))
        yield merged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_architecture(source: str, where: str, base: str | None = None) -> None:
    """Refuse an architecture the export does not know (for an adapter: its base's) before any merge."""
    import json

    from cptkit.export.architectures import architecture_of

    folder = Path(source)
    if (folder / "adapter_config.json").is_file():
        folder = Path(adapter_base(folder) or base or "")
    config = folder / "config.json"
    if config.is_file():  # a hub base is checked once fetched, by the writer
        architecture_of(json.loads(config.read_text(encoding="utf-8")), f"{where}: {config}")


def adapter_base(folder: Path) -> str | None:
    """The base model an adapter folder names (adapter_config.json's base_model_name_or_path)."""
    import json

    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path")

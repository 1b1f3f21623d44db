"""The model GRPO starts from, as a folder the loader can load in any mode: a full model as it is, and a
LoRA adapter (a LoRA or QLoRA SFT output) merged into its base once, written to `<grpo>/start/`.

A folder, not a merge in memory: QLoRA quantises what it loads, so the merged weights must be on disk
first; in full mode with beta > 0 TRL loads the reference model again from the policy's folder, which must
then be the merged one; and one code path for every mode keeps `base_model` in run_meta.json a folder that
holds exactly the weights the GRPO adapter applies to."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cptkit.errors import CptkitError
from cptkit.merge.adapter import is_adapter_folder

log = logging.getLogger(__name__)

START_DIR = "start"
MERGED_FROM = "cptkit_merged_from.json"


def adapter_base(adapter_dir: str | Path) -> str:
    """The base model an adapter folder was trained on (adapter_config.json's base_model_name_or_path)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise CptkitError(
            f"grpo.model: {adapter_dir} is a LoRA adapter without base_model_name_or_path in "
            "adapter_config.json; set grpo.model to a merged model folder"
        )
    return base


def _fingerprint(adapter_dir: Path) -> dict[str, Any]:
    """What identifies an adapter's weights: its folder and each weight file's size and time."""
    files = sorted(adapter_dir.glob("adapter_model*"))
    return {
        "adapter": str(adapter_dir.resolve()),
        "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files},
    }


def start_model(start: str, output_dir: Path, trust_remote_code: bool = False) -> tuple[str, str | None]:
    """(the folder GRPO loads, the adapter merged into it or None). An adapter folder is merged into its
    base and written to `output_dir/start/` once; a later run of the same adapter reuses it."""
    if not Path(start).is_dir() or not is_adapter_folder(start):
        return start, None
    adapter = Path(start)
    target = output_dir / START_DIR
    stamp = _fingerprint(adapter)
    marker = target / MERGED_FROM
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        log.info("grpo: starting from %s (%s merged into its base earlier)", target, adapter)
        return str(target), str(adapter)
    merge_adapter_into(adapter, target, trust_remote_code)
    marker.write_text(json.dumps(stamp))
    return str(target), str(adapter)


def merge_adapter_into(adapter: Path, target: Path, trust_remote_code: bool = False) -> None:
    """Load the adapter on its base (full precision on the CPU), merge it, and save model and tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = adapter_base(adapter)
    log.info("grpo: merging the adapter %s into %s, written to %s", adapter, base, target)
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    has_tokenizer = any(adapter.glob("tokenizer*"))
    tokenizer = AutoTokenizer.from_pretrained(
        adapter if has_tokenizer else base, trust_remote_code=trust_remote_code
    )
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))  # rows added with the vocabulary, saved in the adapter
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    target.mkdir(parents=True, exist_ok=True)
    (target / MERGED_FROM).unlink(missing_ok=True)  # the marker comes last: a killed save is redone
    dtype = getattr(merged.config, "dtype", None) or getattr(merged.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        merged = merged.to(dtype)  # saved in the base's own precision
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)

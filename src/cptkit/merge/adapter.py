"""A LoRA adapter folder read as plain tensors: the weight delta of every adapted module.

peft saves `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (Linear),
`<module>.lora_embedding_A` / `_B` (Embedding), full copies of `modules_to_save` under the module's own
name (and `<module>.modules_to_save.weight`), trained token rows (`trainable_token_indices`) as
`<module>.token_adapter.trainable_tokens_delta` (the rows' values, not a difference), and with
`save_embedding_layers` (peft sets it when the vocabulary was resized) copies of the base embedding and head
as training started from them: `<module>.base_layer.weight`, `.token_adapter.base_layer.weight`,
`.original_module.weight`, or a plain `<module>.weight` for an untouched resized head.
Reading the tensors directly (instead of `PeftModel.merge_and_unload`) is what lets the merge stream the
base one shard at a time instead of holding a whole model in memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cptkit.errors import CptkitError, load_refusals
from cptkit.merge.rows import TokenRows, token_indices
from cptkit.paths import CONFIG, RUN_META

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class LoraModule:
    """One adapted module: its A and B factors and the scale of B @ A."""

    name: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    embedding: bool = False
    fan_in_fan_out: bool = False

    @property
    def weight_key(self) -> str:
        return f"{self.name}.weight"

    def delta(self, device: torch.device | str = "cpu", times: float = 1.0) -> torch.Tensor:
        """times * scale * B @ A in float32, shaped like the base weight it is added to (`times` is
        merge.scale: 1 merges the update as trained)."""
        a = self.a.to(device, torch.float32)
        b = self.b.to(device, torch.float32)
        d = (b @ a) * (self.scale * times)  # (out, in); embeddings store (dim, vocab) this way round
        return d.T if (self.embedding or self.fan_in_fan_out) else d

    def delta_shape(self) -> tuple[int, int]:
        shape = (self.b.shape[0], self.a.shape[1])
        return (shape[1], shape[0]) if (self.embedding or self.fan_in_fan_out) else shape


@dataclass
class LoraAdapter:
    """An adapter folder: its peft config, its modules, and full tensors that replace base tensors."""

    folder: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)  # keyed by base weight key
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save, by base key
    token_rows: dict[str, TokenRows] = field(default_factory=dict)  # trained rows (trainable tokens), by key
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)  # the base tensors trained on, by key

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def read_adapter(folder: str | Path) -> LoraAdapter:
    """Read a peft LoRA adapter folder; refuse kinds whose merge is not a plain W += scale * B @ A."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CptkitError(f"{folder}: no such adapter folder; run `cptkit train` first or set merge.adapter")
    if not is_adapter_folder(folder):
        what = (
            "a full model (config.json), not an adapter: nothing to merge"
            if (folder / "config.json").is_file()
            else "not a LoRA adapter folder (no adapter_config.json)"
        )
        raise CptkitError(f"{folder}: {what}")
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise CptkitError(f"{folder}: peft_type {config.get('peft_type')}: only LoRA adapters can be merged")
    for flag, why in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if config.get(flag):
            raise CptkitError(
                f"{folder}: {why} adapters are not supported by the streaming merge; "
                "merge with peft's merge_and_unload instead"
            )
    tensors = _load_tensors(folder)
    adapter = LoraAdapter(folder=folder, config=config)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    embedding: set[str] = set()
    token_values: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        name = re.sub(r"\.default(?=\.|$)", "", name)  # some tools keep peft's adapter name
        name = re.sub(r"\.modules_to_save(?=\.weight$)", "", name)
        copy = re.sub(r"\.(token_adapter\.base_layer|base_layer|original_module)(?=\.weight$)", "", name)
        if copy != name:  # the base tensor as training started from it (resized when the vocabulary grew)
            adapter.base_copies[copy] = tensor
            continue
        if name.endswith(".token_adapter.trainable_tokens_delta"):
            token_values[name[: -len(".token_adapter.trainable_tokens_delta")]] = tensor
            continue
        for suffix, part, emb in (
            (".lora_A.weight", "a", False),
            (".lora_B.weight", "b", False),
            (".lora_embedding_A", "a", True),
            (".lora_embedding_B", "b", True),
        ):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                factors.setdefault(module, {})[part] = tensor
                if emb:
                    embedding.add(module)
                break
        else:
            if ".lora_" in name or name.endswith("lora_magnitude_vector"):
                raise CptkitError(f"{folder}: unexpected adapter tensor {key}; merge with peft instead")
            adapter.replacements[name] = tensor
    adapter.token_rows = _token_rows(folder, config, token_values)
    for module, parts in sorted(factors.items()):
        if set(parts) != {"a", "b"}:
            raise CptkitError(
                f"{folder}: module {module} has only lora_{'A' if 'a' in parts else 'B'}; the adapter is incomplete"
            )
        rank = parts["a"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        lm = LoraModule(
            module,
            parts["a"],
            parts["b"],
            float(scale),
            embedding=module in embedding,
            fan_in_fan_out=bool(config.get("fan_in_fan_out")) and module not in embedding,
        )
        adapter.modules[lm.weight_key] = lm
    if not adapter.modules and not adapter.replacements and not adapter.token_rows:
        raise CptkitError(f"{folder}: the adapter holds no LoRA weights")
    log.info(
        "adapter %s: %d LoRA modules, %d replaced tensors, %d with trained token rows",
        folder,
        len(adapter.modules),
        len(adapter.replacements),
        len(adapter.token_rows),
    )
    return adapter


def _token_rows(folder: Path, config: dict, values: dict[str, torch.Tensor]) -> dict[str, TokenRows]:
    """Each trained-token module's rows: its values with the indices the config names for it. A head tied
    to the input embedding is not named in the config; peft saves it with the embedding's rows, so it
    takes the config's one list of indices."""
    spec = config.get("trainable_token_indices") or []
    lists = list(spec.values()) if isinstance(spec, dict) else [spec]
    only = list(lists[0]) if len(lists) == 1 else None
    rows: dict[str, TokenRows] = {}
    for module, tensor in values.items():
        indices = token_indices(config, module) or only
        if indices is None or len(indices) != tensor.shape[0]:
            raise CptkitError(
                f"{folder}: {module} has {tensor.shape[0]} trained token rows but adapter_config.json's "
                f"trainable_token_indices names {len(indices or [])} for it; the adapter is inconsistent"
            )
        rows[f"{module}.weight"] = TokenRows(list(indices), tensor)
    return rows


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "adapter_model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(st)
    pt = folder / "adapter_model.bin"
    if pt.is_file():
        with load_refusals(f"merge.adapter: {pt}", None):
            return torch.load(pt, map_location="cpu", weights_only=True)
    raise CptkitError(
        f"{folder}: adapter_config.json but no adapter_model.safetensors: the adapter has no weights"
    )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank/alpha_pattern: a key matches a module whose name ends with it (as a regex)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def training_mode(adapter_dir: str | Path, fallback: str | None = None) -> tuple[str, dict[str, Any]]:
    """The mode (`lora`/`qlora`/`full`) and quantisation settings the adapter was trained with.

    Read from the train folder's run_meta.json, else its config.yaml; `fallback` when neither says.
    """
    folder = Path(adapter_dir)
    quant: dict[str, Any] = {}
    mode = None
    meta = folder / RUN_META
    if meta.is_file():
        data = json.loads(meta.read_text(encoding="utf-8"))
        mode = data.get("mode") or (data.get("train") or {}).get("mode")
        quant = data.get("quantization") or {}
    cfg = folder / CONFIG
    if cfg.is_file():
        import yaml

        train = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("train") or {}
        mode = mode or train.get("mode")
        quant = quant or train.get("quantization") or {}
    return (mode or fallback or "lora"), quant

"""The rows of the tokens `data.vocabulary` added: grow the input embeddings and the output head to the
extended vocabulary, start each new row at the mean of its base pieces' rows, and say which rows train.

A new token replaces a run of base tokens (its pieces), so the mean of their rows is a start the model
already half understands; random rows would cost the first steps relearning them (and a resize's
default, the mean of every row, gives all new tokens the same row). Input rows come from the input
matrix and output rows from the output matrix: in an untied model they are different spaces.
This runs on the loaded model before peft wraps it, and under QLoRA too (the embeddings and lm_head are
never quantised).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cptkit.config.train import NewTokensConfig
from cptkit.data.vocabulary_file import Vocabulary
from cptkit.errors import CptkitError

log = logging.getLogger(__name__)


def is_tied(model: Any) -> bool:
    """Whether the output head shares its weight with the input embeddings."""
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def check_rows_cover_base(rows: int, base_size: int, where: str) -> None:
    """Refuse a base whose embedding matrix is smaller than its tokenizer: some base ids have no row,
    and new ids after them would land on the wrong rows."""
    if rows < base_size:
        raise CptkitError(
            f"{where}: the base's embedding matrix has {rows} rows but its tokenizer {base_size} tokens; "
            "use the tokenizer that belongs to this model (data.tokenizer) and rerun `cptkit prepare`"
        )


def piece_means(matrix: torch.Tensor, vocabulary: Vocabulary) -> torch.Tensor:
    """One row per new token (in id order): the mean, in fp32, of its pieces' rows of `matrix`."""
    rows = [matrix[list(t.pieces)].float().mean(dim=0) for t in vocabulary.tokens]
    return torch.stack(rows) if rows else matrix.new_zeros((0, matrix.shape[1]), dtype=torch.float32)


def _noisy(
    means: torch.Tensor, base: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """means + N(0, (fraction * std of the base rows)^2), drawn on the CPU from `generator` (reproducible,
    the same on any device), then moved to the rows' device."""
    std = base.float().std().item()
    noise = torch.randn(means.shape, generator=generator, dtype=torch.float32) * (fraction * std)
    return means + noise.to(means.device)


@torch.no_grad()
def add_new_token_rows(model: Any, vocabulary: Vocabulary, cfg: NewTokensConfig, seed: int = 0) -> dict:
    """Resize `model` to `vocabulary.size` rows and fill every new input (and untied output) row from
    its pieces as `cfg.init` says. Returns what was done, for run_meta.json."""
    embed = model.get_input_embeddings()
    check_rows_cover_base(embed.weight.shape[0], vocabulary.base_size, "model.name_or_path")
    ids = vocabulary.new_ids
    if ids != list(range(vocabulary.base_size, vocabulary.size)):
        raise CptkitError(
            "vocabulary.json: the new token ids must run from base_size to size-1 in order; "
            "run `cptkit prepare --force`"
        )
    tied = is_tied(model)
    # pad_to_multiple_of is not used: rows past the tokenizer would be untrained ids a sampler could emit
    old_rows = embed.weight.shape[0]
    if old_rows > vocabulary.base_size:
        # the base had spare rows (a padded matrix): new ids must follow the tokenizer's, not the matrix
        log.info(
            "the base's embedding matrix has %d rows for %d tokens: the new tokens overwrite rows %d..",
            old_rows,
            vocabulary.base_size,
            vocabulary.base_size,
        )
    model.resize_token_embeddings(max(vocabulary.size, old_rows), mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    matrices = [("input", model.get_input_embeddings().weight)]
    if not tied and model.get_output_embeddings() is not None:
        matrices.append(("output", model.get_output_embeddings().weight))
    for _, weight in matrices:
        base = weight[: vocabulary.base_size]
        rows = piece_means(base, vocabulary)
        if cfg.init == "mean_noise" and len(ids):
            rows = _noisy(rows, base, cfg.noise, generator)
        weight[vocabulary.base_size : vocabulary.size] = rows.to(weight.dtype).to(weight.device)
    log.info(
        "new tokens: %d rows added (%s head), each the %s of its base pieces' rows",
        len(ids),
        "tied" if tied else "untied",
        "mean" if cfg.init == "mean" else f"mean + noise ({cfg.noise:g} of the base rows' std)",
    )
    return {"added": len(ids), "size": vocabulary.size, "tied": tied, "init": cfg.init}


def embedding_module_names(model: Any) -> dict[str, str]:
    """{"input": name, "output": name} of the input embeddings and (when present) lm_head, as peft's
    module keys (the last name component)."""
    names = {}
    for role, target in (("input", model.get_input_embeddings()), ("output", model.get_output_embeddings())):
        for name, module in model.named_modules():
            if target is not None and module is target:
                names[role] = name.split(".")[-1]
    return names


def trainable_token_indices(model: Any, vocabulary: Vocabulary) -> dict[str, list[int]]:
    """peft's `trainable_token_indices` for the new rows: the input embeddings, and the lm_head too
    when it is untied (peft follows a tied head by itself)."""
    names = embedding_module_names(model)
    indices = {names["input"]: vocabulary.new_ids}
    if not is_tied(model) and "output" in names:
        indices[names["output"]] = vocabulary.new_ids
    return indices


def freeze_base_rows(model: Any, base_size: int) -> list[Any]:
    """Full fine-tuning, new_tokens.train=new: zero the gradient of the base rows of the input
    embeddings and lm_head, so that only the new rows move (with no weight decay on them, which the
    Trainer's embedding group sees to, the base rows stay bit-identical). Returns the hook handles."""
    weights = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
    if model.get_output_embeddings() is not None:
        weights.setdefault(id(model.get_output_embeddings().weight), model.get_output_embeddings().weight)

    def zero_base(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:base_size] = 0
        return grad

    model._cptkit_frozen_base_rows = base_size  # read by the Trainer: no weight decay on these matrices
    return [w.register_hook(zero_base) for w in weights.values()]

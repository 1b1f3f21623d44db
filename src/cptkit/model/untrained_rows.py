"""Base embedding rows that look untrained yet occur in the training data (`train.untrained_rows`).

Released models carry rows their pretraining never updated: reserved tokens, ids the released data
never held. Such a row is zero or tiny (an initialisation shrunk by weight decay), or one of many
identical rows (a placeholder value written to all of them). A token with such a row that occurs in
the domain data starts training from nothing, which shows as loss spikes on those tokens; `report`
says which they are, `mean` starts them at the mean of the trained rows instead.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

NORM_FRACTION = 0.01  # a row whose norm is below this fraction of the median row norm looks untrained
DUPLICATES = 4  # a row identical to at least this many other rows looks untrained
SAMPLE_TOKENS = 256_000_000  # training tokens counted at most (bounding the time: about a second per 100M)
WINDOWS = 64  # a larger store is counted in this many evenly spaced windows
CHUNK_TOKENS = 16_000_000  # tokens read at once while counting (bounded memory)
COUNT_ROWS = 20_000  # rows counted where there is no token store (the first ones: prepare shuffled them)
CHUNK_ROWS = 256
CHUNK_ROWS_NORM = 8192  # embedding rows read at once while looking for untrained ones
EXAMPLES = 10


@torch.no_grad()
def suspect_rows(weight: torch.Tensor, base_size: int) -> torch.Tensor:
    """Ids below `base_size` whose row of `weight` looks untrained: norm below NORM_FRACTION of the
    median row norm, or exactly equal to DUPLICATES or more other rows. Bool mask of `base_size`."""
    base = weight[:base_size]
    # rows equal everywhere project equally on any direction; a random projection groups them in
    # O(rows) memory, and the candidates are then compared exactly. Both read CHUNK_ROWS_NORM rows at a
    # time, so no fp32 copy of a whole 128k-row matrix is made.
    direction = torch.randn(base.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    direction = direction.to(base.device)
    norms, keys = [], []
    for start in range(0, base_size, CHUNK_ROWS_NORM):
        part = base[start : start + CHUNK_ROWS_NORM].double()
        norms.append(part.norm(dim=1))
        keys.append(part @ direction)
    norms, keys = torch.cat(norms), torch.cat(keys)
    low = norms < NORM_FRACTION * norms.median()
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    candidates = counts[inverse] > DUPLICATES
    duplicated = torch.zeros_like(low)
    for key in torch.unique(inverse[candidates]).tolist():
        ids = (inverse == key).nonzero().flatten()
        same = (base[ids] == base[ids[0]]).all(dim=1)
        if int(same.sum()) > DUPLICATES:
            duplicated[ids[same]] = True
    return low | duplicated


def token_counts(rows: Any, vocab_size: int, sample_tokens: int = SAMPLE_TOKENS) -> tuple[np.ndarray, str]:
    """How often each id occurs in the training data, and what was counted. From the token store
    (`PackedRows.space`): every token when it holds at most `sample_tokens`, else WINDOWS evenly spaced
    windows of `sample_tokens` in all (the store lies source after source: windows see each one); read
    a window at a time, so memory stays bounded. Other row sets: their first COUNT_ROWS rows."""
    counts = np.zeros(vocab_size, dtype=np.int64)

    def add(ids: np.ndarray) -> None:
        ids = ids.astype(np.int64, copy=False).ravel()
        counts[:] += np.bincount(ids[(ids >= 0) & (ids < vocab_size)], minlength=vocab_size)[:vocab_size]

    space = getattr(rows, "space", None)
    if space is not None:
        total = space.num_tokens
        if total <= sample_tokens:
            for start in range(0, total, CHUNK_TOKENS):
                add(space.gather(start, min(CHUNK_TOKENS, total - start)))
            return counts, f"all {total:,} training tokens"
        window = sample_tokens // WINDOWS
        for start in np.linspace(0, total - window, WINDOWS).astype(np.int64):
            add(space.gather(int(start), window))
        return counts, f"{WINDOWS * window:,} of {total:,} training tokens ({WINDOWS} evenly spaced windows)"
    counted = min(len(rows), COUNT_ROWS)
    for start in range(0, counted, CHUNK_ROWS):
        batch = rows.__getitems__(list(range(start, min(start + CHUNK_ROWS, counted))))
        add(np.concatenate([np.asarray(r["input_ids"]).ravel() for r in batch]))
    return counts, f"the first {counted:,} of {len(rows):,} training rows"


def _matrices(model: Any) -> list[tuple[str, torch.Tensor]]:
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is None or out.weight is embed:
        return [("input embeddings", embed)]
    return [("input embeddings", embed), ("lm_head", out.weight)]


@torch.no_grad()
def check_untrained_rows(
    model: Any, tokenizer: Any, rows: Any, base_size: int, action: str = "report"
) -> dict:
    """Find the base rows that look untrained and occur in `rows`; log them; with `action` mean, set
    each to the mean of the trained rows of its matrix. Returns the record for run_meta.json."""
    counts, counted = token_counts(rows, base_size)
    occurs = torch.from_numpy(counts > 0)
    record: dict[str, Any] = {"counted": counted, "action": action}
    for name, weight in _matrices(model):
        suspect = suspect_rows(weight, base_size).cpu()
        found = (suspect & occurs).nonzero().flatten()
        entry = {"looks_untrained": int(suspect.sum()), "in_data": int(found.numel())}
        if found.numel():
            order = sorted(found.tolist(), key=lambda i: -int(counts[i]))
            examples = [[i, tokenizer.convert_ids_to_tokens(i), int(counts[i])] for i in order[:EXAMPLES]]
            entry["examples"] = examples  # [id, token, occurrences]
            log.warning(
                "%s: %d base rows look untrained (tiny or duplicated) yet occur in the training data "
                "(%s counted), e.g. %s; %s",
                name,
                found.numel(),
                counted,
                ", ".join(f"{i} {t!r} x{c}" for i, t, c in examples[:5]),
                "set to the mean of the trained rows"
                if action == "mean"
                else "train.untrained_rows: mean starts them at the mean of the trained rows",
            )
            if action == "mean":
                trained = ~suspect.to(weight.device)
                mean = weight[:base_size][trained].float().mean(dim=0)
                weight[found.to(weight.device)] = mean.to(weight.dtype)
        record[name] = entry
    return record

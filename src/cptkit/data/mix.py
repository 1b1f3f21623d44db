"""Mixing sources by token weight, by repeating or dropping whole segments.

Weights are normalised to shares. With `mix: downsample` (the default) nothing is repeated: the
total is the largest one every source can supply at its share, min_i(available_i / share_i), so the
source that binds the ratio keeps all its tokens and the others give up whole segments. With
`mix: upsample` nothing is dropped: the total is max_i(available_i / share_i) and the other sources
repeat whole segments. Which segments go or repeat is a seeded random choice.
"""

from __future__ import annotations

import numpy as np


def sampling_factors(available: dict[str, int], weights: dict[str, float], policy: str) -> dict[str, float]:
    """target_tokens / available_tokens for each source (0 for a weight-0 source)."""
    total_weight = sum(w for w in weights.values() if w > 0)
    shares = {name: w / total_weight for name, w in weights.items()}
    reach = [available[n] / s for n, s in shares.items() if s > 0 and available[n] > 0]
    if not reach:
        return {n: 0.0 for n in available}
    total = min(reach) if policy == "downsample" else max(reach)
    return {n: (shares[n] * total / available[n] if available[n] > 0 else 0.0) for n in available}


def sample(lengths: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of segments (repeats allowed) whose total length is as close as possible to factor * sum."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0 or factor <= 0:
        return np.empty(0, dtype=np.int64)
    if abs(factor - 1.0) < 1e-12:
        return np.arange(n)
    whole = int(np.floor(factor + 1e-12))
    picked = [np.tile(np.arange(n), whole)] if whole else []
    target = (factor - whole) * lengths.sum()
    if target > 0:
        order = rng.permutation(n)
        cum = np.cumsum(lengths[order])
        k = int(np.searchsorted(cum, target))
        if k < n and (k == 0 or abs(cum[k] - target) < abs(cum[k - 1] - target)):
            k += 1  # one more segment lands closer to the target
        picked.append(order[:k])
    return np.concatenate(picked) if picked else np.empty(0, dtype=np.int64)


def mix_warning(
    train_tokens: dict[str, int], mixed_tokens: dict[str, int], weights: dict[str, float], policy: str
) -> str | None:
    """What to tell the user when `mix: downsample` keeps less than half of the training tokens (every
    source cut to what the scarcest one supplies at its weight), with the settings that keep them."""
    available, kept = sum(train_tokens.values()), sum(mixed_tokens.values())
    if policy != "downsample" or available == 0 or kept >= available / 2:
        return None
    trained = {n: t for n, t in train_tokens.items() if weights.get(n, 0) > 0}
    sizes = ", ".join(f"{n}: {t / available:.3g}" for n, t in trained.items())
    return (
        f"the mix keeps {kept:,} of {available:,} training tokens ({kept / available:.1%}): mix: downsample "
        "cuts every source to what the scarcest one supplies at its weight. To keep them, set "
        f"data.mix: upsample (repeats segments instead), or weights proportional to the sources' sizes ({sizes})"
    )

"""The training rows of a prepared folder read by the contract alone (train/index.json, the raw .bin
arrays, the listed store files read with pyarrow), independent of `cptkit.data.view`: what tests compare
the writer and the view against."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def train_index(prepared: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """train/index.json and its arrays (name -> numpy array of the listed dtype)."""
    train = Path(prepared) / "train"
    index = json.loads((train / "index.json").read_text(encoding="utf-8"))
    arrays = {
        name: np.fromfile(train / f"{name}.bin", dtype=np.dtype(dtype))
        for name, dtype in index["arrays"].items()
    }
    return index, arrays


def token_space(prepared: str | Path, index: dict) -> np.ndarray:
    """The listed store files' input_ids values end to end, record batch by record batch (a copy)."""
    import pyarrow as pa

    values = []
    for shard in index["shards"]:
        with pa.memory_map(str(Path(prepared) / shard["path"])) as source:
            table = pa.ipc.open_file(source).read_all()
        ids = [c.flatten().to_numpy(zero_copy_only=False) for c in table.column("input_ids").chunks]
        values.append(np.concatenate(ids) if ids else np.empty(0, np.int32))
        assert len(values[-1]) == shard["tokens"], shard["path"]
    return np.concatenate(values) if values else np.empty(0, np.int32)


def read_rows(prepared: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each training row as (input_ids, position_ids, source_ids): row r is the segments
    row_offsets[r]:row_offsets[r + 1] end to end, position ids counting from 0 in each, one source id each."""
    index, arrays = train_index(prepared)
    assert index["format"] == 3
    tokens = token_space(prepared, index)
    bounds, starts = arrays["row_offsets"], arrays["segment_starts"]
    lengths, sources = arrays["segment_lengths"], arrays["segment_sources"]
    assert len(bounds) == index["rows"] + 1 and bounds[0] == 0 and bounds[-1] == index["segments"]
    assert len(starts) == len(lengths) == len(sources) == index["segments"]
    for r in range(index["rows"]):
        segs = range(int(bounds[r]), int(bounds[r + 1]))
        yield (
            np.concatenate([tokens[starts[k] : starts[k] + lengths[k]] for k in segs]),
            np.concatenate([np.arange(lengths[k]) for k in segs]),
            sources[bounds[r] : bounds[r + 1]],
        )


def train_lists(prepared: str | Path) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The rows' input_ids, position_ids and source_ids as lists of lists (as `datasets` columns read)."""
    ids, pos, src = [], [], []
    for i, p, s in read_rows(prepared):
        ids.append(i.tolist())
        pos.append(p.tolist())
        src.append(s.tolist())
    return ids, pos, src

"""The calibration table `bench/` measures and cptkit ships (`presets/calibration.json`): tokens/s, MFU
and peak memory of training runs on one GPU, and the prediction of a run's speed from its closest row.

The prediction carries MFU over: the row's MFU x the target GPU's peak / the run's FLOPs per token.
MFU transfers between sizes and GPUs only roughly (a smaller GPU, another memory bandwidth, another
kernel mix), so a prediction always names its row and says when the GPU differs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptkit import presets
from cptkit.errors import CptkitError

CALIBRATION = "calibration.json"
CHECKPOINTING_KINDS = ("none", "some", "all", "offload")


@dataclass(frozen=True)
class CalibrationRow:
    """One measured run (the table's row as `bench/train.py` writes it)."""

    variant: str
    mode: str
    params: int
    seq_length: int
    micro_batch: int
    checkpointing: str
    fast_lora: bool
    tokens_per_second: float
    mfu: float
    peak_gib: float
    dropout: float | None = None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> CalibrationRow:
        return cls(**{k: row.get(k) for k in cls.__dataclass_fields__ if k in row or k == "dropout"})

    def describe(self) -> str:
        return (
            f"{self.variant} ({self.mode}, checkpointing {self.checkpointing}, {self.params / 1e9:.1f}B, "
            f"{self.seq_length} x {self.micro_batch}: {self.tokens_per_second:,.0f} tokens/s, MFU {self.mfu:.1%})"
        )


@dataclass(frozen=True)
class Calibration:
    """The table: where and when it was measured, and its rows."""

    measured: str
    device: str
    versions: dict[str, str]
    rows: tuple[CalibrationRow, ...]
    path: Path

    @classmethod
    def load(cls, path: str | Path | None = None) -> Calibration:
        """The shipped table, or the one at `path`; a CptkitError naming the file when it is unreadable."""
        path = Path(path) if path is not None else presets.folder() / CALIBRATION
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            rows = tuple(CalibrationRow.from_json(r) for r in table["rows"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CptkitError(
                f"{path}: not a calibration table ({e}); `python bench/train.py` writes one"
            ) from None
        return cls(
            table.get("measured", "?"), table.get("device", "?"), table.get("versions", {}), rows, path
        )

    def closest(self, mode: str, checkpointing: str, params: int, dropout: float) -> CalibrationRow | None:
        """cptkit's own row of the same mode and checkpointing kind nearest in size (then sequence
        length, then dropout); None when the table has none of that mode and kind."""
        same = [
            r
            for r in self.rows
            if r.variant.startswith("cptkit") and r.mode == mode and r.checkpointing == checkpointing
        ]
        if not same:
            return None
        return min(
            same,
            key=lambda r: (
                abs(math.log(r.params / params)) if r.params and params else 0.0,
                abs((r.dropout or 0.0) - dropout),
                -r.tokens_per_second,
            ),
        )

"""What packing in windows of `data.pack_window` segments costs against packing all segments at once.

    python bench/pack_windows.py            # two log-normal length distributions, windows 1<<10 .. 1<<16

Document lengths (tokens) are drawn log-normal (seeded), cut into segments of at most 2048 tokens as
`chunking: packing` cuts them, and packed best-fit by `cptkit.data.pack.compare_packing`: in shuffled
windows and all at once. Prints a table and writes bench/results/pack_windows.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cptkit.data.chunk import windows
from cptkit.data.pack import compare_packing

HERE = Path(__file__).resolve().parent
DISTRIBUTIONS = {  # name -> (median document tokens, sigma of the log)
    "lognormal-600-1.2": (600, 1.2),
    "lognormal-1500-1.0": (1500, 1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--documents", type=int, default=300_000)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--windows", type=int, nargs="+", default=[1 << 10, 1 << 12, 1 << 14, 1 << 16])
    ap.add_argument("--out", default=str(HERE / "results" / "pack_windows.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    print(
        f"{'lengths':<20} {'segments':>9} {'window':>7} {'windows':>7} {'windowed':>9} {'all':>9} {'loss':>8}"
    )
    for name, (median, sigma) in DISTRIBUTIONS.items():
        docs = rng.lognormal(np.log(median), sigma, args.documents).astype(np.int64) + 1
        segments = windows(docs, args.seq_length)[2]
        for window in args.windows:
            start = time.perf_counter()
            c = compare_packing(segments, args.seq_length, window)
            results.append(
                {
                    "lengths": name,
                    "documents": args.documents,
                    "segments": len(segments),
                    "seq_length": args.seq_length,
                    "window": window,
                    "windows": c.windows,
                    "windowed_efficiency": round(c.windowed, 6),
                    "all_at_once_efficiency": round(c.all_at_once, 6),
                    "loss": round(c.loss, 6),
                    "seconds": round(time.perf_counter() - start, 2),
                }
            )
            print(
                f"{name:<20} {len(segments):>9,} {window:>7,} {c.windows:>7} {c.windowed:>9.6f} "
                f"{c.all_at_once:>9.6f} {c.loss:>8.4%}"
            )
    Path(args.out).write_text(
        json.dumps({"purpose": __doc__.splitlines()[0], "runs": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()

"""`cptkit config CONFIG.yaml [overrides]`: validate a config and print it as cptkit resolved it.

Every default filled in, a preset name expanded to its file's settings, the overrides applied, then the
folders each stage reads and writes (`paths:`, as in every output's config.yaml, which loading skips, so
the printed text runs as the original). Exit code 0, or 2 with every problem of the file listed."""

from __future__ import annotations

import sys

from cptkit.commands import load_for
from cptkit.config import Config, dump_yaml
from cptkit.paths import RECORD_KEY, resolve
from cptkit.train.optional import refusals_for_missing_packages


def main(args) -> int:
    cfg = load_for(args)
    sys.stdout.write(resolved(cfg))
    for note in refusals_for_missing_packages(cfg):
        print(f"note: {note}", file=sys.stderr)
    return 0


def resolved(cfg: Config) -> str:
    """The config as cptkit reads it, then the folders its stages use."""
    paths = dump_yaml({RECORD_KEY: resolve(cfg).to_record()})
    return f"{dump_yaml(cfg)}# where each stage reads and writes, as resolved (skipped when loaded)\n{paths}"

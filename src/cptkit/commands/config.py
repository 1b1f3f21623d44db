"""`cptkit config CONFIG.yaml [overrides]`: validate a config and print it as cptkit resolved it.

Every default filled in, a preset name expanded to its file's settings, the overrides applied, then the
folders each stage reads and writes (`paths:`, as in every output's config.yaml, which loading skips, so
the printed text runs as the original). Exit code 0, or 2 with every problem of the file listed."""

from __future__ import annotations

import sys

from cptkit.commands import load_for
from cptkit.config import Config, dump_yaml
from cptkit.paths import RECORD_KEY, resolve


def main(args) -> int:
    cfg = load_for(args)
    sys.stdout.write(resolved(cfg))
    for note in missing_packages(cfg):
        print(f"note: {note}", file=sys.stderr)
    return 0


def resolved(cfg: Config) -> str:
    """The config as cptkit reads it, then the folders its stages use."""
    paths = dump_yaml({RECORD_KEY: resolve(cfg).to_record()})
    return f"{dump_yaml(cfg)}# where each stage reads and writes, as resolved (skipped when loaded)\n{paths}"


def missing_packages(cfg: Config) -> list[str]:
    """What `cptkit train` / `cptkit sft` would refuse on this machine for want of an optional package."""
    from cptkit.errors import CptkitError
    from cptkit.train.optional import check_optional_dependencies

    notes = []
    for section, run in (("train", cfg.train), ("sft", cfg.sft)):
        if run is None:
            continue
        try:
            check_optional_dependencies(run, cfg.model, section)
        except CptkitError as e:
            notes.append(str(e))
    return notes

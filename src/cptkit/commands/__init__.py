"""One module per CLI command; each exposes `main(args)` and reads top to bottom."""

from __future__ import annotations

from cptkit.config import Config, load_config
from cptkit.errors import CptkitError


def load_for(args, *sections: str) -> Config:
    """Load the config of a config command and check that the sections it needs are there.

    `args.config` is a YAML path or the name of a shipped preset (`python -m cptkit.presets` lists them).
    """
    from cptkit.presets import resolve

    cfg = load_config(Config, resolve(args.config), args.overrides)
    missing = [s for s in sections if getattr(cfg, s) is None]
    if missing:
        raise CptkitError(
            f"{args.config}: `cptkit {args.command}` needs the section(s) {', '.join(missing)}; "
            "see configs/ for examples"
        )
    return cfg

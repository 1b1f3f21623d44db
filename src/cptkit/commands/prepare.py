"""`cptkit prepare CONFIG.yaml`: raw corpora -> tokenized, chunked, mixed, packed dataset + held-out sets.

The pipeline is `cptkit.data.prepare.prepare`; this command loads the config, runs it into the
prepare stage's folder and prints what it made. One machine of several (`data.executor.local_tasks`)
that finished its share before the others prints what is done and exits 0: nothing to assemble yet.
"""

from __future__ import annotations

from typing import Any

from cptkit.config import Config


def main(args) -> int:
    from cptkit.commands import load_for
    from cptkit.data.executors import ShareDone
    from cptkit.data.summary import print_summary

    cfg = load_for(args, "data")
    try:
        manifest = run(cfg, force=getattr(args, "force", False))
    except ShareDone as done:
        print(done)
        return 0
    print_summary(manifest)
    return 0


def run(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Prepare `cfg.data` into the run's prepare folder (its config.yaml records `cfg`); returns the manifest.
    Self-replay sources without a model of their own are written by the base model (model.name_or_path)."""
    from cptkit.data.prepare import prepare
    from cptkit.data.self_replay import with_default_model
    from cptkit.paths import resolve

    data = with_default_model(cfg.data, cfg.model.name_or_path if cfg.model else None)
    return prepare(data, resolve(cfg).folder("prepare"), force=force, config=cfg).manifest

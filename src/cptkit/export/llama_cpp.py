"""The check in llama.cpp itself, where llama-cpp-python is installed: evaluate the same tokens as the
round-trip check and compare the logits and top-1 predictions with the HF model's.

llama.cpp runs in a child process (`python -m cptkit.export.llama_cpp`): a file it cannot take makes it
abort the whole process (a C++ exception or an assertion, no Python error), and that must become a failed
check in export_report.json with llama.cpp's own message, not a dead `cptkit export`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from cptkit.export.verify import compare_logits

# top-1 agreement with the HF model that llama.cpp must reach, per type: measured 100% / 99.9% / 99.6%
# on SmolLM2-135M-Instruct and at least 99.6% / 98.0% / 93.8% on the tiny random test models (README
# "Export and serving")
TOP1_BAR = {"f16": 0.99, "bf16": 0.97, "q8_0": 0.90}


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_check(
    gguf_path: Path, text: str, ids: list[int], reference: torch.Tensor, type_name: str
) -> dict[str, Any] | None:
    """The llama_cpp entry of export_report.json, or None when llama_cpp is not importable: logits on the
    HF token ids, whether llama.cpp's own tokenizer gives those ids for the text, and `passed` (top-1
    agreement at least TOP1_BAR[type] and the same token ids); `error` when llama.cpp failed."""
    if not llama_cpp_available():
        return None
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="cptkit-llama-cpp-") as tmp:
        work = Path(tmp)
        (work / "input.json").write_text(json.dumps({"text": text, "ids": ids}), encoding="utf-8")
        child = subprocess.run(
            [sys.executable, "-m", "cptkit.export.llama_cpp", str(gguf_path), str(work)],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0:
            return {"tokens": len(ids), "passed": False, "error": _failure(child)}
        logits = torch.from_numpy(np.load(work / "logits.npy"))
        own_ids = json.loads((work / "ids.json").read_text(encoding="utf-8"))
    same = own_ids[: len(ids)] == ids
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, own_ids, strict=False)) if a != b), None)
    compared = compare_logits(reference, logits)
    return {
        "tokens": len(ids),
        **compared,
        "tokenizer_ids_equal": same,
        "tokenizer_first_difference": first_diff,
        "top1_bar": TOP1_BAR[type_name],
        "passed": same and compared["top1_agreement"] >= TOP1_BAR[type_name],
    }


def _failure(child: subprocess.CompletedProcess) -> str:
    """What llama.cpp said before it stopped: its last lines of output, and the signal or exit code."""
    lines = [line for line in (child.stderr or "").splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("/", "[0x"))][-3:]  # not the backtrace frames
    how = f"signal {-child.returncode}" if child.returncode < 0 else f"exit code {child.returncode}"
    return f"llama.cpp stopped ({how}): {' | '.join(said) or 'no message'}"


def _evaluate(gguf_path: str, work: Path) -> None:
    """In the child: tokenize the text, evaluate the ids, write logits.npy and ids.json into `work`."""
    import numpy as np
    from llama_cpp import Llama

    given = json.loads((work / "input.json").read_text(encoding="utf-8"))
    ids = given["ids"]
    llm = Llama(model_path=gguf_path, logits_all=True, n_ctx=max(len(ids), 16), verbose=False)
    own_ids = llm.tokenize(given["text"].encode("utf-8"), add_bos=ids[:1] == [llm.token_bos()], special=False)
    llm.eval(ids)
    np.save(work / "logits.npy", np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    (work / "ids.json").write_text(json.dumps(own_ids), encoding="utf-8")


if __name__ == "__main__":
    _evaluate(sys.argv[1], Path(sys.argv[2]))

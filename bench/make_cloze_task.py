"""Write a multiple-choice cloze task for lm-eval from local text: "which sentence comes next?".

Each question is a few consecutive sentences of a document and four candidate next sentences: the
one that follows in the document and three of similar length drawn from other documents of the same
corpus. A model that knows the language (and the corpus's style) prefers the original; chance is 25%.
The task is scored by log-likelihood (acc, and acc_norm, which divides by the candidate's length), so
it measures general ability without generation, and is deterministic by seed.

    python bench/make_cloze_task.py --out bench/results/cloze            # from the shared general corpora
    python bench/make_cloze_task.py --out tasks/cloze --count 400 --tail 0.1 --seed 1 \\
        --corpus ../shared/corpora/austen.jsonl.gz --corpus ../shared/corpora/kjv_bible.jsonl.gz

writes OUT/<name>.yaml and OUT/<name>.jsonl; use it as
    eval: {tasks: [{name: general_cloze, include: OUT}]}
`--tail 0.1` takes the questions from the last 10% of each document only, so the text before it can be
trained on (or held out) without the task's sentences. Runs on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/corpora"
DEFAULT_CORPORA = [SHARED / "austen.jsonl.gz", SHARED / "kjv_bible.jsonl.gz"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")

TASK_YAML = """\
# Multiple-choice cloze from {sources}: which of four sentences follows the context.
# Written by bench/make_cloze_task.py (seed {seed}, {count} questions); data_files are read from
# this file's folder when cptkit runs the task.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {name}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)[text_field] for line in f if line.strip()]


def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The document's sentences in order (whitespace joined); headings, fragments and long runs are
    kept as None so that the context stays consecutive around them."""
    flat = re.sub(r"\s+", " ", text).strip()
    out = []
    for s in _SENTENCE_END.split(flat):
        words = s.split()
        usable = min_words <= len(words) <= max_words and not s.isupper() and s[-1] in ".!?\"'"
        out.append(s if usable else None)
    return out


def questions(
    corpus: list[str], count: int, rng: random.Random, context: int, choices: int, tail: float
) -> list[dict]:
    """Up to `count` questions from one corpus (a list of documents)."""
    docs = [sentences(d[int(len(d) * (1 - tail)) :]) for d in corpus]
    starts = [
        (d, i)
        for d, sents in enumerate(docs)
        for i in range(0, len(sents) - context, context + 1)
        if all(sents[i : i + context + 1])
    ]
    rng.shuffle(starts)
    out = []
    for d, i in starts:
        if len(out) == count:
            break
        answer = docs[d][i + context]
        others = _similar(docs, d, len(answer.split()), choices - 1, rng)
        if len(others) < choices - 1:
            continue
        position = rng.randrange(choices)
        options = others[:position] + [answer] + others[position:]
        out.append({"context": " ".join(docs[d][i : i + context]), "choices": options, "answer": position})
    return out


def _similar(docs: list[list[str | None]], skip: int, words: int, n: int, rng: random.Random) -> list[str]:
    """`n` sentences of other documents within 30% of `words` words (a few draws, then what was found)."""
    found: list[str] = []
    candidates = [d for d in range(len(docs)) if d != skip and any(docs[d])]
    for _ in range(50 * n):
        if len(found) == n or not candidates:
            break
        s = rng.choice(docs[rng.choice(candidates)])
        if s and abs(len(s.split()) - words) <= 0.3 * words and s not in found:
            found.append(s)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.yaml and NAME.jsonl")
    p.add_argument("--name", default="general_cloze", help="lm-eval task name")
    p.add_argument("--corpus", type=Path, action="append", help="JSONL(.gz) with a text field (repeatable)")
    p.add_argument("--count", type=int, default=200, help="questions in all, shared among the corpora")
    p.add_argument("--context", type=int, default=2, help="sentences of context per question")
    p.add_argument("--choices", type=int, default=4, help="candidates per question")
    p.add_argument("--tail", type=float, default=1.0, help="use only this last fraction of each document")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.tail <= 1 or args.count < 1 or args.choices < 2 or args.context < 1:
        p.error("need 0 < --tail <= 1, --count >= 1, --choices >= 2, --context >= 1")
    corpora = args.corpus or DEFAULT_CORPORA
    rng = random.Random(args.seed)
    rows = []
    for k, path in enumerate(corpora):
        share = args.count // len(corpora) + (k < args.count % len(corpora))
        made = questions(read_documents(path), share, rng, args.context, args.choices, args.tail)
        rows += [{**q, "source": path.name.split(".")[0]} for q in made]
        print(f"{path.name}: {len(made)} questions")
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"{args.name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sources = ", ".join(p.name for p in corpora)
    (args.out / f"{args.name}.yaml").write_text(
        TASK_YAML.format(name=args.name, seed=args.seed, count=len(rows), sources=sources), encoding="utf-8"
    )
    print(f"{len(rows)} questions: {data} and {args.out / (args.name + '.yaml')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

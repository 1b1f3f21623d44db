"""Build the corpus of the prepare scale benchmark: distinct real documents at 1x, 4x, 16x a base.

    python bench/scale_corpus.py                          # /work/scale/corpus: 1x, 4x, 16x of ~195 MB
    python bench/scale_corpus.py --multiples 1 4 --base-mb 50 --out /tmp/corpus

The base is real text the machine has: the domain corpora of ../shared/corpora (PostgreSQL and SQLite
docs), Python's pydoc topics and standard-library docstrings, and the Debian documentation packages
(install them first: `apt-get install manpages-dev python3.11-doc linux-doc-6.1 perl-doc git-doc
python-django-doc debian-reference-en debian-policy python-sqlalchemy-doc sphinx-doc cmake-doc vim-doc
python-scipy-doc gnuplot-doc octave-doc`; a missing one is skipped and named): Python's and the kernel's
reStructuredText sources, git's guides, perl's pods, GNU info nodes, Django's and the Debian reference's
HTML pages, the Debian policy's, SQLAlchemy's, Sphinx's and CMake's sources, vim's help, SciPy's and
gnuplot's HTML pages, the man pages and the packages' changelogs, in that order until `--base-mb` of
text. Markup is taken off roughly (groff requests and escapes, pod codes, HTML tags); the text is what
a reader of the page reads. Each document is kept once (exact copies across packages dropped).

At K x, copy 0 of every document is the base document and copy k > 0 is the same document recombined:
its paragraphs in a seeded order, the sentences (or lines) of each paragraph too, and paragraphs of
other documents put in (30% of its length, at most 1,000 characters: a copy is a little longer than
its document, so K x holds a little more than K times the base). No two documents are equal (exact
dedup keeps them all) and the word 5-grams that a copy shares with another copy of its document are
few enough that near dedup at 0.8 keeps them too (`--check` measures that on a sample). Copy k is the same at every K, so each copy is written
once (OUT/copies/) and the K x folder holds hard links to the files of copies 0 to K-1.

Writes OUT/general/ (Austen and the KJV bible from ../shared/corpora, as they are: the small general
source), OUT/<K>x/domain-<copy>-<part>.jsonl.gz (one JSON object with `text` a line, about
`--shard-mb` of text each) and OUT/corpus.json (text bytes and documents per folder and per origin).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html.parser
import json
import os
import random
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "corpora"
DOC = Path("/usr/share/doc")
GENERAL = ("austen", "kjv_bible")  # the general source; everything else of ../shared/corpora is domain
MIN_CHARS = 200  # shorter pieces (a man page that only points to another, an empty node) are no documents


# --- the base: where real text comes from ----------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError):
        return None


def _files(pattern_root: Path, *patterns: str) -> list[Path]:
    return sorted({p for pat in patterns for p in pattern_root.glob(pat) if p.is_file()})


def shared_domain() -> Iterator[str]:
    for f in sorted(SHARED.glob("*.jsonl.gz")):
        if f.name.split(".")[0] not in GENERAL:
            yield from (json.loads(line)["text"] for line in gzip.open(f, "rt"))


def pydoc_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    yield from (topics[name] for name in sorted(topics))


def stdlib_docstrings() -> Iterator[str]:
    """One document per standard-library module: its docstring, then each class's and function's."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages", "test", "idlelib") or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [f"{'.'.join(rel.with_suffix('').parts)}\n\n{ast.get_docstring(tree) or ''}"]
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"{node.name}\n{doc}")
        yield "\n\n".join(parts)


def text_files(root: Path, *patterns: str) -> Callable[[], Iterator[str]]:
    def read() -> Iterator[str]:
        yield from filter(None, map(_read, _files(root, *patterns)))

    return read


_POD_MARKUP = re.compile(r"[BICFLSEXZ]<+\s*([^<>]*?)\s*>+")


def perl_pods() -> Iterator[str]:
    for f in _files(Path("/usr/share/perl"), "*/pod/*.pod"):
        text = _read(f)
        if text:
            text = re.sub(r"^=(?:head\d|item)\s*", "", text, flags=re.M)
            text = re.sub(r"^=\w+.*$", "", text, flags=re.M)
            yield _POD_MARKUP.sub(r"\1", text)


def info_nodes() -> Iterator[str]:
    """GNU info manuals, one document per node (the node's header line dropped)."""
    for f in _files(Path("/usr/share/info"), "*.info*.gz"):
        if f.name.startswith("python"):  # the Python docs again, already read as reStructuredText
            continue
        for node in (_read(f) or "").split("\x1f"):
            yield node.partition("\n")[2] if node.lstrip().startswith("File:") else node


class _HtmlText(html.parser.HTMLParser):
    """The text of a page, a line break at each block element, without scripts, styles and sidebars."""

    SKIP = {"script", "style", "head", "nav"}
    BLOCKS = {"p", "div", "li", "pre", "tr", "h1", "h2", "h3", "h4", "h5", "dt", "dd", "br", "table"}

    def __init__(self) -> None:
        super().__init__()
        self.out: list[str] = []
        self.skipping: list[str] = []

    def handle_starttag(self, tag, attrs):
        cls = dict(attrs).get("class") or ""
        if tag in self.SKIP or "sphinxsidebar" in cls or "related" in cls or self.skipping:
            if tag not in ("br", "img", "meta", "link", "input", "hr"):
                self.skipping.append(tag)
        elif tag in self.BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if self.skipping and self.skipping[-1] == tag:
            self.skipping.pop()
        elif tag in self.BLOCKS:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.out.append(data)


def html_pages(root: Path, pattern: str) -> Callable[[], Iterator[str]]:
    def read() -> Iterator[str]:
        for f in _files(root, pattern):
            if f.name in ("genindex.html", "search.html", "py-modindex.html") or "_modules" in f.parts:
                continue
            parser = _HtmlText()
            parser.feed(_read(f) or "")
            yield re.sub(r"\n\s*\n\s*", "\n\n", "".join(parser.out))

    return read


_GROFF_CHARS = {"em": "-", "en": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"', "bu": "*", "co": "(C)"}
_GROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|\*(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|n(?:\(..|.)|(.))"
)
_GROFF_DROP = {"&", "|", "^", "c", "%", ",", "/", ":", "}", "{"}
_GROFF_HEADINGS = {"SH", "SS"}
_GROFF_TEXT = {"B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TH", "Nm", "Nd", "Sh"}


def _groff_escape(m: re.Match) -> str:
    name = m.group(1) or m.group(2)
    if name is not None:
        return _GROFF_CHARS.get(name, "")
    char = m.group(3)
    if char is None or char in _GROFF_DROP:
        return ""
    return {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " ", "t": "\t"}.get(char, char)


def groff_text(source: str) -> str | None:
    """The readable text of a man page's groff source (None for a page that only includes another)."""
    out: list[str] = []
    for line in source.splitlines():
        if line.startswith((".so ", '.\\"', "'\\\"", '.\\"')):
            if line.startswith(".so "):
                return None
            continue
        if line.startswith((".", "'")):
            macro, _, args = line[1:].strip().partition(" ")
            if macro in _GROFF_HEADINGS:
                out.append(f"\n{args.strip(chr(34))}\n")
            elif macro in _GROFF_TEXT:
                out.append(" ".join(a.strip('"') for a in args.split('" "')) if args else "")
            elif macro in ("PP", "LP", "P", "TP", "HP", "sp", "Pp"):
                out.append("")
            continue
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", _GROFF_ESCAPE.sub(_groff_escape, "\n".join(out)))


def man_pages() -> Iterator[str]:
    """Sections 1-8 in English, in a seeded order (where the base is cut here, no section is cut whole)."""
    pages = [
        p
        for p in _files(Path("/usr/share/man"), "man[1-8]/*.gz")
        if "perl" not in p.name and not p.name.endswith(".3pm.gz")  # perl's pods are read as pods
    ]
    random.Random(0).shuffle(pages)
    for p in pages:
        text = _read(p)
        if text:
            yield groff_text(text) or ""


def changelogs() -> Iterator[str]:
    """The installed packages' changelogs and news, in a seeded order (the base is cut here)."""
    files = _files(DOC, "*/changelog*.gz", "*/NEWS*.gz")
    random.Random(0).shuffle(files)
    yield from filter(None, map(_read, files))


ORIGINS: dict[str, Callable[[], Iterator[str]]] = {
    "shared_corpora": shared_domain,
    "pydoc_topics": pydoc_topics,
    "stdlib_docstrings": stdlib_docstrings,
    "python_docs": text_files(DOC / "python3.11/html/_sources", "**/*.txt"),
    "linux_docs": text_files(DOC / "linux-doc-6.1/Documentation", "**/*.rst.gz", "**/*.txt.gz", "**/*.rst"),
    "git_docs": text_files(DOC / "git-doc", "*.txt"),
    "perl_pods": perl_pods,
    "info_nodes": info_nodes,
    "django_docs": html_pages(DOC / "python-django-doc/html", "**/*.html"),
    "debian_reference": html_pages(Path("/usr/share/debian-reference"), "*.en.html"),
    "debian_policy": text_files(DOC / "debian-policy", "**/_sources/**/*.txt"),
    "sqlalchemy_docs": text_files(DOC / "python-sqlalchemy-doc/rst", "**/*.rst", "**/*.txt"),
    "sphinx_docs": text_files(DOC / "sphinx-doc/html/_sources", "**/*.txt"),
    "cmake_docs": text_files(DOC / "cmake-data/html/_sources", "**/*.txt"),
    "vim_help": text_files(Path("/usr/share/vim"), "vim*/doc/*.txt", "vim*/doc/*.txt.gz"),
    "scipy_docs": html_pages(DOC / "python-scipy-doc/html", "**/*.html"),
    "gnuplot_docs": html_pages(DOC / "gnuplot/htmldocs", "*.html"),
    "man_pages": man_pages,
    "changelogs": changelogs,
}


def base_documents(max_bytes: int) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Distinct documents of the origins in order until `max_bytes` of UTF-8 text; and per origin what
    it gave (an origin the machine lacks gives nothing and is named)."""
    docs: list[str] = []
    seen: set[bytes] = set()
    counts: dict[str, dict[str, int]] = {}
    total = 0
    for origin, read in ORIGINS.items():
        got = counts.setdefault(origin, {"documents": 0, "text_bytes": 0})
        for text in read():
            text = text.replace("\r\n", "\n").strip()
            data = text.encode("utf-8")
            key = hashlib.blake2b(data, digest_size=16).digest()
            if len(text) < MIN_CHARS or key in seen:
                continue
            seen.add(key)
            docs.append(text)
            got["documents"] += 1
            got["text_bytes"] += len(data)
            total += len(data)
            if total >= max_bytes:
                return docs, counts
        if not got["documents"]:
            print(f"{origin}: nothing found on this machine (its package is not installed?)", file=sys.stderr)
    return docs, counts


# --- the copies ------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
# Text of other documents in a copy, as a share of its own: a short document shuffled alone keeps too
# many of its word 5-grams (near dedup would drop it); a long one has enough pieces to shuffle.
BORROW, BORROW_CAP = 0.3, 1000


def recombined(docs: list[str], i: int, copy: int, seed: int) -> str:
    """Copy `copy` of document `i`: the document itself for copy 0, else its paragraphs in a seeded
    order, the sentences or lines of each paragraph too (whichever cuts it finer), and paragraphs of
    other documents put in until they hold BORROW of its length or BORROW_CAP characters, whichever is
    less (at least one paragraph)."""
    if copy == 0:
        return docs[i]
    rng = random.Random(f"{seed}/{i}/{copy}")
    paragraphs = []
    for p in _PARAGRAPH.split(docs[i]):
        sentences, lines = _SENTENCE.split(p), p.split("\n")
        pieces, sep = (sentences, " ") if len(sentences) >= len(lines) else (lines, "\n")
        rng.shuffle(pieces)
        paragraphs.append(sep.join(pieces))
    rng.shuffle(paragraphs)
    wanted, borrowed = min(BORROW * len(docs[i]), BORROW_CAP), 0
    while not borrowed or borrowed < wanted:
        other = _PARAGRAPH.split(docs[(i + 1 + rng.randrange(len(docs) - 1)) % len(docs)])
        paragraph = rng.choice(other)
        paragraphs.insert(rng.randrange(len(paragraphs) + 1), paragraph)
        borrowed += len(paragraph) or 1
    return "\n\n".join(paragraphs)


def write_copy(docs: list[str], copy: int, seed: int, folder: Path, shard_bytes: int) -> list[dict]:
    """Copy `copy` of every document as domain-<copy>-<part>.jsonl.gz files of about `shard_bytes` of
    text (the copy cut into parts of equal size)."""
    texts = [recombined(docs, i, copy, seed) for i in range(len(docs))]
    sizes = [len(t.encode("utf-8")) for t in texts]
    parts = max(1, round(sum(sizes) / shard_bytes))
    per_part = sum(sizes) / parts
    files: list[dict] = []
    done = 0
    for part in range(parts):
        name = f"domain-{copy:03d}-{part:02d}.jsonl.gz"
        entry = {"name": name, "documents": 0, "text_bytes": 0}
        tmp = folder / f".{name}.tmp"
        with gzip.open(tmp, "wt", compresslevel=1, encoding="utf-8") as out:
            while done < len(texts) and (part == parts - 1 or entry["text_bytes"] < per_part):
                out.write(json.dumps({"text": texts[done]}, ensure_ascii=False) + "\n")
                entry["documents"] += 1
                entry["text_bytes"] += sizes[done]
                done += 1
        tmp.rename(folder / name)
        files.append(entry)
    return files


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- checking the copies against dedup -------------------------------------------------------


def check_near(docs: list[str], seed: int, sample: int, copies: int) -> dict:
    """Jaccard similarity of word 5-grams (near dedup's own shingles) between copies of the same
    document, on a seeded sample: the share at or above near dedup's default threshold of 0.8."""
    from cptkit.data.near_dedup import shingle_hashes

    rng = random.Random(seed)
    picks = rng.sample(range(len(docs)), min(sample, len(docs)))
    sims = []
    for i in picks:
        shingles = [set(shingle_hashes(recombined(docs, i, c, seed)).tolist()) for c in range(copies)]
        for a in range(copies):
            for b in range(a + 1, copies):
                sims.append(len(shingles[a] & shingles[b]) / len(shingles[a] | shingles[b]))
    sims.sort()
    return {
        "documents": len(picks),
        "pairs": len(sims),
        "jaccard_median": round(sims[len(sims) // 2], 3),
        "jaccard_p99": round(sims[int(len(sims) * 0.99)], 3),
        "jaccard_max": round(sims[-1], 3),
        "share_at_or_above_0.8": round(sum(s >= 0.8 for s in sims) / len(sims), 5),
    }


# --- driver ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/work/scale/corpus")
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--base-mb", type=float, default=195, help="text of the base (1x), in MB")
    p.add_argument("--shard-mb", type=float, default=100, help="text per .jsonl.gz file, in MB")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--check", type=int, default=500, help="documents sampled for the near-dedup check")
    args = p.parse_args()
    out = Path(args.out)
    docs, origins = base_documents(int(args.base_mb * 1e6))
    print(f"base: {len(docs):,} documents, {sum(o['text_bytes'] for o in origins.values()) / 1e6:.1f} MB")

    general = out / "general"
    general.mkdir(parents=True, exist_ok=True)
    for name in GENERAL:
        shutil.copy(SHARED / f"{name}.jsonl.gz", general / f"{name}.jsonl.gz")
    general_texts = [
        json.loads(line)["text"] for f in sorted(general.glob("*.jsonl.gz")) for line in gzip.open(f, "rt")
    ]

    copies_dir = out / "copies"  # each copy written once; the K x folders link to its files
    copies_dir.mkdir(parents=True, exist_ok=True)
    written: dict[int, list[dict]] = {}
    for copy in range(max(args.multiples)):
        written[copy] = write_copy(docs, copy, args.seed, copies_dir, int(args.shard_mb * 1e6))
        print(f"copy {copy}: {len(written[copy])} file(s)", flush=True)

    description = {
        "seed": args.seed,
        "origins": origins,
        "general": {
            "path": str(general),
            "documents": len(general_texts),
            "text_bytes": sum(len(t.encode("utf-8")) for t in general_texts),
        },
        "multiples": {},
    }
    for k in sorted(args.multiples):
        folder = out / f"{k}x"
        folder.mkdir(parents=True, exist_ok=True)
        files = [f for copy in range(k) for f in written[copy]]
        for f in files:
            link_or_copy(copies_dir / f["name"], folder / f["name"])
        description["multiples"][str(k)] = {
            "path": str(folder),
            "files": len(files),
            "documents": sum(f["documents"] for f in files),
            "text_bytes": sum(f["text_bytes"] for f in files),
            "largest_file_text_bytes": max(f["text_bytes"] for f in files),
        }
        print(f"{k}x: {description['multiples'][str(k)]}")
    if args.check:
        description["near_dedup_check"] = check_near(docs, args.seed, args.check, min(4, max(args.multiples)))
        print(f"near-dedup check: {description['near_dedup_check']}")
    (out / "corpus.json").write_text(json.dumps(description, indent=2) + "\n")
    print(f"wrote {out / 'corpus.json'}")


if __name__ == "__main__":
    main()

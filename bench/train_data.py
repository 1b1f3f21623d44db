"""The speed bench's data, made on a CPU: a BPE tokenizer trained on the corpora, their documents
tokenized, and cptkit-format prepared folders of those documents packed into rows (position_ids
restarting at every document), one folder per row length a variant asks for."""

from __future__ import annotations

import gzip
import json
import logging
import statistics
from pathlib import Path

log = logging.getLogger("bench.train")
SEQ = 2048  # the rows `data` prepares; other lengths are packed from the same documents on demand


def make_data(out: Path, corpora: Path, vocab: int, max_tokens: int) -> None:
    """A BPE tokenizer trained on the corpora, their documents tokenized, and a cptkit-format prepared
    folder (train rows packed best-fit-decreasing to SEQ, position_ids restarting per document)."""
    import datasets
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cptkit.data.manifest import tokenizer_fingerprint

    texts = []
    for path in sorted(corpora.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for line in f]
    import random

    random.Random(0).shuffle(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=["<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.save_pretrained(out / "tokenizer")
    docs, total = [], 0
    for text in texts:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        ids = [tokenizer.bos_token_id] + ids if ids[0] != tokenizer.bos_token_id else ids
        docs.append(ids)
        total += len(ids)
        if total >= max_tokens:
            break
    ids32 = datasets.Sequence(datasets.Value("int32"))
    datasets.Dataset.from_dict(
        {"input_ids": docs}, features=datasets.Features({"input_ids": ids32})
    ).save_to_disk(str(out / "docs"))
    tokenizer_info = {
        "name_or_path": "bench-bpe",
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    inputs = [{"path": str(p)} for p in sorted(corpora.glob("*.jsonl.gz"))]
    totals = write_prepared(out / "prepared", docs, SEQ, tokenizer_info, inputs)
    log.info(
        "%d documents, %d tokens, %d rows (packing %.3f)",
        len(docs),
        total,
        totals["rows"],
        totals["packing_efficiency"],
    )


def write_prepared(folder: Path, docs: list[list[int]], seq: int, tokenizer_info: dict, inputs: list) -> dict:
    """A cptkit-format prepared folder (format 3: one store file of `docs`, the train/ index of their
    rows of `seq`, all of one source) and its totals."""
    from cptkit.testing import store

    rows = [[store.Segment("bench", d, at, n) for d, at, n in row] for row in _best_fit(docs, seq)]
    lengths = [len(d) for d in docs]
    total = sum(lengths)
    totals = {
        "rows": len(rows),
        "trained_tokens": total,
        "padding_tokens": len(rows) * seq - total,
        "packing_efficiency": total / (len(rows) * seq),
        "documents": len(docs),
        "median_document_tokens": statistics.median(lengths),
    }
    store.write_prepared(
        folder,
        {"bench": docs},
        seq,
        tokenizer_info,
        batch_documents=1024,
        rows=rows,
        manifest={"totals": totals, "inputs": inputs},
    )
    return totals


def prepared_at(data: Path, seq: int) -> Path:
    """The prepared folder of rows of `seq` tokens: `data/prepared` at the default length, else
    `data/prepared-SEQ`, packed here from the same documents the first time a variant asks for it."""
    if seq == SEQ:
        return data / "prepared"
    folder = data / f"prepared-{seq}"
    if not (folder / "manifest.json").exists():
        import datasets

        base = json.loads((data / "prepared" / "manifest.json").read_text())
        docs = datasets.load_from_disk(str(data / "docs"))["input_ids"]
        write_prepared(folder, [list(d) for d in docs], seq, base["tokenizer"], base["inputs"])
    return folder


def _best_fit(docs: list[list[int]], capacity: int) -> list[list[tuple[int, int, int]]]:
    """Documents split into pieces of at most `capacity` (no token lost), packed best-fit decreasing, the
    rows shuffled; each row its pieces as (document, offset, length)."""
    import random

    from cptkit.data.pack import best_fit_pack

    pieces = [
        (d, i, min(capacity, len(doc) - i))
        for d, doc in enumerate(docs)
        for i in range(0, len(doc), capacity)
    ]
    rows = [[pieces[i] for i in group] for group in best_fit_pack([p[2] for p in pieces], capacity)]
    random.Random(0).shuffle(rows)
    return rows

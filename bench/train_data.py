"""The speed bench's data, made on a CPU: a BPE tokenizer trained on the corpora, their documents
tokenized, and cptkit-format prepared folders of those documents packed into rows (position_ids
restarting at every document), one folder per row length a variant asks for: each a token store of the
documents and a train/ index into it, written by cptkit's own writer."""

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
    """A cptkit-format prepared folder (format 3) of `docs` in rows of `seq`: the documents as one store
    file (`store/bench/docs.arrow`), cut into pieces of at most `seq` tokens (no token lost) and packed
    best-fit decreasing into train/ by `cptkit.data.write.write_train`, one source (`bench`); its totals."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    from cptkit.data.assemble import Rows, StoreShard
    from cptkit.data.chunk import windows
    from cptkit.data.shards import store_schema
    from cptkit.data.write import write_train

    store = folder / "store" / "bench" / "docs.arrow"
    store.parent.mkdir(parents=True, exist_ok=True)
    schema = store_schema(tokenizer_info["fingerprint"])
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    ids = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    with pa.OSFile(str(store), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for a in range(0, len(docs), 1 << 14):  # batches of whole documents, 32-bit list offsets each
            b = min(a + (1 << 14), len(docs))
            local = (offsets[a : b + 1] - offsets[a]).astype(np.int32)
            part = ids[offsets[a] : offsets[b]]
            writer.write_batch(
                pa.record_batch(
                    [
                        pa.array(
                            [
                                hashlib.blake2b(np.asarray(d, np.int32).tobytes(), digest_size=16).digest()
                                for d in docs[a:b]
                            ],
                            pa.binary(16),
                        ),
                        pa.array([f"docs:{i}" for i in range(a, b)]),
                        pa.array(np.zeros(b - a, np.int64)),
                        pa.array(np.zeros(b - a, np.int64)),
                        pa.array([""] * (b - a), pa.large_string()),
                        pa.ListArray.from_arrays(pa.array(local), pa.array(part)),
                        pa.nulls(b - a, pa.list_(pa.int32())),
                    ],
                    schema=schema,
                )
            )
    table = pa.ipc.open_file(pa.memory_map(str(store))).read_all()
    doc, off, length = windows(lengths, seq)
    rows = Rows(
        seg_start=offsets[:-1][doc] + off,
        seg_len=length,
        seg_source=np.zeros(len(length), np.int32),
        seq_length=seq,
        window=1 << 20,
        rng_state=np.random.default_rng(0).bit_generator.state,
    )
    written = write_train(rows, [StoreShard(store.relative_to(folder).as_posix(), table)], folder / "train")
    total = int(lengths.sum())
    manifest = {
        "status": "complete",
        "format_version": 3,
        "seq_length": seq,
        "chunking": "packing",
        "train_dir": "train",
        "tokenizer": tokenizer_info,
        "source_index": {"bench": 0},
        "heldout": {},
        "sources": {"bench": {"role": "domain", "weight": 1.0, "tokens": total, "mixed_tokens": total}},
        "totals": {
            "rows": written.rows,
            "trained_tokens": total,
            "padding_tokens": written.rows * seq - total,
            "packing_efficiency": total / (written.rows * seq),
            "pack_windows": written.windows,
            "documents": len(docs),
            "median_document_tokens": statistics.median(lengths.tolist()),
        },
        "inputs": inputs,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest["totals"]


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

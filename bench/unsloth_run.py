"""The speed peer: unsloth training the same packed rows cptkit trains on, in its own process.

unsloth patches transformers and TRL when it is imported, so it must be imported before them: the
variant process imports this module first. Read from unsloth 2026.10.9's source:
- `FastLanguageModel.from_pretrained(model_name=<local folder>, max_seq_length, dtype, load_in_4bit)`
  (its 4-bit load is NF4 with double quantisation and bf16 compute);
- `FastLanguageModel.get_peft_model(model, r, lora_alpha, lora_dropout=0, target_modules, bias="none",
  use_gradient_checkpointing="unsloth" | False)`: dropout 0 is its fast LoRA path, "unsloth" its
  checkpointing with block inputs offloaded to CPU memory;
- TRL's SFTTrainer, which unsloth patches: with `padding_free=True` its collator (wrapped by unsloth's
  `enable_padding_free_metadata`) flattens the micro-batch into one row and reads each row's
  `seq_lengths`, which become `packed_seq_lengths`: unsloth's varlen attention then keeps every document
  to itself. So unsloth gets cptkit's packed rows as they are, with documents kept apart as cptkit keeps
  them (no cross-document attention; the first token of each document is not a target in either).
"""

from __future__ import annotations

import os
import tempfile
from itertools import pairwise
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}


def unsloth_missing() -> str | None:
    """Why unsloth cannot run here (None when it can), without importing it (its import patches
    transformers, which the calling process may use)."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        return "unsloth is not installed (install the wheels: ../shared/tools/gpu-wheels.sh DIR unsloth)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "unsloth needs a CUDA GPU"
    return None


def import_unsloth():
    """unsloth, imported offline (no hub, no statistics ping) and first: it patches transformers, peft
    and TRL on import. Its compiled modules go to one writable folder that every variant of the call
    reuses (compiling them again would count in each variant's time limit, not in its tokens/s)."""
    os.environ.update(OFFLINE_ENV)
    os.environ.setdefault(
        "UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache")
    )
    import unsloth

    return unsloth


def packed_rows(train_dir: Path):
    """cptkit's prepared rows as TRL takes them pre-tokenized: input_ids, labels (= input_ids: TRL and
    unsloth mask each document's first token from the positions) and the document lengths of each row
    (where position_ids restart at 0)."""
    import datasets

    from cptkit.data.prepared import Prepared

    prepared = Prepared.load(train_dir.parent)
    rows = prepared.train_rows()

    def lengths():
        for row in rows:
            ids, starts = row["input_ids"].tolist(), (row["position_ids"] == 0).nonzero()[0].tolist()
            yield {
                "input_ids": ids,
                "labels": ids,
                "seq_lengths": [b - a for a, b in pairwise([*starts, len(ids)])],
            }

    # named by the prepared folder's manifest: a folder prepared again is never served from the cache
    return datasets.Dataset.from_generator(lengths, fingerprint=f"unsloth-rows-{prepared.manifest_hash}")


def train_unsloth(variant, model_dir: str, train_dir: Path, steps: int, out: Path, meter, holder: dict):
    """One unsloth run of `variant` (a bench.variants.Variant); returns the trainer after training."""
    unsloth = import_unsloth()
    import torch
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_dir,
        max_seq_length=variant.seq,
        dtype=torch.bfloat16,
        load_in_4bit=variant.mode == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=variant.lora_r,
        lora_alpha=variant.lora_alpha,
        lora_dropout=variant.lora_dropout,
        target_modules=list(variant.lora_targets),
        use_gradient_checkpointing="unsloth" if variant.checkpointing == "unsloth" else False,
        bias="none",
        random_state=1234,
    )
    args = SFTConfig(
        output_dir=str(out / variant.name),
        max_steps=steps,
        per_device_train_batch_size=variant.batch,
        gradient_accumulation_steps=1,
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=1234,
        packing=False,
        padding_free=True,
        max_length=None,  # the rows are cptkit's, at most seq tokens already
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=packed_rows(train_dir), processing_class=tokenizer
    )
    meter.attach(trainer)
    batches_with_lengths = _watch_packing(trainer)
    trainer.train()
    kept_apart = bool(batches_with_lengths) and all(batches_with_lengths)
    holder.update(
        attention="unsloth varlen (padding-free rows with packed_seq_lengths)"
        if kept_apart
        else "unsloth, plain rows: documents of a row attend to each other (less masking work than cptkit)",
        documents_kept_apart=kept_apart,
        unsloth_checkpointing=variant.checkpointing,
        unsloth_version=getattr(unsloth, "__version__", None),
    )
    return trainer


def _watch_packing(trainer) -> list[bool]:
    """Whether each batch the trainer collates carries unsloth's `packed_seq_lengths` (the sign that
    its attention keeps documents apart), appended as the batches are made."""
    seen: list[bool] = []
    collate = trainer.data_collator

    def watching(features):
        batch = collate(features)
        seen.append("packed_seq_lengths" in batch)
        return batch

    trainer.data_collator = watching
    return seen

"""Benchmark `cptkit train` against the seed's recipe, side by side in one run on one GPU.

    python bench/train.py data --out .bench           # here: tokenizer + documents + prepared dataset
    python bench/train.py all --data .bench --out OUT # on the GPU: checks, kernels, 4 training runs, table

`all` does, in order:
  1. isolation check on this GPU's transformers/torch: a packed batch gives the same per-token losses as
     its documents one at a time, for sdpa, eager and cptkit's varlen kernel (and plain causal leaks);
  2. one attention call (8 x 2048, 32 heads x 128, real document lengths), forward + backward, per kernel;
  3. a Llama-3-8B-shaped model (hidden 4096, 32 layers, 32/8 heads, ffn 14336, vocab 128256), random
     init in bf16 on the GPU, saved once, then four runs of `--steps` steps, each in its own process
     (clean peak memory): cptkit qlora, cptkit lora, and the seed's way (TRL SFTTrainer(packing=True) +
     peft + bitsandbytes) qlora and lora. Same documents, LoRA all-linear r=16 alpha=32 dropout 0.05,
     seq 2048 x batch 8, lr 2e-5 cosine with 10% warmup, gradient checkpointing, bf16.
Throughput is measured the same way for every run: tokens of the batch that are not padding over the
time of the optimizer steps (CUDA synchronised), steps after the first `--skip` only. MFU follows
`cptkit.model.flops` (6N / 4N+6N_lora + 12 L H Q T, no causal halving) against 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

log = logging.getLogger("bench.train")
SEQ, BATCH = 2048, 8
VARIANTS = ("cptkit-qlora", "cptkit-lora", "seed-qlora", "seed-lora")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


# ---------------------------------------------------------------- data (runs here, on CPU)
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
    rows = _best_fit(docs, SEQ)
    prepared = out / "prepared"
    datasets.Dataset.from_dict(
        {"input_ids": [r[0] for r in rows], "position_ids": [r[1] for r in rows]},
        features=datasets.Features({"input_ids": ids32, "position_ids": ids32}),
    ).save_to_disk(str(prepared / "train"))
    lengths = [len(d) for d in docs]
    manifest = {
        "status": "complete",
        "format_version": 1,
        "seq_length": SEQ,
        "chunking": "packing",
        "train_dir": "train",
        "tokenizer": {
            "name_or_path": "bench-bpe",
            "fingerprint": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "heldout": {},
        "sources": {},
        "totals": {
            "rows": len(rows),
            "trained_tokens": total,
            "padding_tokens": len(rows) * SEQ - total,
            "packing_efficiency": total / (len(rows) * SEQ),
            "documents": len(docs),
            "median_document_tokens": statistics.median(lengths),
        },
        "inputs": [{"path": str(p)} for p in sorted(corpora.glob("*.jsonl.gz"))],
    }
    (prepared / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info(
        "%d documents, %d tokens, %d rows (packing %.3f)",
        len(docs),
        total,
        len(rows),
        manifest["totals"]["packing_efficiency"],
    )


def _best_fit(docs: list[list[int]], capacity: int) -> list[tuple[list[int], list[int]]]:
    """Documents split into pieces of at most `capacity` (no token lost), packed best-fit decreasing."""
    import random

    from cptkit.data.pack import best_fit_pack

    pieces = [d[i : i + capacity] for d in docs for i in range(0, len(d), capacity)]
    rows = [[pieces[i] for i in group] for group in best_fit_pack([len(p) for p in pieces], capacity)]
    random.Random(0).shuffle(rows)
    return [([t for p in r for t in p], [i for p in r for i in range(len(p))]) for r in rows]


# ---------------------------------------------------------------- measuring
class Meter:
    """Counts the non-padding tokens each optimizer step trains on and times the steps."""

    def __init__(self, skip: int):
        from transformers import TrainerCallback

        meter = self
        self.skip, self.pending, self.steps = skip, deque(), []

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                meter.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                tokens = sum(
                    meter.pending.popleft()
                    for _ in range(min(args.gradient_accumulation_steps, len(meter.pending)))
                )
                meter.steps.append(
                    {"step": state.global_step, "seconds": time.perf_counter() - meter.t0, "tokens": tokens}
                )

        self.callback = Callback()

    def wrap(self, collator):
        def collate(features):
            self.pending.append(sum(len(f["input_ids"]) for f in features))
            return collator(features)

        return collate

    def attach(self, trainer) -> None:
        trainer.data_collator = self.wrap(trainer.data_collator)
        trainer.add_callback(self.callback)

    def summary(self) -> dict:
        timed = self.steps[self.skip :]
        seconds, tokens = sum(s["seconds"] for s in timed), sum(s["tokens"] for s in timed)
        return {
            "tokens_per_second": tokens / seconds if seconds else None,
            "timed_steps": len(timed),
            "seconds_per_step": seconds / max(len(timed), 1),
            "tokens_per_step": tokens / max(len(timed), 1),
        }


def run_variant(
    name: str, model_dir: str, data: Path, steps: int, skip: int, out: Path, extra: list[str]
) -> dict:
    """One training run; returns throughput, MFU, memory and per-step losses."""
    import torch

    from cptkit.model.flops import flops_per_token, mfu

    meter = Meter(skip)
    holder: dict = {}
    if name.startswith("cptkit"):
        trainer = _cptkit(name.split("-")[1], model_dir, data, steps, out, meter, holder, extra)
    else:
        trainer = _seed(name.split("-")[1], model_dir, data, steps, out, meter, holder)
    result = meter.summary()
    fpt = flops_per_token(trainer.model, SEQ)
    result.update(
        variant=name,
        steps=steps,
        flops_per_token=fpt,
        mfu=mfu(result["tokens_per_second"], fpt) if result["tokens_per_second"] else None,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h},
        step_times=[round(s["seconds"], 4) for s in meter.steps],
        **holder,
    )
    return result


def _cptkit(
    mode: str, model_dir: str, data: Path, steps: int, out: Path, meter: Meter, holder: dict, extra: list[str]
):
    """`cptkit train` as a user runs it (cptkit.commands.train.run), with the meter attached."""
    import cptkit.train.build as build
    from cptkit.commands.train import run
    from cptkit.config import Config, build_config
    from cptkit.config.load import apply_overrides

    original = build.build_trainer

    def build_trainer(*args, **kwargs):
        trainer, callbacks = original(*args, **kwargs)
        meter.attach(trainer)
        holder["trainer"] = trainer
        return trainer, callbacks

    build.build_trainer = build_trainer
    raw = {
        "seed": 1234,
        "model": {"name_or_path": model_dir},
        "train": {
            "mode": mode,
            "dataset": str(data / "prepared"),
            "output_dir": str(out / f"cptkit-{mode}"),
            "overwrite_output_dir": True,
            "report_to": ["none"],
            "lora": dict(LORA),
            "eval_steps": 10**9,
            "schedule": {"type": "cosine", "warmup": 0.1},
            "hf": {
                "max_steps": steps,
                "per_device_train_batch_size": BATCH,
                "learning_rate": 2e-5,
                "logging_steps": 1,
                "save_strategy": "no",
            },
        },
    }
    apply_overrides(raw, extra)
    summary = run(build_config(Config, raw))
    trainer = holder.pop("trainer")
    meta = json.loads((out / f"cptkit-{mode}" / "run_meta.json").read_text())
    holder.update(
        attention=meta["attention"],
        fused_cross_entropy=meta["fused_cross_entropy"],
        cptkit_summary={k: summary.get(k) for k in ("tokens_per_second", "mfu", "peak_memory_gb")},
        overrides=extra,
    )
    return trainer


def _seed(mode: str, model_dir: str, data: Path, steps: int, out: Path, meter: Meter, holder: dict):
    """The seed's pretrained.py: SFTTrainer(packing=True) + peft + bitsandbytes NF4/bf16 compute.
    Its flash_attention_2 is not installable on this image, so it runs on sdpa, transformers' default."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    kwargs = {
        "dtype": torch.bfloat16 if gpu else torch.float32,
        "attn_implementation": "sdpa",
        "device_map": {"": 0 if gpu else "cpu"},
    }
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    args = SFTConfig(
        output_dir=str(out / f"seed-{mode}"),
        logging_steps=1,
        max_steps=steps,
        gradient_checkpointing=True,
        bf16=gpu,
        learning_rate=2e-5,
        warmup_steps=0.1,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        report_to="none",
        lr_scheduler_type="cosine",
        packing=True,
        max_length=SEQ,
        save_strategy="no",
        dataset_num_proc=4,
        seed=1234,
        use_cpu=not gpu,
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )
    docs = datasets.load_from_disk(str(data / "docs"))
    trainer = SFTTrainer(
        model, args=args, train_dataset=docs, peft_config=peft_config, processing_class=tokenizer
    )
    meter.attach(trainer)
    trainer.train()
    holder.update(attention="sdpa (TRL padding-free packing)", fused_cross_entropy=False)
    return trainer


# ---------------------------------------------------------------- the model and the GPU checks
def build_model(folder: Path, tokenizer_dir: Path, tiny: bool) -> float:
    """Random-init Llama-3-8B-shaped model in bf16, built directly on the GPU, saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
    )
    if tiny:
        shape = dict(
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            vocab_size=len(tokenizer),
        )
    config = LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return time.perf_counter() - t0


def isolation_check(data: Path) -> list[dict]:
    """Per-token losses of packed rows vs the same documents alone, per attention implementation."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cptkit.model import attention
    from cptkit.train.collator import PackedCollator

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    config = LlamaConfig(
        hidden_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1024,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 32000, (n,), generator=gen).tolist() for n in (300, 700, 45, 977, 500, 524)]
    rows = [
        {
            "input_ids": docs[0] + docs[1] + docs[2] + docs[3],
            "position_ids": [i for d in docs[:4] for i in range(len(d))],
        },
        {"input_ids": docs[4] + docs[5], "position_ids": [i for d in docs[4:] for i in range(len(d))]},
    ]
    batch = {k: v.to(device) for k, v in PackedCollator(0)(rows).items()}
    impls = [("sdpa", torch.float32), ("eager", torch.float32)]
    if attention.varlen_available():
        attention.register()
        impls += [("sdpa", torch.bfloat16), (attention.VARLEN, torch.bfloat16)]
    results = []
    for impl, dtype in impls:
        model = base.to(dtype)
        model.config._attn_implementation = impl
        for layer in model.model.layers:
            layer.self_attn.config._attn_implementation = impl

        def losses(ids, pos, labels, model=model):
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
            per = torch.nn.functional.cross_entropy(
                logits[0, :-1] if ids.shape[0] == 1 else logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[..., 1:].reshape(-1),
                ignore_index=-100,
                reduction="none",
            )
            return per[labels[..., 1:].reshape(-1) != -100]

        with torch.no_grad():
            packed = losses(batch["input_ids"], batch["position_ids"], batch["labels"])
            leak = losses(
                batch["input_ids"],
                torch.arange(batch["input_ids"].shape[1], device=device).expand_as(batch["input_ids"]),
                batch["labels"],
            )
            alone = []
            for d in docs:
                ids = torch.tensor([d], device=device)
                labels = ids.clone()
                labels[0, 0] = -100
                alone.append(losses(ids, torch.arange(len(d), device=device)[None], labels))
            alone = torch.cat(alone)
        results.append(
            {
                "attention": impl,
                "dtype": str(dtype).replace("torch.", ""),
                "max_abs_diff_packed_vs_alone": float((packed - alone).abs().max()),
                "max_abs_diff_plain_causal_vs_alone": float((leak - alone).abs().max()),
                "tokens": int(alone.numel()),
            }
        )
        log.info("isolation %s", results[-1])
    return results


def kernel_timing(data: Path) -> dict:
    """Forward + backward of one attention call on 8 x 2048 rows of real document lengths, in ms."""
    import datasets
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from cptkit.model import attention

    rows = datasets.load_from_disk(str(data / "prepared" / "train")).select(range(BATCH))
    pos = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for i, r in enumerate(rows):
        p = torch.tensor(r["position_ids"])
        pos[i, : len(p)] = p
        if len(p) < SEQ:
            pos[i, len(p) :] = torch.arange(int(p[-1]) + 1, int(p[-1]) + 1 + SEQ - len(p))
    pos = pos.cuda()
    q, k, v = (
        torch.randn(BATCH, h, SEQ, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (32, 8, 8)
    )
    doc = (pos == 0).cumsum(-1)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool, device="cuda").tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = mask[:, None]
    attention.register()

    def step(fn):
        def go():
            out = fn()
            out.float().sum().backward()

        return go

    timings = {
        "varlen": step(
            lambda: attention.varlen_attention_forward(
                None, q, k, v, None, scaling=128**-0.5, position_ids=pos
            )[0]
        ),
        "sdpa_block_mask": step(
            lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        ),
        "sdpa_causal_leaks": step(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        ),
    }
    return {
        name: round(do_bench(fn, warmup=50, rep=300, return_mode="median"), 3) for name, fn in timings.items()
    }


# ---------------------------------------------------------------- driver
def run_all(args) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    report: dict = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "seq_length": SEQ,
        "batch_size": BATCH,
        "lora": LORA,
        "steps": args.steps,
        "skip": args.skip,
    }
    from cptkit.outputs import versions

    report["versions"] = versions()
    report["isolation"] = isolation_check(data)
    if torch.cuda.is_available():
        report["attention_ms_fwd_bwd_8x2048"] = kernel_timing(data)
        log.info("attention kernels: %s", report["attention_ms_fwd_bwd_8x2048"])
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():  # a warm machine keeps it between calls
        report["model_build_seconds"] = round(build_model(model_dir, data / "tokenizer", args.tiny), 1)
    report["runs"] = []
    for name in args.variants.split(","):
        attempts = (
            [[]]
            if name.startswith("seed")
            else [
                [],
                ["train.fused_cross_entropy=off"],
                ["train.fused_cross_entropy=off", "model.attention=sdpa"],
            ]
        )
        for extra in attempts:
            path = out / f"{name}.json"
            cmd = [
                sys.executable,
                __file__,
                "variant",
                name,
                "--data",
                str(data),
                "--model-dir",
                str(model_dir),
                "--steps",
                str(args.steps),
                "--skip",
                str(args.skip),
                "--json",
                str(path),
                "--work",
                str(out / "work"),
                *[f"--override={e}" for e in extra],
            ]
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            if rc == 0 and path.exists():
                result = json.loads(path.read_text())
                result["wall_seconds"] = round(time.perf_counter() - t0, 1)
                report["runs"].append(result)
                break
            report.setdefault("failures", []).append({"variant": name, "overrides": extra, "rc": rc})
        (out / "train.json").write_text(json.dumps(report, indent=2))
    print_table(report)
    (out / "train.json").write_text(json.dumps(report, indent=2))


def _call_with_limit(command: list[str], env: dict, seconds: float) -> int | str:
    """Runs `command`; past `seconds`, every process it started gets SIGABRT (with PYTHONFAULTHANDLER
    set, each prints the Python stack of every thread: where a stalled rank waits), then SIGKILL."""
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return f"stopped after {seconds:.0f} s (stacks of each process in the log)"


def run_scale(args) -> None:
    """`cptkit train` on 1 GPU, then through `accelerate launch` on all GPUs (DDP, FSDP2): tokens/s each."""
    import torch
    import yaml

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, model_dir, gpus = Path(args.data), Path(args.model_dir), torch.cuda.device_count()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, data / "tokenizer", args.tiny)
    device = torch.cuda.get_device_name() if gpus else "cpu"
    report: dict = {"device": device, "gpus": gpus, "mode": args.mode, "steps": args.steps, "runs": []}
    from cptkit.presets.accelerate import path as preset

    launches = [] if args.skip_single else [("1 GPU", [sys.executable, "-m", "cptkit", "train"])]
    for name in filter(None, args.launchers.split(",")):
        launches.append(
            (
                f"{gpus} GPU{'s' if gpus > 1 else ''} {name}",
                [
                    "accelerate",
                    "launch",
                    "--config_file",
                    str(preset(name)),
                    "--num_processes",
                    str(gpus),
                    "-m",
                    "cptkit",
                    "train",
                ],
            )
        )
    for label, launcher in launches:
        folder = out / "work" / label.replace(" ", "-")
        cfg = {
            "seed": 1234,
            "model": {"name_or_path": str(model_dir)},
            "train": {
                "mode": args.mode,
                "dataset": str(data / "prepared"),
                "output_dir": str(folder),
                "overwrite_output_dir": True,
                "report_to": ["none"],
                "lora": dict(LORA),
                "eval_steps": 10**9,
                "hf": {
                    "max_steps": args.steps,
                    "per_device_train_batch_size": BATCH,
                    "learning_rate": 2e-5,
                    "logging_steps": 1,
                    "save_strategy": "no",
                },
            },
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
        t0 = time.perf_counter()
        env = {
            **os.environ,
            "PYTHONFAULTHANDLER": "1",
            **({"CUDA_VISIBLE_DEVICES": "0"} if label == "1 GPU" else {}),
        }
        rc = _call_with_limit([*launcher, str(folder / "run.yaml")], env, args.launch_timeout)
        record = {
            "launch": label,
            "command": " ".join(launcher[-4:] if label == "1 GPU" else launcher[:6]),
            "rc": rc,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        metrics = folder / "metrics.jsonl"
        if metrics.exists():  # a stopped launch still shows the steps it made
            lines = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
            timed = [x["tokens_per_second"] for x in lines[args.skip :] if x.get("tokens_per_second")]
            record.update(
                tokens_per_second=statistics.median(timed) if timed else None,
                mfu=statistics.median([x["mfu"] for x in lines[args.skip :] if x.get("mfu")] or [0]) or None,
                peak_memory_gb=lines[-1].get("peak_memory_gb") if lines else None,
                losses=[x["loss"] for x in lines],
                attention=json.loads((folder / "run_meta.json").read_text())["attention"]
                if (folder / "run_meta.json").exists()
                else None,
            )
        report["runs"].append(record)
        (out / "train_scale.json").write_text(json.dumps(report, indent=2))
    base = None if args.skip_single else report["runs"][0].get("tokens_per_second")
    for r in report["runs"]:
        speedup = f"{r['tokens_per_second'] / base:.2f}x" if base and r.get("tokens_per_second") else "-"
        tps = f"{r['tokens_per_second']:.0f}" if r.get("tokens_per_second") else f"failed rc={r['rc']}"
        sys.stdout.write(f"{r['launch']:18} {tps:>10} tokens/s  {speedup}\n")


def print_table(report: dict) -> None:
    lines = [
        f"{'run':14} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>9} {'s/step':>7}  attention / loss at steps 1, 5, last"
    ]
    for r in report["runs"]:
        losses = r["losses"]
        keys = sorted(losses, key=int)
        shown = (
            ", ".join(f"{losses[k]:.4f}" for k in (keys[0], keys[min(4, len(keys) - 1)], keys[-1]))
            if keys
            else "-"
        )
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        mem = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "-"
        lines.append(
            f"{r['variant']:14} {r['tokens_per_second']:9.0f} {mfu:>6} {mem:>9} {r['seconds_per_step']:7.2f}  "
            f"{r.get('attention')} / {shown}"
        )
    sys.stdout.write("\n".join(lines) + "\n")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default=".bench")
    d.add_argument("--corpora", default="../shared/corpora")
    d.add_argument("--vocab", type=int, default=32000)
    d.add_argument("--max-tokens", type=int, default=800_000)
    for name in ("all", "variant", "scale"):
        a = sub.add_parser(name)
        if name == "scale":
            a.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
            a.add_argument("--mode", default="lora")
            a.add_argument(
                "--launchers", default="ddp,fsdp2,zero1", help="accelerate presets to launch on all GPUs"
            )
            a.add_argument("--tiny", action="store_true")
            a.add_argument(
                "--launch-timeout", type=float, default=300, help="seconds before a launch is stopped"
            )
            a.add_argument("--skip-single", action="store_true", help="only the accelerate launches")
        elif name == "variant":
            a.add_argument("variant", choices=VARIANTS)
            a.add_argument("--json", required=True)
            a.add_argument("--work", required=True)
            a.add_argument("--override", action="append", default=[])
        else:
            a.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
            a.add_argument("--variants", default=",".join(VARIANTS))
            a.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script on a CPU")
        a.add_argument("--data", default=".bench")
        a.add_argument("--model-dir", default="/tmp/bench-llama-8b")
        a.add_argument("--steps", type=int, default=16)
        a.add_argument(
            "--skip", type=int, default=3, help="untimed first steps (allocator and kernel warm-up)"
        )
    args = p.parse_args()
    if args.what == "data":
        make_data(Path(args.out), Path(args.corpora), args.vocab, args.max_tokens)
    elif args.what == "all":
        run_all(args)
    elif args.what == "scale":
        run_scale(args)
    else:
        result = run_variant(
            args.variant,
            args.model_dir,
            Path(args.data),
            args.steps,
            args.skip,
            Path(args.work),
            args.override,
        )
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

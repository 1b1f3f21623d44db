"""The speed bench: `cptkit train`, the seed's recipe and unsloth side by side, in one call on one GPU.

    python bench/train.py data --out .bench             # here, on CPU: tokenizer, documents, prepared rows
    python bench/train.py list                          # the variants and groups (bench/variants.py)
    python bench/train.py all --group issue --out OUT   # on the GPU: checks, the variants, the table
    python bench/train.py table OUT/train.json         # the table again, from a results JSON
    python bench/train.py calibration OUT1/train.json OUT2/train.json --out src/cptkit/presets/calibration.json

`all` runs, in order:
  1. the isolation check on this GPU's transformers/torch: a packed batch gives the same per-token losses
     as its documents one at a time, for sdpa, eager and cptkit's varlen kernel (plain causal leaks);
  2. one attention call (8 x 2048, 32 heads x 128, real document lengths), forward + backward, per kernel;
  3. each chosen variant in its own process (clean peak memory), under `--variant-timeout`: random-init
     Llama shapes built once per shape in bf16 on the GPU and saved under `--models`; the same documents
     packed into the same rows for cptkit and unsloth (the seed's recipe packs them with TRL itself);
     lr 2e-5 cosine with 10% warmup, bf16. A failed variant is recorded with the end of its log and
     the next one runs; unsloth variants are skipped (with the reason) where unsloth cannot be imported.
     OUT/train.json is written after every variant.
Throughput is measured the same way for every run: tokens of the batch that are not padding over the
time of the optimizer steps (CUDA synchronised), steps after the first `--skip` only. MFU follows
`cptkit.model.flops` (6N / 4N+6N_lora + 12 L H Q T, no causal halving) against 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
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

from train_data import SEQ, make_data, prepared_at
from train_results import print_table, write_calibration
from unsloth_run import unsloth_missing
from variants import GROUPS, SHAPES, VARIANTS, Variant, listing, select

log = logging.getLogger("bench.train")
BATCH = 8  # rows of the kernel timing
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}  # `scale`'s runs


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
    variant: Variant, models: Path, data: Path, steps: int, skip: int, out: Path, extra: list[str]
) -> dict:
    """One training run of `variant`; returns throughput, MFU, memory, the plan and per-step losses."""
    if variant.runner == "unsloth":
        from unsloth_run import import_unsloth

        import_unsloth()  # before anything imports transformers (the meter does)
    meter = Meter(skip)
    holder: dict = {}
    model_dir = str(models / variant.shape)
    train_dir = prepared_at(data, variant.seq) / "train"
    if variant.runner == "unsloth":
        from unsloth_run import train_unsloth

        trainer = train_unsloth(variant, model_dir, train_dir, steps, out, meter, holder)
    elif variant.runner == "cptkit":
        trainer = _cptkit(variant, model_dir, train_dir.parent, steps, out, meter, holder, extra)
    else:
        trainer = _seed(variant, model_dir, data, steps, out, meter, holder)
    import torch

    from cptkit.model.flops import flops_per_token, mfu

    result = meter.summary()
    fpt = flops_per_token(trainer.model, variant.seq)
    gpu = torch.cuda.is_available()
    result.update(
        variant=variant.name,
        runner=variant.runner,
        mode=variant.mode,
        shape=variant.shape,
        params=count_params(model_dir),
        seq_length=variant.seq,
        micro_batch=variant.batch,
        lora=None
        if variant.mode == "full"
        else {
            "r": variant.lora_r,
            "alpha": variant.lora_alpha,
            "dropout": variant.lora_dropout,
            "target_modules": list(variant.lora_targets),
        },
        checkpointing=variant.checkpointing,
        steps=steps,
        flops_per_token=fpt,
        mfu=mfu(result["tokens_per_second"], fpt) if result["tokens_per_second"] else None,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
        losses={h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h and "step" in h},
        step_times=[round(s["seconds"], 4) for s in meter.steps],
        **holder,
    )
    return result


def count_params(model_dir: str) -> int:
    """Parameters of the model at `model_dir`, counted on the meta device (4-bit weights at full size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def cptkit_config(variant: Variant, model_dir: str, prepared: Path, steps: int, out: Path, extra: list[str]):
    """The `cptkit train` config of `variant`: bench settings, then the variant's overrides, then `extra`."""
    from cptkit.config import Config, build_config
    from cptkit.config.load import apply_overrides

    raw = {
        "seed": 1234,
        "model": {"name_or_path": model_dir},
        "train": {
            "dataset": str(prepared),
            "output_dir": str(out / variant.name),
            "overwrite_output_dir": True,
            "report_to": ["none"],
            "eval_steps": 10**9,
            "schedule": {"type": "cosine", "warmup": 0.1},
            "hf": {"max_steps": steps, "learning_rate": 2e-5, "logging_steps": 1, "save_strategy": "no"},
        },
    }
    problems = apply_overrides(raw, [*variant.cptkit_overrides(), *extra])
    if problems:
        raise ValueError("; ".join(problems))
    return build_config(Config, raw)


def _cptkit(
    variant: Variant, model_dir: str, prepared: Path, steps: int, out: Path, meter: Meter, holder: dict, extra
):
    """`cptkit train` as a user runs it (cptkit.commands.train.run), with the meter attached."""
    import cptkit.train.build as build
    from cptkit.commands.train import run

    original = build.build_trainer

    def build_trainer(*args, **kwargs):
        trainer, callbacks = original(*args, **kwargs)
        meter.attach(trainer)
        holder["trainer"] = trainer
        return trainer, callbacks

    build.build_trainer = build_trainer  # the bench's one hook into the command: the meter
    summary = run(cptkit_config(variant, model_dir, prepared, steps, out, extra))
    trainer = holder.pop("trainer")
    meta = json.loads((out / variant.name / "run_meta.json").read_text())
    holder.update(
        attention=meta["attention"],
        fused_cross_entropy=meta["fused_cross_entropy"],
        memory_plan=meta.get("memory_plan"),
        kernels=meta.get("kernels"),
        fast_lora=meta.get("fast_lora"),
        cptkit_summary={k: summary.get(k) for k in ("tokens_per_second", "mfu", "peak_memory_gb")},
        overrides=[*variant.cptkit_overrides(), *extra],
    )
    return trainer


def _seed(variant: Variant, model_dir: str, data: Path, steps: int, out: Path, meter: Meter, holder: dict):
    """The seed's pretrained.py: SFTTrainer(packing=True) + peft + bitsandbytes NF4/bf16 compute, at the
    variant's LoRA settings and rows. Its flash_attention_2 is not installable on the GPU image, so it
    runs on sdpa, transformers' default."""
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
    if variant.mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=variant.double_quant,
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    args = SFTConfig(
        output_dir=str(out / variant.name),
        logging_steps=1,
        max_steps=steps,
        gradient_checkpointing=variant.checkpointing == "true",
        bf16=gpu,
        learning_rate=2e-5,
        warmup_steps=0.1,
        per_device_train_batch_size=variant.batch,
        gradient_accumulation_steps=1,
        report_to="none",
        lr_scheduler_type="cosine",
        packing=True,
        max_length=variant.seq,
        save_strategy="no",
        dataset_num_proc=4 if gpu else None,  # worker processes cost more than they save on a CPU check
        seed=1234,
        use_cpu=not gpu,
    )
    peft_config = LoraConfig(
        r=variant.lora_r,
        lora_alpha=variant.lora_alpha,
        lora_dropout=variant.lora_dropout,
        target_modules=list(variant.lora_targets),
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
def build_model(folder: Path, tokenizer_dir: Path, shape: str) -> float:
    """A random-init Llama model of `shape` (bench.variants.SHAPES) in bf16, built directly on the GPU
    (fp32 on a CPU), saved with the tokenizer; returns the seconds it took."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **{"vocab_size": len(tokenizer), **SHAPES[shape]},
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
    if device == "cuda":
        torch.cuda.empty_cache()
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
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench

    from cptkit.data.prepared import Prepared
    from cptkit.model import attention

    rows = Prepared.load(data / "prepared").train_rows().__getitems__(range(BATCH))
    pos = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for i, r in enumerate(rows):
        p = torch.as_tensor(r["position_ids"], dtype=torch.long)
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
def run_all(args, chosen: list[Variant]) -> None:
    """The checks, then each chosen variant in its own process under a time limit; the JSON is written
    after every variant (a stopped call keeps what it measured) and the table printed at the end."""
    import torch

    if args.tiny:
        chosen = [v.for_tiny() for v in chosen]
    out, data, models = Path(args.out), Path(args.data), Path(args.models)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "train.json"
    from cptkit.outputs import versions

    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps": args.steps,
        "skip": args.skip,
        "variants": [v.name for v in chosen],
        "overrides_for_cptkit": args.set,
        "versions": {**versions(), "unsloth": _version("unsloth"), "unsloth_zoo": _version("unsloth_zoo")},
        "runs": [],
        "failures": [],
        "skipped": [],
    }
    if not args.no_checks:
        report["isolation"] = isolation_check(data)
        if torch.cuda.is_available():
            report["attention_ms_fwd_bwd_8x2048"] = kernel_timing(data)
            log.info("attention kernels: %s", report["attention_ms_fwd_bwd_8x2048"])
    results.write_text(json.dumps(report, indent=2))
    for variant in chosen:
        reason = unsloth_missing() if variant.runner == "unsloth" else None
        if reason:
            report["skipped"].append({"variant": variant.name, "reason": reason})
            log.warning("%s skipped: %s", variant.name, reason)
        else:
            _ensure_model(models / variant.shape, data, variant.shape, report)
            prepared_at(data, variant.seq)
            record = _run_in_process(variant, args, out)
            report["runs" if "tokens_per_second" in record else "failures"].append(record)
        results.write_text(json.dumps(report, indent=2))
    print_table(report)


def _ensure_model(folder: Path, data: Path, shape: str, report: dict) -> None:
    """Each shape is built once and reused by every variant (a warm machine keeps it between calls)."""
    if not (folder / "config.json").exists():
        seconds = build_model(folder, data / "tokenizer", shape)
        report.setdefault("model_build_seconds", {})[shape] = round(seconds, 1)


def _run_in_process(variant: Variant, args, out: Path) -> dict:
    """One variant in a fresh process (clean peak memory; a crash or a hang costs only that variant):
    its result, or a failure record with the return code and the end of its log."""
    path, logs = out / f"{variant.name}.json", out / "logs"
    logs.mkdir(exist_ok=True)
    path.unlink(missing_ok=True)
    command = [
        sys.executable,
        __file__,
        "variant",
        variant.name,
        *(["--tiny"] if args.tiny else []),
        f"--data={args.data}",
        f"--models={args.models}",
        f"--steps={args.steps}",
        f"--skip={args.skip}",
        f"--json={path}",
        f"--work={args.work}",
        *[f"--set={e}" for e in args.set],
    ]
    t0 = time.perf_counter()
    log.info("%s: %s", variant.name, variant.describe())
    with open(logs / f"{variant.name}.log", "w") as log_file:
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
        rc = _call_with_limit(command, env, args.variant_timeout, stdout=log_file)
    wall = round(time.perf_counter() - t0, 1)
    if rc == 0 and path.exists():
        record = json.loads(path.read_text())
        record["wall_seconds"] = wall
        log.info("%s: %.0f tokens/s in %.0f s", variant.name, record["tokens_per_second"] or 0, wall)
        return record
    tail = (logs / f"{variant.name}.log").read_text(errors="replace").splitlines()[-40:]
    log.error("%s failed (%s) after %.0f s; the end of its log:\n%s", variant.name, rc, wall, "\n".join(tail))
    return {"variant": variant.name, "rc": rc, "wall_seconds": wall, "log_tail": tail}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def _call_with_limit(command: list[str], env: dict, seconds: float, stdout=None) -> int | str:
    """Runs `command`; past `seconds`, every process it started gets SIGABRT (with PYTHONFAULTHANDLER
    set, each prints the Python stack of every thread: where a stalled rank waits), then SIGKILL."""
    proc = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=stdout, stderr=subprocess.STDOUT if stdout else None
    )
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
    shape = "tiny" if args.tiny else "llama3-8b"
    data, model_dir, gpus = Path(args.data), Path(args.models) / shape, torch.cuda.device_count()
    if not (model_dir / "config.json").exists():
        build_model(model_dir, data / "tokenizer", shape)
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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("data", help="tokenizer, documents and a prepared folder (CPU)")
    d.add_argument("--out", default=".bench")
    d.add_argument("--corpora", default="../shared/corpora")
    d.add_argument("--vocab", type=int, default=32000)
    d.add_argument("--max-tokens", type=int, default=800_000)
    sub.add_parser("list", help="the variants and the groups")
    t = sub.add_parser("table", help="print the table of a results JSON again")
    t.add_argument("results")
    c = sub.add_parser("calibration", help="the calibration table `cptkit plan` ships, from results JSONs")
    c.add_argument("results", nargs="+", help="train.json of one or more calls on the same device")
    c.add_argument("--out", default="src/cptkit/presets/calibration.json")
    for name in ("all", "variant", "scale"):
        a = sub.add_parser(name)
        if name == "scale":
            a.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
            a.add_argument("--mode", default="lora")
            a.add_argument(
                "--launchers", default="ddp,fsdp2,zero1", help="accelerate presets to launch on all GPUs"
            )
            a.add_argument(
                "--launch-timeout", type=float, default=300, help="seconds before a launch is stopped"
            )
            a.add_argument("--skip-single", action="store_true", help="only the accelerate launches")
        elif name == "variant":
            a.add_argument("variant", choices=VARIANTS)
            a.add_argument("--json", required=True)
            a.add_argument("--work", required=True)
        else:
            a.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
            a.add_argument("--variants", help="comma-separated names (`list` shows them)")
            a.add_argument("--group", help="comma-separated groups: " + ", ".join(GROUPS))
            a.add_argument(
                "--variant-timeout", type=float, default=240, help="seconds before a variant is stopped"
            )
            a.add_argument(
                "--no-checks", action="store_true", help="skip the isolation check and kernel timing"
            )
            a.add_argument(
                "--work",
                default="/tmp/bench-work",
                help="the runs' output folders (adapters, a full model): kept out of --out, which comes back",
            )
        if name != "scale":
            a.add_argument(
                "--set", action="append", default=[], help="a cptkit override for every cptkit run"
            )
        a.add_argument("--tiny", action="store_true", help="a 2-layer model and short rows: check on a CPU")
        a.add_argument("--data", default=".bench")
        a.add_argument("--models", default="/tmp/bench-models", help="one folder per model shape, built once")
        a.add_argument("--steps", type=int, default=12)
        a.add_argument(
            "--skip", type=int, default=3, help="untimed first steps (allocator and kernel warm-up)"
        )
    args = p.parse_args()
    if args.what == "data":
        make_data(Path(args.out), Path(args.corpora), args.vocab, args.max_tokens)
    elif args.what == "list":
        sys.stdout.write(listing() + "\n")
    elif args.what == "table":
        print_table(json.loads(Path(args.results).read_text()))
    elif args.what == "calibration":
        write_calibration([Path(p) for p in args.results], Path(args.out))
    elif args.what == "all":
        if not (args.variants or args.group):
            p.error("all: name --variants or --group (`list` shows them)")
        try:
            chosen = select(args.variants, args.group)
        except ValueError as e:
            p.error(str(e))
        run_all(args, chosen)
    elif args.what == "scale":
        run_scale(args)
    else:
        variant = VARIANTS[args.variant].for_tiny() if args.tiny else VARIANTS[args.variant]
        result = run_variant(
            variant, Path(args.models), Path(args.data), args.steps, args.skip, Path(args.work), args.set
        )
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()

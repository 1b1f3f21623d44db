"""Where a training step's time and memory go: torch profiler and saved-tensor accounting of one
decoder-block-level run of `cptkit train`'s model, per configuration.

    python bench/profile_step.py --tokenizer .bench/tokenizer --layers 4 --out OUT \
        --run lora: --run qlora: --run lora-nocast:train.kernels.fast_lora=off

Each `--run NAME:OVERRIDES` (overrides comma-separated `key=value`, as on the cptkit command line) loads
an 8B-shaped Llama (hidden 4096, 32/8 heads, ffn 14336, vocab 128256; `--layers` blocks, random bf16
weights) through `cptkit.model.load.load_model_and_tokenizer`, then times forward + backward + AdamW
steps on packed rows (seq 2048 x batch 8, documents of real lengths) under bf16 autocast as the Trainer
runs them. Per run it writes: median step time, tokens/s, peak allocated memory, the bytes of tensors
saved for backward per block (by dtype and shape), and the profiler's top operators by CUDA time.
A run named `*-nocast` also turns off peft's fp32 cast of the adapter input (the cause under study).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

SEQ, BATCH = 2048, 8
DEVICE = "cuda"


class _NoCuda:
    """torch.cuda's memory and sync calls as no-ops, for the CPU check of the script."""

    def __getattr__(self, name):
        return lambda *a, **k: 0


def build(folder: Path, tokenizer_dir: Path, layers: int, tiny: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336)
    if tiny:  # a check of the script itself on a CPU
        shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    config = LlamaConfig(
        **shape,
        num_hidden_layers=layers,
        vocab_size=128256 if not tiny else len(tok),
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def batch(vocab: int):
    """Packed rows: documents of lengths drawn like real ones (many short, some long), position_ids
    restarting at each."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (BATCH, SEQ), generator=g)
    pos = torch.empty(BATCH, SEQ, dtype=torch.long)
    for row in range(BATCH):
        at = 0
        while at < SEQ:
            n = int(min(SEQ - at, max(16, torch.empty(1).exponential_(1 / 400.0, generator=g).item())))
            pos[row, at : at + n] = torch.arange(n)
            at += n
    return {"input_ids": ids.to(DEVICE), "position_ids": pos.to(DEVICE), "labels": ids.clone().to(DEVICE)}


def one_run(
    name: str, overrides: list[str], model_dir: Path, steps: int, out: Path, with_profile: bool = True
) -> dict:
    import torch

    cuda = torch.cuda if DEVICE == "cuda" else _NoCuda()
    from torch.profiler import ProfilerActivity, profile

    from cptkit.config import Config, build_config
    from cptkit.config.load import apply_overrides
    from cptkit.model.load import load_model_and_tokenizer

    mode = name.split("-")[0]
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "train": {
            "mode": mode,
            "dataset": "/nonexistent",
            "output_dir": "/tmp/profile-out",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "gradient_checkpointing": False,
            "report_to": ["none"],
        },
    }
    apply_overrides(raw, overrides)
    cfg = build_config(Config, raw)
    cuda.empty_cache()
    cuda.reset_peak_memory_stats()
    loaded = load_model_and_tokenizer(cfg.model, cfg.train)
    model = loaded.model
    if name.endswith("-nocast"):
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.cast_input_dtype_enabled = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = batch(model.config.vocab_size)
    weights = cuda.memory_allocated()

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**data, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = cuda.max_memory_allocated()

    # what the forward keeps for backward, by dtype and shape (unique storages)
    seen, by_kind = {p.untyped_storage().data_ptr() for p in model.parameters()}, Counter()  # weights aside

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            by_kind[f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(**data, use_cache=False).loss
    saved = sum(by_kind.values())
    loss.backward()
    opt.zero_grad(set_to_none=True)
    del loss

    table = ""
    if with_profile:
        with profile(
            activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else []),
            profile_memory=True,
        ) as prof:
            for _ in range(2):
                step()
            cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total",
            row_limit=30,
            max_name_column_width=60,
        )
        (out / f"profile-{name}.txt").write_text(table)
    layers = model.config.num_hidden_layers
    result = {
        "run": name,
        "overrides": overrides,
        "layers": layers,
        "median_step_s": statistics.median(times),
        "tokens_per_second": BATCH * SEQ / statistics.median(times),
        "weights_and_state_gib": weights / 2**30,
        "peak_gib": peak / 2**30,
        "saved_for_backward_gib": saved / 2**30,
        "saved_per_block_mib": saved / layers / 2**20,
        "saved_top": [[k, round(v / 2**20, 1)] for k, v in by_kind.most_common(14)],
        "attention": loaded.attention,
        "fused_cross_entropy": loaded.fused_cross_entropy,
    }
    sys.stdout.write(json.dumps(result, indent=1) + "\n" + table[:6000] + "\n")
    model = opt = loaded = params = None
    import gc

    gc.collect()
    cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=".bench/tokenizer")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", required=True)
    p.add_argument("--no-profile", action="store_true", help="time and memory only, no profiler table")
    p.add_argument("--run", action="append", required=True, help="NAME:key=value,key=value")
    args = p.parse_args()
    global DEVICE
    import torch

    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or f"/tmp/profile-8b-{args.layers}l-{DEVICE}")
    build(model_dir, Path(args.tokenizer), args.layers, tiny=DEVICE == "cpu")
    results = []
    for spec in args.run:
        name, _, rest = spec.partition(":")
        results.append(
            one_run(name, [o for o in rest.split(",") if o], model_dir, args.steps, out, not args.no_profile)
        )
        (out / "profile.json").write_text(json.dumps(results, indent=1))
    for r in results:
        sys.stdout.write(
            f"{r['run']:22} {r['tokens_per_second']:9.0f} tok/s  peak {r['peak_gib']:6.1f} GiB  "
            f"saved/block {r['saved_per_block_mib']:7.0f} MiB\n"
        )


if __name__ == "__main__":
    main()

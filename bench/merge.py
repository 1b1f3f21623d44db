"""Benchmark `cptkit merge` of a QLoRA adapter on a Llama-3-8B-shaped model, in one call.

Builds random bf16 base weights (on the GPU when there is one, saved as 5 GB safetensors shards), a
random all-linear r=16 LoRA adapter with peft's config files and a train folder's run_meta.json saying
mode qlora, and a prepared folder whose held-out set is a few random-token documents (random weights
make real text meaningless; the comparison measures how close each merge is to the adapter on the
4-bit base, which random tokens show as well). Then runs `cptkit merge` in a child process (so its peak
RSS is the merge's own; the base is built in another child, so none inherits a large parent): QLoRA mode (merge into the bf16 base and into the NF4-dequantised base in one
pass, then the comparison), and if time allows plain LoRA mode (one merge, no comparison).

    python bench/merge.py                   # Llama-3-8B shape, writes merge.json to $OUT or bench/results
    python bench/merge.py --shape tiny      # a few seconds on a CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=5632,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=1000,
        max_position_embeddings=1024,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base(
    folder: Path, shape: dict, device: torch.device, shard_bytes: int = 5 * 10**9, init: str = "random"
) -> dict:
    """Random bf16 weights for every tensor of the architecture, created on `device`, saved in shards.
    init constant: every weight 0.02 (fast on a CPU; enough to time a plain merge and measure its memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    shards, current, size = [], {}, 0
    for key, s in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(s, dtype=torch.bfloat16, device=device)
        elif init == "constant":
            t = torch.full(s, 0.02, dtype=torch.bfloat16, device=device)
        else:
            t = (torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        current[key] = t.cpu()
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * 2
    shards.clear()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(folder)
    params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    return {"parameters": params, "bytes": total, "seconds": round(time.perf_counter() - start, 1)}


def build_adapter(folder: Path, base: Path, shape: dict, rank: int, mode: str) -> dict:
    """A peft-format LoRA adapter on every linear layer, with non-zero A and B."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    dims = {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(shape["num_hidden_layers"]):
        for name, (out, inp) in dims.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) / inp**0.5).to(
                torch.bfloat16
            )
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * 0.01).to(
                torch.bfloat16
            )
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=TARGETS,
        base_model_name_or_path=str(base),
        task_type="CAUSAL_LM",
    ).save_pretrained(str(folder))
    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    (folder / "run_meta.json").write_text(json.dumps({"mode": mode, "quantization": quant}))
    return {
        "rank": rank,
        "modules": len(tensors) // 2,
        "parameters": sum(t.numel() for t in tensors.values()),
    }


def build_heldout(folder: Path, vocab: int, documents: int, tokens: int) -> None:
    """A prepared folder whose one held-out set is random-token documents."""
    import datasets

    gen = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, vocab, (tokens,), generator=gen).tolist() for _ in range(documents)]
    datasets.Dataset.from_dict(
        {"text": [""] * documents, "input_ids": ids, "num_bytes": [0] * documents}
    ).save_to_disk(str(folder / "heldout" / "random"))
    manifest = {
        "status": "complete",
        "format_version": 1,
        "seq_length": tokens,
        "chunking": "packing",
        "heldout": {
            "random": {
                "dir": "heldout/random",
                "role": "domain",
                "documents": documents,
                "tokens": documents * tokens,
                "bytes": 0,
            }
        },
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_merge(work: Path, mode: str, docs: int, tokens: int) -> dict:
    """`cptkit merge` in a child process; its report, wall time and the child's peak RSS."""
    out = work / f"merged-{mode}"
    cfg = work / f"merge-{mode}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "run_dir": str(work),
                "model": {"name_or_path": str(work / "base")},
                "merge": {
                    "adapter": str(work / "adapter"),
                    "output_dir": str(out),
                    "mode": mode,
                    "dataset": str(work / "data"),
                    "compare_documents": docs,
                    "compare_tokens": docs * tokens,
                    "max_shard_size": "5GB",
                },
            }
        )
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cptkit", "merge", str(cfg)], env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"mode": mode, "error": f"cptkit merge exited {proc.returncode}"}
    report = json.loads((out / "merge_report.json").read_text())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    shutil.rmtree(out)  # room on disk for the next run
    return {
        "mode": mode,
        "wall_seconds_with_startup": round(wall, 1),
        "written_bytes": size,
        **{
            k: report.get(k)
            for k in (
                "kept",
                "why",
                "notes",
                "variants",
                "comparison",
                "merged_modules",
                "nf4_relative_error",
                "nf4_quantized_tensors",
                "output_bytes",
                "merge_phase",
                "resources",
                "device",
            )
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--work",
        default=None,
        help="scratch folder (default: /tmp or ./.bench-merge, whichever has more room)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "bench/results")
    ap.add_argument("--docs", type=int, default=4, help="random-token held-out documents for the comparison")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per document")
    ap.add_argument("--modes", default="qlora,lora", help="merge modes to run, in order")
    ap.add_argument("--init", choices=["random", "constant"], default="random", help="base weights")
    ap.add_argument(
        "--plain-lora-if-under",
        type=float,
        default=200,
        help="also time a plain LoRA merge if the run so far took fewer seconds",
    )
    ap.add_argument("--build-only", metavar="JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.build_only:
        shape, work = SHAPES[args.shape], Path(args.work)
        built = {"base": build_base(work / "base", shape, device, init=args.init)}
        built["adapter"] = build_adapter(work / "adapter", work / "base", shape, args.rank, "qlora")
        build_heldout(work / "data", shape["vocab_size"], args.docs, args.tokens)
        Path(args.build_only).write_text(json.dumps(built))
        return 0
    candidates = [Path("/tmp/cptkit-bench-merge"), Path.cwd() / ".bench-merge"]
    work = Path(args.work) if args.work else max(candidates, key=lambda p: shutil.disk_usage(p.parent).free)
    out = Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.shape]
    result = {
        "shape": args.shape,
        "config": shape,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "heldout": f"{args.docs} random-token documents x {args.tokens} tokens",
        "runs": [],
    }
    # built in a child process: a forked child's peak RSS (ru_maxrss) starts from its parent's, so the
    # process that launches the merges must never have held the base in memory
    log(f"building base {args.shape} on {device} in {work}")
    build = work.parent / f"{work.name}-build.json"
    cmd = [
        sys.executable,
        __file__,
        "--build-only",
        str(build),
        "--shape",
        args.shape,
        "--rank",
        str(args.rank),
        "--work",
        str(work),
        "--docs",
        str(args.docs),
        "--tokens",
        str(args.tokens),
        "--init",
        args.init,
    ]
    result["init"] = args.init
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit("building the base failed")
    result.update(json.loads(build.read_text()))
    log(f"base: {result['base']}; disk free {shutil.disk_usage(work).free / 1e9:.1f} GB")
    save = lambda: (out / "merge.json").write_text(json.dumps(result, indent=2))  # noqa: E731
    save()
    for mode in args.modes.split(","):
        if mode == "lora" and time.perf_counter() - t0 > args.plain_lora_if_under:
            result["runs"].append({"mode": mode, "skipped": "time budget"})
            break
        log(f"cptkit merge, mode {mode}")
        result["runs"].append(run_merge(work, mode, args.docs, args.tokens))
        log(json.dumps({k: v for k, v in result["runs"][-1].items() if k != "comparison"}))
        save()
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    save()
    shutil.rmtree(work, ignore_errors=True)
    build.unlink(missing_ok=True)
    log(f"done in {result['total_seconds']} s -> {out / 'merge.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

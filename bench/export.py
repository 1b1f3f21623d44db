"""GGUF export at two sizes: SmolLM2-135M-Instruct and an 8B-shaped random Llama (Llama-3-8B's config,
random bf16 weights), each as f16, bf16 and q8_0: time, file size, and the round-trip logit differences.

    python bench/export.py random8b --tokenizer MODEL_DIR --out /tmp/llama8b-random   # ~16 GB on disk
    python bench/export.py run --model MODEL_DIR [--model-8b /tmp/llama8b-random] [--no-verify-8b] --out /tmp/export
    python bench/export.py table [--results bench/results/export.json]

`random8b` writes a Llama-3-8B-shaped model folder (hidden 4096, 32 layers, 32 heads / 8 KV heads, MLP 14336,
vocabulary 128,256, untied head): weights drawn N(0, 0.02) (norms 1) in bf16, written to safetensors one
shard at a time (a shard is one layer, the embeddings or the head, so memory stays near 1 GB) with the
index transformers reads; the tokenizer of --tokenizer (SmolLM2's), padded with Llama 3's
`<|reserved_special_token_N|>` tokens up to the vocabulary (`--vocab-size 0` keeps the tokenizer's size
and shrinks the embeddings instead).
`run` writes one config per (model, type) and runs `cptkit export CONFIG --to gguf --type TYPE` on it
(each into its own folder), timing the command; it reads export_report.json: bytes, seconds, the check by
transformers' GGUF loader (max / mean absolute logit difference, top-1 agreement, the tolerance) and
llama.cpp's where it ran. `--no-verify-8b` skips the 8B's check (the HF model and the file loaded back:
tens of GB of memory); the 8B's .gguf files are deleted once measured (they are 8.5-16 GB each) unless
--keep.
Results go to --results (JSON) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "export.json"
TYPES = ("f16", "bf16", "q8_0")
INIT_STD = 0.02

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "torch_dtype": "bfloat16",
}


def shard_plan(config: dict[str, Any]) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(shard file name, {tensor name: shape}) in write order: the embeddings, one shard per decoder layer,
    then the final norm and (untied) the head; the names and shapes of transformers' LlamaForCausalLM."""
    h, m, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    layers = config["num_hidden_layers"]
    total = layers + 2
    name = lambda i: f"model-{i + 1:05d}-of-{total:05d}.safetensors"  # noqa: E731
    plan = [(name(0), {"model.embed_tokens.weight": (v, h)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan.append(
            (
                name(i + 1),
                {
                    p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (heads * d, h),
                    p + "self_attn.k_proj.weight": (kv * d, h),
                    p + "self_attn.v_proj.weight": (kv * d, h),
                    p + "self_attn.o_proj.weight": (h, heads * d),
                    p + "mlp.gate_proj.weight": (m, h),
                    p + "mlp.up_proj.weight": (m, h),
                    p + "mlp.down_proj.weight": (h, m),
                },
            )
        )
    last = {"model.norm.weight": (h,)}
    if not config.get("tie_word_embeddings"):
        last["lm_head.weight"] = (v, h)
    plan.append((name(layers + 1), last))
    return plan


def parameter_count(config: dict[str, Any]) -> int:
    count = 0
    for _, tensors in shard_plan(config):
        for shape in tensors.values():
            n = 1
            for s in shape:
                n *= s
            count += n
    return count


def write_random_llama(config: dict[str, Any], out: Path, seed: int = 0) -> int:
    """A model folder of `config` with random bf16 weights, one safetensors shard in memory at a time;
    returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for file, tensors in shard_plan(config):
        shard = {}
        for tensor, shape in tensors.items():
            if len(shape) == 1:  # the RMS norms' scales
                shard[tensor] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[tensor] = (torch.randn(shape, generator=generator) * INIT_STD).to(torch.bfloat16)
            weight_map[tensor] = file
            total += shard[tensor].numel() * 2
        save_file(shard, str(out / file), metadata={"format": "pt"})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    (out / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return total


def reserved_tokens(tokenizer_size: int, vocab_size: int) -> list[str]:
    """Llama 3's reserved special token names that fill a tokenizer of `tokenizer_size` up to `vocab_size`."""
    return [f"<|reserved_special_token_{i}|>" for i in range(max(0, vocab_size - tokenizer_size))]


def random8b(args) -> None:
    from transformers import AutoTokenizer

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = dict(LLAMA3_8B)
    if args.vocab_size:
        tokenizer.add_tokens(reserved_tokens(len(tokenizer), args.vocab_size), special_tokens=True)
    config["vocab_size"] = args.vocab_size or len(tokenizer)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config[key] = getattr(tokenizer, key)
    start = time.perf_counter()
    size = write_random_llama(config, out, seed=args.seed)
    tokenizer.save_pretrained(str(out))
    print(
        f"{out}: {parameter_count(config):,} parameters, {size / 2**30:.2f} GiB, vocabulary "
        f"{config['vocab_size']:,} (tokenizer {len(tokenizer):,}), {time.perf_counter() - start:.0f} s"
    )


def export_config(model: str, out: Path, gguf_type: str, verify: bool) -> dict[str, Any]:
    """The config `run` exports one (model, type) with: only an export section, its own output folder."""
    return {
        "run_dir": str(out),
        "export": {"to": "gguf", "type": gguf_type, "model": model, "output_dir": str(out), "verify": verify},
    }


def export_one(name: str, model: str, gguf_type: str, work: Path, verify: bool, keep: bool) -> dict[str, Any]:
    import yaml

    out = work / f"{name}-{gguf_type}"
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(export_config(model, out, gguf_type, verify), sort_keys=False))
    command = [sys.executable, "-m", "cptkit", "export", str(config), "--to", "gguf", "--type", gguf_type]
    start = time.perf_counter()
    done = subprocess.run(command, check=False)
    seconds = round(time.perf_counter() - start, 1)
    report_path = out / "export_report.json"
    if done.returncode != 0 or not report_path.is_file():
        return {
            "model": name,
            "type": gguf_type,
            "error": f"exit {done.returncode}",
            "command_seconds": seconds,
        }
    report = json.loads(report_path.read_text(encoding="utf-8"))
    record = row(name, report, seconds)
    if not keep and report.get("path"):
        Path(report["path"]).unlink(missing_ok=True)
        record["deleted"] = True
    return record


def row(name: str, report: dict[str, Any], command_seconds: float | None) -> dict[str, Any]:
    """One (model, type) result from its export_report.json."""
    verify, llama = report.get("verify") or {}, report.get("llama_cpp") or {}
    return {
        "model": name,
        "type": report.get("type"),
        "architecture": report.get("architecture"),
        "bytes": report.get("bytes"),
        "seconds": report.get("seconds"),
        "command_seconds": command_seconds,
        "tensors": report.get("tensors"),
        "verified": bool(verify),
        "max_abs_logit_diff": verify.get("max_abs_logit_diff"),
        "mean_abs_logit_diff": verify.get("mean_abs_logit_diff"),
        "top1_agreement": verify.get("top1_agreement"),
        "tolerance": verify.get("tolerance"),
        "passed": verify.get("passed"),
        "llama_cpp_top1_agreement": llama.get("top1_agreement"),
        "llama_cpp_max_abs_logit_diff": llama.get("max_abs_logit_diff"),
    }


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| model | type | GiB | export s | command s | max abs logit diff | mean abs logit diff | top-1 agree | "
        "passed | llama.cpp top-1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['model']} | {r['type']} | failed: {r['error']} | | | | | | | |")
            continue
        size = r["bytes"] / 2**30 if r.get("bytes") else None
        passed = (
            {True: "yes", False: "**no**", None: "-"}[r.get("passed")] if r["verified"] else "not checked"
        )
        out.append(
            f"| {r['model']} | {r['type']} | {_fmt(size, '.2f')} | {_fmt(r['seconds'], '.1f')} | "
            f"{_fmt(r['command_seconds'], '.1f')} | {_fmt(r['max_abs_logit_diff'], '.4g')} | "
            f"{_fmt(r['mean_abs_logit_diff'], '.4g')} | {_fmt(r['top1_agreement'], '.2%')} | {passed} | "
            f"{_fmt(r['llama_cpp_top1_agreement'], '.2%')} |"
        )
    return out


def run(args) -> None:
    work, results = Path(args.out), Path(args.results)
    models = [("smollm2-135m", args.model, True, True)]
    if args.model_8b:
        models.append(("llama3-8b-random", args.model_8b, not args.no_verify_8b, args.keep))
    done: dict[str, Any] = {"runs": []}
    for name, model, verify, keep in models:
        for gguf_type in args.types:
            record = export_one(name, model, gguf_type, work, verify, keep)
            done["runs"].append(record)
            results.parent.mkdir(parents=True, exist_ok=True)
            results.write_text(json.dumps(done, indent=1), encoding="utf-8")
            print(json.dumps(record), flush=True)
    print("\n".join(table_lines(done["runs"])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("random8b")
    g.add_argument("--tokenizer", required=True, help="a model or tokenizer folder (SmolLM2's)")
    g.add_argument("--out", default="/tmp/llama8b-random")
    g.add_argument("--vocab-size", type=int, default=LLAMA3_8B["vocab_size"], help="0: the tokenizer's size")
    g.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True, help="SmolLM2-135M-Instruct's folder")
    r.add_argument("--model-8b", help="the folder `random8b` wrote")
    r.add_argument("--no-verify-8b", action="store_true", help="skip the 8B's round-trip check")
    r.add_argument("--keep", action="store_true", help="keep the 8B's .gguf files")
    r.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    r.add_argument("--out", default="/tmp/cptkit-export")
    r.add_argument("--results", default=str(RESULTS))
    t = sub.add_parser("table")
    t.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.what == "random8b":
        random8b(args)
    elif args.what == "run":
        run(args)
    else:
        print("\n".join(table_lines(json.loads(Path(args.results).read_text())["runs"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

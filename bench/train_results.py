"""What `bench/train.py` makes of its results JSON: the table with the ratios every claim is stated as
(vs unsloth's fastest setting and vs the seed's recipe, from the same call), and the calibration table
that `cptkit plan` ships (`src/cptkit/presets/calibration.json`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PEAK_BF16_TFLOPS_FALLBACK = 989.0  # H100/H200 dense bf16, where the device name is not in cptkit's list


def checkpointing_kind(run: dict) -> str:
    """none | some | all | offload: what the run did, from cptkit's memory plan where it recorded one,
    else from the setting it was given."""
    plan = run.get("memory_plan") or {}
    if plan.get("checkpointing"):
        return plan["checkpointing"]
    setting = str(run.get("checkpointing", "")).lower()
    return {"true": "all", "unsloth": "offload"}.get(setting, "none")


def predicted_peak_gib(run: dict) -> float | None:
    """The memory plan's predicted peak in GiB, where the run recorded a plan."""
    plan = run.get("memory_plan") or {}
    for key in ("predicted_peak_bytes", "predicted_bytes"):
        if plan.get(key):
            return plan[key] / 2**30
    estimate = plan.get("estimate") or {}
    for key in ("total", "total_bytes"):
        if estimate.get(key):
            return estimate[key] / 2**30
    return plan.get("predicted_peak_gib")


def fast_lora_on(run: dict) -> bool:
    """Whether cptkit's fused LoRA path ran: run_meta.json's `fast_lora` (`fast_lora_status`: layers
    routed, MLPs fused) or `kernels.fast_lora`, in whichever form it was recorded."""
    value = run.get("fast_lora")
    if value is None:
        value = (run.get("kernels") or {}).get("fast_lora")
    if isinstance(value, dict):
        return any(bool(v) for k, v in value.items() if k in ("layers", "routed", "enabled", "on"))
    return bool(value) and value not in ("off", "auto")


def reference_speeds(runs: list[dict]) -> tuple[dict, dict]:
    """Per (mode, seq, batch): unsloth's fastest tokens/s, and the seed recipe's tokens/s (the seed run
    at the same LoRA settings)."""
    unsloth: dict = {}
    seed: dict = {}
    for r in runs:
        key = (r["mode"], r["seq_length"], r["micro_batch"])
        if r["runner"] == "unsloth" and r.get("tokens_per_second"):
            unsloth[key] = max(unsloth.get(key, 0), r["tokens_per_second"])
        if r["runner"] == "seed" and r.get("tokens_per_second"):
            seed[(*key, r["lora"]["r"], tuple(r["lora"]["target_modules"]))] = r["tokens_per_second"]
    return unsloth, seed


def ratios(run: dict, unsloth: dict, seed: dict) -> tuple[float | None, float | None]:
    """(tokens/s over unsloth's fastest at the same mode and rows, over the seed's recipe at the same
    settings); None where the call measured no such reference."""
    tps = run.get("tokens_per_second")
    key = (run["mode"], run["seq_length"], run["micro_batch"])
    lora = run.get("lora") or {}
    seed_tps = seed.get((*key, lora.get("r"), tuple(lora.get("target_modules", ()))))
    if not tps:
        return None, None
    return (tps / unsloth[key] if key in unsloth else None), (tps / seed_tps if seed_tps else None)


def table(report: dict) -> str:
    """The bench's table: one line per run, then the failed and skipped variants."""
    unsloth, seed = reference_speeds(report["runs"])
    head = (
        f"{'variant':30} {'tokens/s':>9} {'MFU':>6} {'peak GiB':>8} {'pred GiB':>8} {'ckpt':>7} "
        f"{'x unsloth':>9} {'x seed':>7}  loss first / last"
    )
    lines = [head]
    for r in report["runs"]:
        vs_unsloth, vs_seed = ratios(r, unsloth, seed)
        losses = [r["losses"][k] for k in sorted(r["losses"], key=int)]
        predicted = predicted_peak_gib(r)
        lines.append(
            f"{r['variant']:30} {_num(r.get('tokens_per_second'), '9.0f')} "
            f"{_num(100 * r['mfu'] if r.get('mfu') else None, '5.1f', '%')} "
            f"{_num(r.get('peak_memory_gib'), '8.1f')} {_num(predicted, '8.1f')} {checkpointing_kind(r):>7} "
            f"{_num(vs_unsloth, '8.2f', 'x')} {_num(vs_seed, '6.2f', 'x')}  "
            + (f"{losses[0]:.4f} / {losses[-1]:.4f}" if losses else "-")
        )
    lines += [f"{f['variant']:30} failed: {f['rc']}" for f in report.get("failures", [])]
    lines += [f"{s['variant']:30} skipped: {s['reason']}" for s in report.get("skipped", [])]
    return "\n".join(lines)


def _num(value: float | None, spec: str, unit: str = "") -> str:
    """`value` formatted by `spec` and followed by `unit`, or a dash as wide where there is none."""
    width = int(spec.split(".")[0]) + len(unit)
    return f"{value:{spec}}{unit}" if value is not None else f"{'-':>{width}}"


def print_table(report: dict) -> None:
    sys.stdout.write(table(report) + "\n")


def calibration(reports: list[dict], sources: list[str]) -> dict:
    """The calibration table of `cptkit plan`: the measured cptkit runs of one or more calls (on one
    device), one row each; the date, device and versions are the first call's."""
    from cptkit.model.flops import peak_tflops

    devices = {r.get("device") for r in reports}
    if len(devices) > 1:
        raise SystemExit(
            f"{', '.join(sources)}: measured on different devices ({', '.join(map(str, devices))})"
        )
    rows = [
        {
            "variant": r["variant"],
            "mode": r["mode"],
            "params": r["params"],
            "seq_length": r["seq_length"],
            "micro_batch": r["micro_batch"],
            "checkpointing": checkpointing_kind(r),
            "fast_lora": fast_lora_on(r),
            "tokens_per_second": round(r["tokens_per_second"], 1),
            "mfu": round(r["mfu"], 4),
            "peak_gib": round(r["peak_memory_gib"], 2) if r.get("peak_memory_gib") else None,
            "predicted_peak_gib": _rounded(predicted_peak_gib(r)),
        }
        for report in reports
        for r in report["runs"]
        if r.get("runner") == "cptkit" and r.get("tokens_per_second") and r.get("mfu")
    ]
    if not rows:
        raise SystemExit(f"{', '.join(sources)}: no cptkit run with a measured speed to calibrate from")
    first = reports[0]
    return {
        "measured": first.get("date"),
        "device": first.get("device"),
        "peak_bf16_tflops": peak_tflops(first.get("device") or "") or PEAK_BF16_TFLOPS_FALLBACK,
        "versions": first.get("versions", {}),
        "source": ", ".join(sources),
        "rows": rows,
    }


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def write_calibration(results: list[Path], out: Path) -> None:
    table = calibration([json.loads(p.read_text()) for p in results], [str(p) for p in results])
    out.write_text(json.dumps(table, indent=2) + "\n")
    sys.stdout.write(f"{out}: {len(table['rows'])} rows from {table['source']}\n")

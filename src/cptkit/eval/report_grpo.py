"""The report's GRPO and export parts: what `cptkit grpo` wrote (metrics.jsonl, run_meta.json,
grpo_prompts.json, grpo_scores.json) and what `cptkit export` wrote (export_report.json), as report.json
blocks and report.md sections.

Both stages are optional: a run without their folders has no block and no `missing` line; a folder that
exists without the file the stage writes last is named in `missing`, with the command that makes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptkit.eval.report import _num, _read_json, read_metrics, train_summary
from cptkit.eval.results import markdown_table
from cptkit.paths import Paths

GRPO_COMMAND = "`cptkit grpo CONFIG.yaml`"
EXPORT_COMMAND = "`cptkit export CONFIG.yaml --to gguf`"
REWARD_PREFIX = "rewards/"
REWARD_SUFFIX = "/mean"
SAMPLES_SHOWN = 3


def grpo_summary(paths: Paths, missing: list[str]) -> dict[str, Any] | None:
    """The GRPO block: the training summary (steps, the total and per-function rewards first -> last
    logged, KL, completion length, seconds), the prompt counts and the held-out scores before -> after.
    None when the run has no GRPO folder; each absent file of an existing one is added to `missing`."""
    if paths.grpo is None or not paths.grpo.is_dir():
        return None
    block: dict[str, Any] = {}
    if paths.grpo_metrics.is_file():
        block["train"] = grpo_train_summary(paths.grpo_metrics, paths.grpo_meta)
    else:
        missing.append(f"grpo: no {paths.grpo_metrics} (run {GRPO_COMMAND})")
    if paths.grpo_prompts.is_file():
        stats = _read_json(paths.grpo_prompts)
        keys = ("prompts", "template", "records", "skipped", "train_prompts", "heldout_prompts")
        block["prompts"] = {k: stats.get(k) for k in (*keys, "heldout_source")}
    if paths.grpo_scores.is_file():
        scores = _read_json(paths.grpo_scores)
        keys = ("rewards", "sampling", "prompts", "before", "after", "samples")
        block["heldout"] = {k: scores.get(k) for k in keys}
    else:
        missing.append(f"grpo: no {paths.grpo_scores} (held-out scores; run {GRPO_COMMAND})")
    return block or None


def grpo_train_summary(metrics: Path, meta_path: Path) -> dict[str, Any]:
    """`train_summary` of the GRPO run plus what GRPO logs under TRL's names: the total reward and each
    reward function's mean (first and last logged value, and the curve), KL and completion length."""
    rows, _ = read_metrics(metrics)
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    names = sorted(
        {
            k[len(REWARD_PREFIX) : -len(REWARD_SUFFIX)]
            for r in rows
            for k in r
            if k.startswith(REWARD_PREFIX) and k.endswith(REWARD_SUFFIX)
        }
    )
    return {
        **train_summary(metrics, meta_path),
        "reward": _first_last(rows, "reward"),
        "rewards": {n: _first_last(rows, f"{REWARD_PREFIX}{n}{REWARD_SUFFIX}") for n in names},
        "kl_last": _first_last(rows, "kl")["last"],
        "completion_length": _first_last(rows, "completions/mean_length"),
        "curve": {
            "steps": [r.get("step") for r in rows],
            "reward": [r.get("reward") for r in rows],
            **{n: [r.get(f"{REWARD_PREFIX}{n}{REWARD_SUFFIX}") for r in rows] for n in names},
        },
        "seconds": meta.get("seconds"),
        "status": meta.get("status"),
        "base_model": meta.get("base_model"),
    }


def _first_last(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The first and last logged numbers of `key` (None where it was never logged)."""
    found = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]
    return {"first": found[0] if found else None, "last": found[-1] if found else None}


def export_summary(paths: Paths, missing: list[str]) -> dict[str, Any] | None:
    """export_report.json's numbers (file, type, size, time, the round-trip check, llama.cpp's check); None
    without an export folder; an export folder without the report is added to `missing`."""
    if paths.export is None or not paths.export.is_dir():
        return None
    if not paths.export_report.is_file():
        missing.append(f"export: no {paths.export_report} (run {EXPORT_COMMAND})")
        return None
    r = _read_json(paths.export_report)
    keys = (
        "source",
        "architecture",
        "type",
        "path",
        "bytes",
        "seconds",
        "tensors",
        "vocab_size",
        "tokenizer",
    )
    return {**{k: r.get(k) for k in keys}, "verify": r.get("verify"), "llama_cpp": r.get("llama_cpp")}


def grpo_headline(grpo: dict[str, Any]) -> str | None:
    """One line for the report's top: the held-out reward before -> after (None before it is scored)."""
    held = grpo.get("heldout") or {}
    before, after = (held.get("before") or {}).get("reward"), (held.get("after") or {}).get("reward")
    if before is None or after is None:
        return None
    return (
        f"- **grpo** on {_num(held.get('prompts'))} held-out prompts: reward {before:.3f} -> {after:.3f} "
        f"({after - before:+.3f})"
    )


def grpo_markdown(grpo: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """The GRPO section: training in one line, the held-out rewards before -> after per function, and a
    few held-out completions before and after."""
    out = ["## GRPO", ""]
    t, p = grpo.get("train"), grpo.get("prompts")
    if t:
        r, length = t["reward"], t["completion_length"]
        out += [
            f"mode {_num(t['mode'])}, {_num(t['final_step'])} steps in {_num(t['seconds'], '.0f')} s; "
            f"reward {_num(r['first'], '.3f')} -> {_num(r['last'], '.3f')} (first -> last logged), KL "
            f"{_num(t['kl_last'], '.4f')}, completion length {_num(length['first'], '.1f')} -> "
            f"{_num(length['last'], '.1f')} tokens, peak memory {_num(t['max_peak_memory_gb'], '.1f')} GB",
        ]
    if p:
        skipped = ", ".join(f"{k} {v}" for k, v in (p.get("skipped") or {}).items()) or "none"
        out.append(
            f"prompts: {_num(p.get('records'))} records of `{p.get('prompts')}` (template {p.get('template')}), "
            f"{_num(p.get('train_prompts'))} trained on and {_num(p.get('heldout_prompts'))} held out "
            f"({p.get('heldout_source')}); skipped: {skipped}"
        )
    out.append("")
    held = grpo.get("heldout")
    if held:
        out += _heldout_table(held, t) + [""]
        out += _samples(held.get("samples") or [])
    if "grpo" in plots:
        out += [f"![grpo]({plots['grpo']})", ""]
    return out


def _heldout_table(held: dict[str, Any], train: dict[str, Any] | None) -> list[str]:
    """Per reward function (and the weighted total): the held-out mean before -> after, and in training
    the first -> last logged mean."""
    before, after = held.get("before") or {}, held.get("after") or {}
    sampling = held.get("sampling") or {}
    rows = []
    for r in held.get("rewards") or []:
        name = r["name"]
        logged = ((train or {}).get("rewards") or {}).get(name) or {}
        rows.append(_row(f"{name} ({r.get('type')})", r.get("weight"), before, after, name, logged))
    total = (train or {}).get("reward") or {}
    rows.append(_row("**total**", None, before, after, None, total))
    chars = [
        "completion chars",
        "-",
        _num(before.get("completion_chars"), ".1f"),
        _num(after.get("completion_chars"), ".1f"),
        "-",
        "-",
    ]
    return [
        f"Held-out: {_num(held.get('prompts'))} prompts, greedy, at most "
        f"{_num(sampling.get('max_new_tokens'))} new tokens; `{before.get('model')}` before, the trained "
        "policy after.",
        "",
        *markdown_table(
            ["reward", "weight", "held-out before", "held-out after", "change", "training first -> last"],
            [*rows, chars],
            [False] + [True] * 5,
        ),
    ]


def _row(
    label: str,
    weight: Any,
    before: dict[str, Any],
    after: dict[str, Any],
    name: str | None,
    logged: dict[str, Any],
) -> list[str]:
    b = before.get("reward") if name is None else (before.get("rewards") or {}).get(name)
    a = after.get("reward") if name is None else (after.get("rewards") or {}).get(name)
    change = f"{a - b:+.3f}" if a is not None and b is not None else "-"
    trained = f"{_num(logged.get('first'), '.3f')} -> {_num(logged.get('last'), '.3f')}"
    return [label, _num(weight), _num(b, ".3f"), _num(a, ".3f"), change, trained]


def _samples(samples: list[dict[str, Any]]) -> list[str]:
    if not samples:
        return []
    out = ["Held-out completions before -> after (greedy):", ""]
    for s in samples[:SAMPLES_SHOWN]:
        answer = f" (answer `{_one_line(s['answer'])}`)" if s.get("answer") is not None else ""
        out += [
            f"- prompt `{_one_line(s.get('prompt'), keep_end=True)}`{answer}",
            f"  - before ({_num(s.get('reward_before'), '.2f')}): `{_one_line(s.get('before'))}`",
            f"  - after ({_num(s.get('reward_after'), '.2f')}): `{_one_line(s.get('after'))}`",
        ]
    return out + [""]


def _one_line(text: Any, width: int = 120, keep_end: bool = False) -> str:
    """`text` on one line of at most `width` characters; `keep_end` keeps its end (a rendered prompt
    starts with the same system turn every time and ends with the question)."""
    flat = " ".join(str(text).split()).replace("`", "'")
    if len(flat) <= width:
        return flat
    return "..." + flat[-(width - 3) :] if keep_end else flat[: width - 3] + "..."


def export_markdown(export: dict[str, Any]) -> list[str]:
    """The Export section: the file, and a table of its checks (transformers' GGUF loader, llama.cpp)."""
    size = export.get("bytes")
    out = [
        "## Export",
        "",
        f"`{export.get('path')}`: {export.get('architecture')} as GGUF {export.get('type')}, "
        f"{_num(size / 2**20 if size else None, ',.1f')} MiB, {_num(export.get('tensors'))} tensors, "
        f"vocabulary {_num(export.get('vocab_size'))}, written in {_num(export.get('seconds'), '.1f')} s "
        f"from `{export.get('source')}`",
        "",
    ]
    rows = []
    for label, check in (
        ("transformers GGUF loader", export.get("verify")),
        ("llama.cpp", export.get("llama_cpp")),
    ):
        if not check:
            rows.append([label, "not run", "-", "-", "-", "-", "-"])
            continue
        passed = check.get("passed")
        rows.append(
            [
                label,
                {True: "passed", False: "**failed**", None: "-"}[passed],
                _num(check.get("tokens")),
                _num(check.get("max_abs_logit_diff"), ".4g"),
                _num(check.get("mean_abs_logit_diff"), ".4g"),
                _num(check.get("top1_agreement"), ".2%"),
                _num(check.get("tolerance"), ".4g"),
            ]
        )
    head = ["check", "result", "tokens", "max abs logit diff", "mean abs logit diff", "top-1 agreement"]
    return out + markdown_table([*head, "tolerance"], rows, [False, False] + [True] * 5) + [""]

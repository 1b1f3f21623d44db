"""What a run folder says about itself: data (manifest), training (metrics.jsonl, run_meta.json),
evaluation (results.json), the SFT stage's training and evaluation, GRPO's training and held-out rewards
and the exported file's checks when they ran (`cptkit.eval.report_grpo`), gathered into one dict
(report.json) and a one-page report.md.

Every part is optional: a report of a run that has not been trained yet still shows its data, and
says which parts are missing and which command makes them.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from cptkit.data.fertility import before_after
from cptkit.data.prepared import Prepared
from cptkit.data.vocabulary_file import read_vocabulary
from cptkit.eval.results import (
    REPORT_WORDING,
    SUMMARY_KEYS,
    delta_verdict,
    interval_text,
    markdown_table,
    perplexity_change,
    results_table,
)
from cptkit.eval.tradeoff import describe_best, is_point
from cptkit.paths import Paths
from cptkit.train.budget import budget_text

log = logging.getLogger(__name__)


def gather(paths: Paths) -> dict[str, Any]:
    """report.json's content: the numbers of each stage found where `paths` says, and what is missing."""
    report: dict[str, Any] = {"run_dir": str(paths.run_dir), "missing": []}
    if paths.manifest is not None and paths.manifest.is_file():
        report["data"] = data_summary(Prepared.read(paths.prepared))
    else:
        report["missing"].append(f"data: no {paths.manifest} (run `cptkit prepare`)")
    if paths.train_metrics is not None and paths.train_metrics.is_file():
        report["train"] = train_summary(paths.train_metrics, paths.train_meta)
    else:
        report["missing"].append(f"train: no {paths.train_metrics} (run `cptkit train`)")
    if paths.eval_results is not None and paths.eval_results.is_file():
        report["eval"] = _eval_summary(paths.eval_results)
    else:
        report["missing"].append(f"eval: no {paths.eval_results} (run `cptkit eval`)")
    sft = sft_summary(paths)
    if sft:
        report["sft"] = sft
    from cptkit.eval.report_grpo import export_summary, grpo_summary

    if grpo := grpo_summary(paths, report["missing"]):
        report["grpo"] = grpo
    if export := export_summary(paths, report["missing"]):
        report["export"] = export
    if paths.merge_report is not None and paths.merge_report.is_file():
        m = _read_json(paths.merge_report)
        report["merge"] = {
            k: m.get(k) for k in ("kept", "why", "mode", "dtype", "comparison", "resources", "notes")
        }
    return report


def sft_summary(paths: Paths) -> dict[str, Any] | None:
    """The SFT stage's training, data (sft_data.json) and evaluation (sft/eval/results.json), if it ran."""
    if paths.sft_metrics is None or not paths.sft_metrics.is_file():
        return None
    out: dict[str, Any] = {"train": train_summary(paths.sft_metrics, paths.sft_meta)}
    if paths.sft_data.is_file():
        stats = _read_json(paths.sft_data)
        keys = ("format", "template", "records", "skipped", "truncated", "train_examples", "heldout_examples")
        out["data"] = {k: stats.get(k) for k in (*keys, "tokens", "trained_tokens", "packing_efficiency")}
    if paths.sft_eval_results.is_file():
        out["eval"] = _eval_summary(paths.sft_eval_results)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _eval_summary(results: Path) -> dict[str, Any]:
    data = _read_json(results)
    keys = ("tasks", "task_deltas", "interpolation", "chat_probe", "samples")
    return {
        "results": data.get("results", []),
        "deltas": data.get("deltas", []),
        **{k: data[k] for k in keys if data.get(k)},
    }


_SOURCE_KEYS = (
    "role",
    "weight",
    "documents",
    "tokens",
    "train_tokens",
    "mixed_tokens",
    "heldout_documents",
    "duplicates",
)


def data_summary(prepared: Prepared) -> dict[str, Any]:
    """Per source counts and mix shares, the totals and how the rows were made."""
    sources = {}
    for name, s in prepared.sources.items():
        sources[name] = {k: s.get(k) for k in _SOURCE_KEYS}
        sources[name]["dropped"] = sum((s.get("drops") or {}).values())
        sources[name]["drops"] = s.get("drops") or {}
        sources[name]["fertility"] = s.get("fertility")  # absent from manifests made before it was counted
    mixed = sum(s.get("mixed_tokens") or 0 for s in sources.values())
    for s in sources.values():
        s["mix_share"] = (s.get("mixed_tokens") or 0) / mixed if mixed else None
    return {
        "sources": sources,
        "totals": prepared.totals,
        "seq_length": prepared.seq_length,
        "chunking": prepared.chunking,
        "tokenizer": prepared.tokenizer.get("name_or_path"),
        **({"vocabulary": vocabulary} if (vocabulary := vocabulary_summary(prepared)) else {}),
    }


def vocabulary_summary(prepared: Prepared) -> dict[str, Any] | None:
    """The vocabulary extension the prepared folder holds (`vocabulary.json`): the base and extended
    sizes, the tokens added and each source's tokens per 1k chars before -> after; None without one."""
    vocabulary = read_vocabulary(prepared.folder)
    if vocabulary is None:
        return None
    return {
        "base": vocabulary.base_name,
        "base_size": vocabulary.base_size,
        "size": vocabulary.size,
        "added": len(vocabulary.tokens),
        "fertility": vocabulary.fertility,
    }


def fertility_markdown(data: dict[str, Any]) -> list[str]:
    """Tokens the tokenizer spends per source (per 1k chars, per word or, without spaces, per char), and
    with a vocabulary extension its tokens per 1k chars before -> after; nothing for an older manifest."""
    sources = data["sources"]
    if not any(s.get("fertility") for s in sources.values()):
        return []
    vocabulary = data.get("vocabulary")
    head = ["source", "tokens / 1k chars", "tokens / word", "tokens / char"]
    if vocabulary:
        head.append("tokens / 1k chars: base -> extended")
    rows = []
    for name, s in sources.items():
        f = s.get("fertility") or {}
        no_words = f.get("unit") == "character"
        row = [
            name,
            _num(f.get("tokens_per_1k_chars"), ".1f"),
            "- (no spaces)" if no_words else _num(f.get("tokens_per_word"), ".3f"),
            _num(f.get("tokens_per_char"), ".4f"),
        ]
        if vocabulary:
            row.append(before_after(vocabulary, name) or "-")
        rows.append(row)
    out = ["### Fertility", ""]
    if vocabulary:
        out += [
            f"The vocabulary of `{vocabulary['base']}` extended by {_num(vocabulary['added'])} tokens "
            f"({_num(vocabulary['base_size'])} -> {_num(vocabulary['size'])}).",
            "",
        ]
    return out + markdown_table(head, rows, [False] + [True] * (len(head) - 1)) + [""]


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, eval lines) of metrics.jsonl; a torn last line (a run still writing) is skipped."""
    train, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("type") == "eval":
            evals.append(row)
        elif row.get("type", "train") == "train":
            train.append(row)
    return train, evals


def train_summary(metrics: Path, meta_path: Path) -> dict[str, Any]:
    train, evals = read_metrics(metrics)
    meta = _read_json(meta_path) if meta_path.is_file() else {}

    def values(key: str) -> list[float]:
        return [r[key] for r in train if isinstance(r.get(key), (int, float))]

    tps, mem, mfu = values("tokens_per_second"), values("peak_memory_gb"), values("mfu")
    heldout: dict[str, dict[str, Any]] = {}
    for r in evals:
        s = heldout.setdefault(r["set"], {"role": r.get("role"), "steps": [], "loss": []})
        s["steps"].append(r["step"])
        s["loss"].append(r["loss"])
    return {
        "steps": [r.get("step") for r in train],
        "loss": [r.get("loss") for r in train],
        "learning_rate": [r.get("learning_rate") for r in train],
        "tokens_per_second": [r.get("tokens_per_second") for r in train],
        "peak_memory_gb": [r.get("peak_memory_gb") for r in train],
        "heldout": heldout,
        "final_step": train[-1]["step"] if train else None,
        "final_loss": train[-1].get("loss") if train else None,
        "median_tokens_per_second": statistics.median(tps) if tps else None,
        "max_peak_memory_gb": max(mem) if mem else None,
        "median_mfu": statistics.median(mfu) if mfu else None,
        "trained_tokens": train[-1].get("trained_tokens") if train else None,
        "mode": meta.get("mode"),
        "attention": meta.get("attention"),
        "hardware": meta.get("hardware"),
        "forgetting_budget": meta.get("forgetting_budget"),
    }


def _num(x: Any, fmt: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool) and fmt == ".4g":
        return f"{x:,}"
    return format(x, fmt) if isinstance(x, (int, float)) else str(x)


def _verdict(d: dict[str, Any]) -> str:
    """One line: a model's perplexity on one set before -> after, and what that means for its role."""
    change = perplexity_change(d["perplexity_before"], d["perplexity_after"])
    interval = d.get("perplexity_change_interval")
    within = f" {interval_text(interval)}" if interval else ""
    return (
        f"- **{d['model']}** on {d['role']} set `{d['set']}`: perplexity {d['perplexity_before']:.3f} -> "
        f"{d['perplexity_after']:.3f} ({change:+.1f}%{within}), bits/byte {d['bpb_delta']:+.4f}: "
        f"{delta_verdict(d, REPORT_WORDING)}"
    )


def _sft_eval(report: dict[str, Any]) -> dict[str, Any]:
    return (report.get("sft") or {}).get("eval") or {}


def _results_table(results: list[dict[str, Any]]) -> list[str]:
    return results_table(results, SUMMARY_KEYS)


def _tasks_section(evaluation: dict[str, Any]) -> list[str]:
    """The downstream task scores of an evaluation, each model against the base (none ran: nothing)."""
    from cptkit.eval.task_results import tasks_markdown

    return tasks_markdown(evaluation, heading="### Downstream tasks")


def _sft_markdown(sft: dict[str, Any]) -> list[str]:
    t, d = sft["train"], sft.get("data") or {}
    out = [
        "## SFT",
        "",
        f"mode {_num(t['mode'])}, {_num(t['final_step'])} steps, final loss {_num(t['final_loss'])}, median "
        f"{_num(t['median_tokens_per_second'], '.0f')} tokens/s, peak memory {_num(t['max_peak_memory_gb'], '.1f')} GB",
    ]
    if d:
        skipped = ", ".join(f"{k} {v}" for k, v in (d.get("skipped") or {}).items()) or "none"
        out.append(
            f"data: {_num(d.get('records'))} records ({d.get('format')}, template {d.get('template')}), "
            f"{_num(d.get('train_examples'))} trained and {_num(d.get('heldout_examples'))} held out; "
            f"loss on {_num(d.get('trained_tokens'))} response tokens of {_num(d.get('tokens'))}; "
            f"skipped: {skipped}; truncated: {_num(d.get('truncated'))}"
        )
    out.append("")
    results = (sft.get("eval") or {}).get("results") or []
    if results:
        out += _results_table(results) + [""]
    return out + _tasks_section(sft.get("eval") or {})


def interpolation_markdown(block: dict[str, Any] | None, plots: dict[str, str]) -> list[str]:
    """eval.interpolate's points (scale, domain and general perplexity change, within the budget), the
    best one, and the trade-off plot; nothing when the sweep did not run."""
    if not block:
        return []

    def percent(x: float | None) -> str:
        return "-" if x is None else f"{x:+.2%}"

    rows = [
        [
            f"{p['scale']:g}",
            percent(p["domain_change"]),
            percent(p["general_change"]),
            {True: "yes", False: "no", None: "-"}[p["within_budget"]],
        ]
        for p in block["points"]
    ]
    out = [
        "### Interpolation between base and adapted",
        "",
        f"The {block['mode']} model at scales between the base (0) and itself (1), scored without writing a "
        f"model; perplexity changes against the base over all sets of each role. Budget "
        f"{block['budget']:+.2%} ({block['budget_from']}).",
        "",
        *markdown_table(
            ["scale", "domain ppl change", "general ppl change", "within budget"], rows, [True] * 4
        ),
        "",
        f"{describe_best(block)}: {block['why']}",
        "",
    ]
    return out + ([f"![trade-off]({plots['tradeoff']})", ""] if "tradeoff" in plots else [])


def _generation_markdown(report: dict[str, Any]) -> list[str]:
    """The chat probe (answer loss of instruction examples, against the base) and the sample generations."""
    from cptkit.eval import chat_probe, samples

    out = []
    for title, found in (("", report.get("eval") or {}), (" (SFT evaluation)", _sft_eval(report))):
        if found.get("chat_probe"):
            out += [f"## Chat behaviour{title}", "", *chat_probe.markdown_lines(found["chat_probe"]), ""]
    if (report.get("eval") or {}).get("samples"):
        out += ["## Sample generations", "", "Greedy raw continuations (no chat template).", ""]
        out += samples.markdown_lines(report["eval"]["samples"])
    return out


def markdown(report: dict[str, Any], plots: dict[str, str]) -> str:
    """One page: the verdict first (gain, forgetting), then data, training, evaluation, with the plots."""
    out = [f"# cptkit report: {report['run_dir']}", ""]
    sft_deltas = [d for d in _sft_eval(report).get("deltas", []) if d.get("model") == "sft"]
    deltas = [*((report.get("eval") or {}).get("deltas") or []), *sft_deltas]
    deltas = [d for d in deltas if not is_point(d["model"])]  # the interpolation section has those
    from cptkit.eval import report_grpo

    lines = [_verdict(d) for d in deltas]
    if (grpo_line := report_grpo.grpo_headline(report.get("grpo") or {})) is not None:
        lines.append(grpo_line)
    if lines:
        out += ["## In one line per set", "", *lines, ""]
    if report.get("missing"):
        out += ["## Missing", ""] + [f"- {m}" for m in report["missing"]] + [""]
    if "data" in report:
        d = report["data"]
        out += [
            "## Data",
            "",
            f"chunking `{d['chunking']}`, seq_length {d['seq_length']}, tokenizer `{d['tokenizer']}`; "
            f"rows {_num(d['totals'].get('rows'))}, trained tokens {_num(d['totals'].get('trained_tokens'))}, "
            f"packing efficiency {_num(d['totals'].get('packing_efficiency'), '.3f')}",
            "",
            "| source | role | weight | documents | tokens | mixed tokens | mix share | held-out docs | duplicates | dropped |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, s in d["sources"].items():
            drops = ", ".join(f"{k} {v}" for k, v in s["drops"].items()) or "0"
            out.append(
                f"| {name} | {s['role']} | {_num(s['weight'])} | {_num(s['documents'])} | {_num(s['tokens'])} | "
                f"{_num(s['mixed_tokens'])} | {_num(s['mix_share'], '.1%')} | {_num(s['heldout_documents'])} | "
                f"{_num(s['duplicates'])} | {drops} |"
            )
        out += [""] + fertility_markdown(d)
    if "train" in report:
        t = report["train"]
        out += [
            "## Training",
            "",
            f"mode {_num(t['mode'])}, attention {_num(t['attention'])}, {_num(t['final_step'])} steps, "
            f"final loss {_num(t['final_loss'])}, trained tokens {_num(t['trained_tokens'])}, median "
            f"{_num(t['median_tokens_per_second'], '.0f')} tokens/s, MFU {_num(t['median_mfu'], '.1%')}, "
            f"peak memory {_num(t['max_peak_memory_gb'], '.1f')} GB",
            "",
        ]
        if t.get("forgetting_budget"):
            out += [f"Forgetting budget: the run {budget_text(t['forgetting_budget'])}.", ""]
        out += [f"![{k}]({v})" for k, v in plots.items() if k in ("training", "heldout", "throughput")] + [""]
    if "eval" in report:
        out += ["## Evaluation", ""] + _results_table(report["eval"]["results"])
        out += [""] + ([f"![perplexity]({plots['perplexity']})", ""] if "perplexity" in plots else [])
        out += interpolation_markdown(report["eval"].get("interpolation"), plots)
        out += _tasks_section(report["eval"])
    if "sft" in report:
        out += _sft_markdown(report["sft"])
    if "grpo" in report:
        out += report_grpo.grpo_markdown(report["grpo"], plots)
    if "export" in report:
        out += report_grpo.export_markdown(report["export"])
    out += _generation_markdown(report)
    if "merge" in report:
        m = report["merge"]
        out += [
            "## Merge",
            "",
            f"kept `{m['kept']}` ({m['why']}); {_num((m.get('resources') or {}).get('wall_seconds'))} s",
            "",
        ]
    return "\n".join(out)

"""The `cptkit` command. Subcommands import their modules lazily so `cptkit --help` is instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cptkit import __version__

CONFIG_COMMANDS = {
    "prepare": "raw corpora -> tokenized, chunked, mixed, packed dataset with held-out sets",
    "train": "continued pretraining (full, LoRA, QLoRA) on a prepared dataset",
    "merge": "merge a LoRA adapter into its base model",
    "eval": "perplexity and bits-per-byte of models on the held-out sets",
    "sft": "supervised fine-tuning on instruction data (loss on responses only)",
    "grpo": "reinforcement learning with group-relative rewards (TRL's GRPO) after SFT",
    "run": "every configured stage in order: prepare -> train -> merge -> eval -> sft -> report",
    "config": "validate a config and print it as cptkit resolves it (defaults, presets, overrides, folders)",
    "export": "the final model (an adapter merged first) as a GGUF file for llama.cpp, checked by loading it back",
    "plan": "before a run: tokens, steps, the memory plan on a GPU, predicted speed and time, warnings",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cptkit",
        description="Continued pretraining of LLMs: prepare -> train -> merge -> eval -> sft -> report.",
        epilog="Every config command takes CONFIG.yaml and optional overrides, e.g. "
        "`cptkit train run.yaml train.hf.learning_rate=1e-4 data.sources[0].weight=0.5`.",
    )
    parser.add_argument("--version", action="version", version=f"cptkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in CONFIG_COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        what = "YAML config file, or a model folder" if name == "export" else "YAML config file"
        p.add_argument("config", help=what)
        p.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE overrides, e.g. data.seq_length=1024")
        if name == "run":
            p.add_argument(
                "--from", dest="from_stage", help="start at this stage (earlier ones must be done)"
            )
            p.add_argument("--only", dest="only_stage", help="run only this stage")
        if name == "prepare":
            p.add_argument(
                "--force", action="store_true", help="redo every step even if its outputs are current"
            )
        if name == "plan":
            add_plan_arguments(p)
        if name == "export":
            add_export_arguments(p)
    p = sub.add_parser("inspect", help="show a prepared dataset's manifest")
    p.add_argument("prepared_dir", help="folder written by cptkit prepare")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p = sub.add_parser("report", help="report.md, report.json and plots for a run (its config or its folder)")
    p.add_argument(
        "config", help="the run's YAML config, or its run folder (holding data/, train/, eval/ ...)"
    )
    p.add_argument("overrides", nargs="*", help="KEY.PATH=VALUE overrides of the config")
    p = sub.add_parser("demo", help="the whole pipeline offline on real text, a few minutes on a CPU")
    p.add_argument("--gpu", action="store_true", help="a larger run for a GPU")
    p.add_argument("--run-dir", default="runs/demo", help="where the demo writes (default runs/demo)")
    return parser


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gpu", help="plan for this GPU too, e.g. h100-80gb, a100-40gb, rtx4090 (a wrong name lists them)"
    )
    p.add_argument(
        "--model-config", help="the model's config.json (or its folder) when the model is not on disk"
    )
    p.add_argument("--num-gpus", type=int, default=1, help="processes the run trains on (default 1)")
    p.add_argument(
        "--sharded", action="store_true", help="weights split over the GPUs (FSDP, DeepSpeed ZeRO-3)"
    )
    p.add_argument(
        "--sample-mb", type=float, default=4.0, help="MB read per source to estimate unprepared data"
    )
    p.add_argument("--json", help="also write the plan as JSON to this file")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--to", choices=["gguf"], help="the format (default: export.to, gguf)")
    p.add_argument(
        "--type", choices=["f16", "bf16", "q8_0"], help="weight matrix type (default: export.type, f16)"
    )
    p.add_argument("--output", help="the .gguf file to write (default: RUN_DIR/export/<name>.<type>.gguf)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from cptkit.errors import CptkitError

    module = importlib.import_module(f"cptkit.commands.{args.command}")
    try:
        result = module.main(args)
    except CptkitError as e:
        if args.verbose:
            raise
        print(f"cptkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cptkit {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())

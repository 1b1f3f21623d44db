"""`cptkit inspect DIR`: a prepared dataset's manifest as tables (or raw JSON with --json)."""

from __future__ import annotations

import json
import sys

from cptkit.data.manifest import read_manifest


def main(args) -> int:
    manifest = read_manifest(args.prepared_dir)
    if args.json:
        sys.stdout.write(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        return 0
    from rich.console import Console

    from cptkit.data.summary import print_summary

    console = Console()
    console.print(
        f"{args.prepared_dir}: prepared {manifest.get('created', '?')}, format {manifest['format_version']}"
    )
    print_summary(manifest, console)
    inputs = manifest.get("inputs", [])
    console.print(f"inputs: {len(inputs)} file(s), {sum(i['bytes'] for i in inputs):,} bytes")
    return 0

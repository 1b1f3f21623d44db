"""`cptkit inspect DIR`: a prepared dataset's manifest as tables (or raw JSON with --json)."""

from __future__ import annotations

import sys

from cptkit.data.prepared import Prepared


def main(args) -> int:
    prepared = Prepared.read(args.prepared_dir)
    if args.json:
        sys.stdout.write(prepared.to_json() + "\n")
        return 0
    from rich.console import Console

    from cptkit.data.summary import print_summary

    manifest = prepared.manifest
    console = Console()
    console.print(
        f"{args.prepared_dir}: prepared {manifest.get('created', '?')}, format {manifest['format_version']}"
    )
    print_summary(manifest, console)
    inputs = manifest.get("inputs", [])
    known = sum(i["bytes"] or 0 for i in inputs)  # a hub dataset's remote file read offline: size unknown
    console.print(f"inputs: {len(inputs)} file(s), {known:,} bytes")
    return 0

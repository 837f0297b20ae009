"""python -m pipelines runs [RUNS_DIR] [--json]: the runs under a directory, one line each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines import _cli

SUMMARY = "list the runs under RUNS_DIR (default: runs): task, data, model, key metric, size, date"


def main(argv: list[str] | None = None) -> int:
    p = _cli.Parser(prog="python -m pipelines runs", description=SUMMARY)
    p.add_argument("root", nargs="?", default="runs", help="a folder of runs (default: runs)")
    p.add_argument("--json", action="store_true", help="one JSON list of runs on stdout")
    p.add_argument("--quiet", action="store_true", help="(accepted for symmetry; prints the list)")
    p.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # No TensorFlow here: listing reads YAML and JSON only, so it answers at once.
    from tfkarpa.runs import list_runs

    root = Path(args.root)
    if not root.is_dir():
        print(f"error: runs folder '{root}' does not exist", file=sys.stderr)
        return 1
    found = list_runs(root)
    if args.json:
        print(json.dumps(found))
        return 0
    if not found:
        print(f"no runs under {root}")
        return 0
    header = ["run", "task", "data", "model", "status", "metric", "value", "params", "size",
              "created"]
    rows = [[r["name"], r["task"], r["data"], r["model"] + ("+" + "+".join(r["stages"])
                                                             if r["stages"] else ""),
             r["status"], r["metric"], "-" if r["value"] is None else f"{r['value']:.4f}",
             "-" if r["params"] is None else f"{r['params']:,}",
             "-" if r["size_bytes"] is None else f"{r['size_bytes'] / 1024:.0f} KB",
             (r["created"] or "-")[:16].replace("T", " ")] for r in found]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
    print(f"{len(found)} run(s) under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

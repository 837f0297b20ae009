"""The demo against its budget: `python -m pipelines demo` (and `quick=true`) timed as a user
runs them, in a fresh process from an empty folder, with the stage timings from its log.

    python benchmarks/demo.py           # full and quick; writes benchmarks/results/demo.json
    python benchmarks/demo.py --quick   # quick only, nothing written

The budget is 15 minutes for the full demo and about 2 minutes for quick=true on a 2-core CPU;
`budget_ratio` is wall time over budget (below 1 is within it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = {"full": 15 * 60, "quick": 2 * 60}
STAGE = re.compile(r"^(\d\d:\d\d:\d\d) demo \[(\d)/8\] (.*) \((\d+)s so far\)")


def run_demo(quick: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="tfkarpa-demo-") as work:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pipelines", "demo", f"quick={str(quick).lower()}",
                              "--json"], cwd=work, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - started
        if out.returncode != 0:
            raise SystemExit(f"demo failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
    stages, previous = [], None
    for line in out.stderr.splitlines():  # "HH:MM:SS demo [i/8] what (Ns so far)"
        match = STAGE.match(line)
        if match:
            at = int(match.group(4))
            if previous:
                previous["seconds"] = at - previous["started_at"]
            previous = {"stage": int(match.group(2)), "what": match.group(3), "started_at": at}
            stages.append(previous)
    if previous:
        previous["seconds"] = round(result["metrics"]["demo_seconds"] - previous["started_at"], 1)
    name = "quick" if quick else "full"
    return {"wall_seconds": round(wall, 1), "budget_seconds": BUDGETS[name],
            "budget_ratio": round(wall / BUDGETS[name], 3), "stages": stages,
            "metrics": result["metrics"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="time quick=true only; write nothing")
    args = p.parse_args()
    results = {"quick": run_demo(True)}
    print(json.dumps(results["quick"], indent=1))
    if args.quick:
        return
    results["full"] = run_demo(False)
    print(json.dumps(results["full"], indent=1))
    write("demo", {"command": "python -m pipelines demo [quick=true]", **results})


if __name__ == "__main__":
    main()

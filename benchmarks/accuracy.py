"""Test accuracy of the shipped recipes on the embedded data sets, with epochs and wall time.

Targets (issue: foundation): digits with the small CNN >= 98%, shapes >= 99%, both on the
held-out test split, trained from scratch on this CPU.

    python benchmarks/accuracy.py             # writes benchmarks/results/accuracy.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from _common import write

from pipelines._cli import resolve_recipe
from tfkarpa import config, train

CASES = {  # recipe -> target test accuracy
    "digits_cnn": 0.98,
    "demo": 0.99,
}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, target in CASES.items():
            cfg = config.build([resolve_recipe(recipe)],
                               [f"runs_root={tmp}/runs", f"export_dir={tmp}/sm/{recipe}"])
            out = train.run(cfg, verbose=2)
            m = out["metrics"]
            results[recipe] = {
                "data": cfg.data.source, "model": cfg.model.name, "epochs": m["epochs_run"],
                "test_accuracy": round(m["test_accuracy"], 4),
                "target": target,
                "meets_target": m["test_accuracy"] >= target,
                "fit_seconds": m["fit_seconds"], "total_seconds": m["total_seconds"],
                "params": m["params"],
            }
            report = json.loads((Path(out["run_dir"]) / "eval" / "test" / "report.json").read_text())
            results[recipe]["test_examples"] = report["examples"]
            print(recipe, results[recipe])
    write("accuracy", {"recipes": results})


if __name__ == "__main__":
    main()

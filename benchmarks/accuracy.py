"""Test accuracy of the shipped recipes on the embedded data sets, with epochs and wall time.

Targets (issue: foundation): digits with the small CNN >= 98%, shapes >= 99%, both on the
held-out test split, trained from scratch on this CPU.

    python benchmarks/accuracy.py             # writes benchmarks/results/accuracy.json
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from _common import write

from pipelines._cli import resolve_recipe
from tfkarpa import config, tasks

CASES = {  # recipe -> target test accuracy
    "digits_cnn": 0.98,
    "demo": 0.99,
}
SEEDS = (0, 1, 2)  # the seed also picks the split, so each seed tests on different images


def run_once(recipe: str, seed: int, tmp: str) -> dict:
    cfg = config.build([resolve_recipe(recipe)], [f"seed={seed}", f"runs_root={tmp}/runs",
                                                  f"export_dir={tmp}/sm/{recipe}-{seed}"])
    out = tasks.run(cfg, verbose=2)
    m = out["metrics"]
    report = json.loads((Path(out["run_dir"]) / "eval" / "test" / "report.json").read_text())
    return {"seed": seed, "test_accuracy": round(m["test_accuracy"], 4),
            "test_examples": report["examples"], "epochs": m["epochs_run"],
            "fit_seconds": m["fit_seconds"], "total_seconds": m["total_seconds"],
            "params": m["params"], "data": cfg.data.source, "model": cfg.model.name}


def main() -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, target in CASES.items():
            runs = [run_once(recipe, seed, tmp) for seed in SEEDS]
            accs = [r["test_accuracy"] for r in runs]
            results[recipe] = {
                "target": target, "mean_test_accuracy": round(statistics.mean(accs), 4),
                "min_test_accuracy": min(accs), "meets_target_every_seed": min(accs) >= target,
                "runs": runs,
            }
            print(recipe, results[recipe])
    write("accuracy", {"recipes": results})


if __name__ == "__main__":
    main()

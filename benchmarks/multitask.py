"""Multi-task heads against single-task models of the same budget, three seeds.

Issue (training techniques): one backbone with several heads (shapes' class, its colour and its
size) against one model per head, each trained the same way (same backbone, data, split,
epochs, optimizer; a single-task model is a multi-task run with that one head). Cases: every
head alone, all three at fixed weights (equal; the issue's example 1/0.5/0.5), and all three
with learned (uncertainty) weights. Figures per head: test accuracy (class, colour) or R^2 and
MAE (size). Every case tests on the same images (the split follows the source, not the heads).

    python benchmarks/multitask.py                     # every case
    python benchmarks/multitask.py --only uncertainty  # some cases, keeping the others'

Every run is the CLI in a fresh process (`python -m pipelines train ... --json`); each case is
written into benchmarks/results/multitask.json as it finishes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from _common import RESULTS, cli, mean_std, write

COMMON = ["task=multitask", "data=shapes", "data.count=3000", "data.seed=0", "epochs=12",
          "export=false"]
SEEDS = (0, 1, 2)
CASES = {
    "class_only": ["heads=class"],
    "colour_only": ["heads=colour"],
    "size_only": ["heads=size"],
    "all_fixed": ["heads=class,colour,size"],
    "all_issue_weights": ["heads=class:1.0,colour:0.5,size:0.5"],
    "all_uncertainty": ["heads=class,colour,size", "head_weighting=uncertainty"],
}
FIGURES = ("test_class_accuracy", "test_colour_accuracy", "test_size_r2", "test_size_mae")


def run_once(name: str, extra: list[str], seed: int, tmp: str) -> dict:
    started = time.time()
    m = cli("train", *COMMON, *extra, f"seed={seed}", f"run_dir={tmp}/{name}-{seed}")["metrics"]
    row = {"seed": seed, "fit_seconds": m["fit_seconds"],
           "wall_seconds": round(time.time() - started, 1)}
    row.update({k: round(m[k], 4) for k in FIGURES if k in m})
    return row


def summarise(runs: list[dict]) -> dict:
    return mean_std(runs, FIGURES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    path = RESULTS / "multitask.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update({"benchmark": "multitask", "setup": " ".join(COMMON) + " (small_cnn, 32 px)",
                   "seeds": list(SEEDS)})
    result.setdefault("cases", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            runs = [run_once(name, CASES[name], seed, tmp) for seed in SEEDS]
            result["cases"][name] = {"args": CASES[name], "runs": runs, **summarise(runs)}
            print(name, summarise(runs), flush=True)
            write("multitask", result)
    cases = result["cases"]
    if {"all_fixed", "class_only", "colour_only", "size_only"} <= set(cases):
        single = {"test_class_accuracy": "class_only", "test_colour_accuracy": "colour_only",
                  "test_size_r2": "size_only", "test_size_mae": "size_only"}
        result["multi_minus_single"] = {
            case: {k: round(cases[case][f"{k}_mean"] - cases[ref][f"{k}_mean"], 4)
                   for k, ref in single.items()}
            for case in ("all_fixed", "all_issue_weights", "all_uncertainty") if case in cases}
        write("multitask", result)


if __name__ == "__main__":
    main()

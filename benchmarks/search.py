"""Search against the recipe's defaults on shapes, with a small budget, on this CPU.

1. One objective (validation accuracy), the median pruner on: 20 trials over the learning rate,
   weight decay, width and augmentation of the `demo` recipe at a reduced size, against one run
   of the same recipe with its defaults. Reported: each one's validation and test accuracy and
   seconds, and how many trials the pruner stopped.
2. Two objectives (validation accuracy, int8 TFLite latency): 12 trials over width,
   architecture and learning rate; the Pareto front against the defaults' run, its int8 file
   timed in the same loop as the front's files (alternating, median of 3 rounds), so the
   latency comparison is one measurement, not figures from different moments.

    python benchmarks/search.py     # writes benchmarks/results/search.json (about 25 minutes)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from _common import write

from tfkarpa import config, runs, tasks
from tfkarpa.core import benchmark as benchmark_lib
from tfkarpa.tasks import search

BASE = ["data=shapes", "data.count=3000", "epochs=6", "export=false"]  # on the `demo` recipe
RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "demo.yaml"
SPACE_ACCURACY = """\
optimizer.lr: loguniform(0.005, 0.5)
optimizer.weight_decay: loguniform(1e-5, 1e-3)
model.width: [0.5, 1.0, 1.5]
data.augment: [off, light]
"""
SPACE_EDGE = """\
model.name: [small_cnn, mobilenet_v2]
model.width: [0.25, 0.5, 1.0]
optimizer.lr: loguniform(0.01, 0.3)
"""


def baseline(root: Path) -> dict:
    started = time.time()
    cfg = config.build([RECIPE], [*BASE, f"runs_root={root}", "name=defaults"])
    result = tasks.run(cfg, verbose=0)
    metrics = result["metrics"]
    return {"run_dir": result["run_dir"], "val_accuracy": metrics["best_val_accuracy"],
            "test_accuracy": metrics["test_accuracy"], "seconds": round(time.time() - started, 1)}


def study(root: Path, name: str, space_text: str, options: search.Options) -> dict:
    space = root / f"{name}.yaml"
    space.write_text(space_text)
    base = search.base_config(config.build([RECIPE], BASE))
    started = time.time()
    result = search.run(base, space, root / name, options)
    summary = runs.read_json(root / name / "search.json")
    return {"result": result, "summary": summary, "seconds": round(time.time() - started, 1)}


def timed_latency(run_dirs: list[str], rounds: int = 3) -> dict[str, float]:
    """int8 p50 latency of each run's exported file, alternating between them, median of
    `rounds` (exporting first where the run has no file yet)."""
    paths = {}
    for run_dir in run_dirs:
        lite = Path(run_dir) / "export" / f"{Path(run_dir).name}.int8.tflite"
        if not lite.is_file():
            tasks.export_run(run_dir, ("tflite",), ("int8",), Path(run_dir) / "export",
                             representative=128, check=32)
        paths[run_dir] = lite
    times = {r: [] for r in run_dirs}
    for _ in range(rounds):
        for run_dir, lite in paths.items():
            predictor = tasks.load_predictor(lite)
            image = benchmark_lib.probe_image(predictor.image_size)
            times[run_dir].append(benchmark_lib.latency(predictor.timed(1), image, 200)["p50_ms"])
    return {r: round(statistics.median(v), 4) for r, v in times.items()}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tfkarpa-search-") as tmp:
        root = Path(tmp)
        defaults = baseline(root)
        print("defaults:", defaults, flush=True)
        single = study(root, "accuracy", SPACE_ACCURACY, search.Options(trials=20))
        best = single["summary"]["best"]
        trials = single["summary"]["trials"]
        print("single objective:", best, trials, flush=True)
        edge = study(root, "edge", SPACE_EDGE, search.Options(
            trials=12, objective="accuracy,int8_latency_ms"))
        front = edge["summary"]["pareto_front"]
        latency = timed_latency([defaults["run_dir"], *[r["run_dir"] for r in front]])
        base_latency = latency[defaults["run_dir"]]
        points = [{"trial": r["number"], "params": r["params"],
                   "val_accuracy": r["values"]["accuracy"],
                   "test_accuracy": r["user_attrs"].get("test_accuracy"),
                   "int8_latency_ms_in_study": r["values"]["int8_latency_ms"],
                   "int8_latency_ms": latency[r["run_dir"]],
                   "latency_ratio_to_defaults": round(latency[r["run_dir"]] / base_latency, 3),
                   "beats_defaults_on_both": (r["values"]["accuracy"] > defaults["val_accuracy"]
                                              and latency[r["run_dir"]] < base_latency)}
                  for r in front]
        print("front:", points, flush=True)
    write("search", {
        "what": "Optuna search (tfkarpa.tasks.search) on shapes against the `demo` recipe's "
                f"defaults, both at {' '.join(BASE)}; choice on the validation split, test "
                "reported",
        "defaults": {k: v for k, v in defaults.items() if k != "run_dir"}
                    | {"int8_latency_ms": base_latency},
        "single_objective": {
            "space": SPACE_ACCURACY.splitlines(), "trials": trials, "pruner": "median",
            "pruned": trials["pruned"], "seconds": single["seconds"],
            "best": {"trial": best["number"], "params": best["params"],
                     "val_accuracy": best["values"]["val_accuracy"],
                     "test_accuracy": best["user_attrs"].get("test_accuracy"),
                     "seconds": best["user_attrs"].get("total_seconds")},
            "best_minus_defaults_val_points": round(
                100 * (best["values"]["val_accuracy"] - defaults["val_accuracy"]), 2),
            "best_minus_defaults_test_points": round(
                100 * (best["user_attrs"].get("test_accuracy", 0) - defaults["test_accuracy"]), 2)},
        "accuracy_vs_int8_latency": {
            "space": SPACE_EDGE.splitlines(), "trials": edge["summary"]["trials"],
            "seconds": edge["seconds"], "front": points,
            "front_points_beating_defaults_on_both": sum(p["beats_defaults_on_both"]
                                                         for p in points)},
    })


if __name__ == "__main__":
    main()

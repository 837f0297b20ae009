"""The demo: the package's whole path on embedded data, on a CPU, within a time budget.

Stages, each through the same library calls the verbs use:
  1. train a classifier on the shapes set (evaluated on its test split, SavedModel exported)
  2. compress it: prune to 50% sparsity, then quantization-aware training (TF-MOT)
  3. export both as TFLite (float and int8), each file checked against its Keras model
  4. evaluate the int8 TFLite file, the edge artifact, on the test split
  5. benchmark every artifact: size, accuracy through its own runtime, batch-1 latency
  6. train a small YOLOv8 detector on multi-object shapes scenes (COCO mAP, SavedModel)
  7. a short SimCLR pretraining, if the time spent so far leaves room for it in the budget
  8. one report (report.md, report.html) over all of the demo's runs

`quick=True` runs the same stages at tiny sizes (about 2 minutes on 2 cores); the figures are
then only a smoke test. The full sizes were chosen so the whole demo fits in 15 minutes on a
2-core CPU (measured figures in README.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sizes:
    classify: tuple  # overrides on top of the `demo` recipe
    compress: tuple
    detect: tuple  # overrides on top of the `shapes_yolov8` recipe
    pretrain: tuple  # overrides on top of the `shapes_simclr` recipe
    pretrain_seconds: float  # what the pretraining stage is expected to take
    benchmark_runs: int


FULL = Sizes(
    classify=(),
    compress=("prune.sparsity=0.5", "qat=true", "epochs=3"),
    detect=("data.count=8000", "epochs=12", "detect.eval_every=3"),
    pretrain=("data.count=4000", "epochs=8", "optimizer.warmup_epochs=1"),
    pretrain_seconds=150.0,
    benchmark_runs=100,
)
QUICK = Sizes(
    classify=("data.count=1200", "epochs=3"),
    compress=("prune.sparsity=0.5", "qat=true", "epochs=1"),
    detect=("data.count=240", "epochs=2", "detect.draw_images=4"),
    pretrain=("data.count=600", "epochs=1", "batch_size=128", "optimizer.warmup_epochs=0"),
    pretrain_seconds=30.0,
    benchmark_runs=20,
)


def _recipe(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "pipelines" / "recipes" / f"{name}.yaml"


def run(quick: bool = False, runs_root: str = "runs", budget_minutes: float = 15.0, pretrain: str = "auto", verbose: int = 2) -> dict:
    """Run every stage; returns {run_dir, artifacts, metrics} like the other commands.

    `pretrain`: "auto" (if the budget allows), "true" or "false". Runs go under `runs_root`,
    SavedModels and TFLite files under ./saved_models, as with `train`.
    """
    from tfkarpa import config as config_lib
    from tfkarpa import report, train
    from tfkarpa.benchmark import benchmark
    from tfkarpa.evaluate import evaluate
    from tfkarpa.export import export_run
    from tfkarpa.infer import load_predictor
    from tfkarpa.optimize.compress import compress_run
    from tfkarpa.runs import ensure_writable

    if pretrain not in ("auto", "true", "false"):
        raise TfkarpaError(f"demo option 'pretrain' must be auto, true or false, got '{pretrain}'")
    if budget_minutes <= 0:
        raise TfkarpaError(f"demo option 'budget' must be a positive number of minutes, got "
                           f"{budget_minutes}")
    ensure_writable(runs_root, "runs_root")
    export_dir = Path("saved_models")
    ensure_writable(export_dir, "saved_models")
    sizes = QUICK if quick else FULL
    started = time.time()
    stages = 8
    metrics, artifacts, run_dirs = {}, {}, []

    def stage(i: int, text: str) -> None:
        log.info("demo [%d/%d] %s (%.0fs so far)", i, stages, text, time.time() - started)

    def config(recipe: str, name: str, *overrides: str):
        return config_lib.build([_recipe(recipe)], [*overrides, f"name={name}",
                                                    f"runs_root={runs_root}"])

    def fit(cfg) -> dict:
        return train.run(cfg, verbose=verbose)

    stage(1, "train the small CNN on the shapes set")
    classifier = fit(config("demo", "demo", *sizes.classify))
    base = classifier["run_dir"]
    run_dirs.append(base)
    metrics["classifier_test_accuracy"] = classifier["metrics"]["test_accuracy"]
    artifacts["classifier_run"] = base

    stage(2, "prune to 50% sparsity, then quantization-aware training")
    compressed = compress_run(base, [*sizes.compress, f"runs_root={runs_root}"], verbose=verbose)
    stage_runs = compressed["artifacts"]["stage_runs"].split(",")
    run_dirs += stage_runs
    metrics["compressed_test_accuracy"] = compressed["metrics"]["test_accuracy"]
    artifacts["compressed_run"] = stage_runs[-1]

    stage(3, "export SavedModel and TFLite (float, int8), each checked")
    exported = export_run(base, ("saved_model", "tflite"), ("none", "int8"), export_dir)
    exported_qat = export_run(stage_runs[-1], ("tflite",), ("int8",), export_dir)
    int8 = Path(exported["artifacts"]["tflite_int8"])
    qat_int8 = Path(exported_qat["artifacts"]["tflite_int8"])
    artifacts.update({"saved_model": exported["artifacts"]["saved_model"],
                      "tflite_int8": str(int8), "qat_tflite_int8": str(qat_int8)})

    stage(4, f"evaluate {int8.name} on the test split")
    lite = evaluate(load_predictor(int8), "test", out_dir=int8.parent / f"{int8.name}.eval" / "test")
    metrics["tflite_int8_test_accuracy"] = lite["accuracy"]

    stage(5, "benchmark every artifact (size, accuracy, batch-1 latency)")
    bench = benchmark([base, stage_runs[-1]], Path(base) / "benchmark", sizes.benchmark_runs,
                      tensorboard_dir=Path(base) / "logs" / "benchmark")
    rows = {r["artifact"]: r for r in bench["rows"]}
    for label, key in ((int8.name, "tflite_int8"), (qat_int8.name, "qat_tflite_int8")):
        if label in rows:
            metrics[f"{key}_kb"] = round(rows[label]["size_bytes"] / 1024, 1)
            metrics[f"{key}_gzip_kb"] = round(rows[label]["gzip_bytes"] / 1024, 1)
            metrics[f"{key}_latency_ms"] = round(rows[label]["latency_2t"]["p50_ms"], 3)
    artifacts["benchmark"] = bench["artifacts"]["table"]

    stage(6, "train a YOLOv8 detector on multi-object scenes")
    detector = fit(config("shapes_yolov8", "demo-detect", *sizes.detect))
    run_dirs.append(detector["run_dir"])
    metrics["detector_test_map50"] = detector["metrics"]["test_map50"]
    metrics["detector_test_map"] = detector["metrics"]["test_map"]
    artifacts["detector_run"] = detector["run_dir"]

    elapsed = time.time() - started
    room = budget_minutes * 60 - elapsed - 30  # the report takes seconds; keep a margin
    if pretrain == "true" or (pretrain == "auto" and room >= sizes.pretrain_seconds):
        stage(7, "a short SimCLR pretraining of the CNN's encoder")
        simclr = fit(config("shapes_simclr", "demo-simclr", *sizes.pretrain))
        run_dirs.append(simclr["run_dir"])
        metrics["simclr_test_knn_accuracy"] = simclr["metrics"]["test_knn_accuracy"]
        artifacts["simclr_run"] = simclr["run_dir"]
    else:
        reason = "pretrain=false" if pretrain == "false" else (
            f"{elapsed:.0f}s spent leaves {max(room, 0):.0f}s of the {budget_minutes:g}-minute "
            f"budget, pretraining needs about {sizes.pretrain_seconds:.0f}s")
        log.info("demo [7/%d] SimCLR pretraining skipped: %s", stages, reason)
        metrics["simclr_skipped"] = reason

    stage(8, "write the report over every run")
    out = Path(runs_root) / f"{Path(base).name}-report"
    written = report.write(run_dirs, out)
    artifacts.update({"report_html": written["report_html"], "report_md": written["report_md"]})
    metrics["demo_seconds"] = round(time.time() - started, 1)
    return {"run_dir": base, "artifacts": artifacts, "metrics": metrics, "runs": run_dirs}

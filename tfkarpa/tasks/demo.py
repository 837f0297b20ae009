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

`quick=True` runs the same stages at tiny sizes (under 5 minutes on 2 cores); the figures are
then only a smoke test. The full sizes were chosen so the whole demo fits in 15 minutes on a
2-core CPU (measured figures in README.md).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable

from tfkarpa import config as config_lib
from tfkarpa import tasks
from tfkarpa.errors import TfkarpaError
from tfkarpa.runs import ensure_writable
from tfkarpa.tasks.classify.compress import compress_run

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Sizes:
    classify: tuple  # overrides on top of the `demo` recipe
    compress: tuple
    detect: tuple  # overrides on top of the `shapes_yolov8` recipe
    pretrain: tuple  # overrides on top of the `shapes_simclr` recipe
    pretrain_seconds: float  # what the pretraining stage is expected to take
    benchmark_runs: int


# Chosen so that every stage fits in 15 minutes on 2 cores (benchmarks/demo.py; probes in
# benchmarks/results/demo_experiments.json): the classifier at 10 epochs (15 in its recipe; 6
# reached only 91%), pruning and QAT 2 epochs each, the detector as the narrow yolov8_xxs on
# 7,200 scenes with 400-scene val and test splits (COCO scoring only at the first and last
# epoch: each pass costs seconds the training needs) at batch 64, where this CPU trains it
# 1.4-1.7x faster per image than at the recipe's 32 (535 against 312-402 images/s), so 24
# epochs fit where 18 did; SimCLR on 3,000 images.
FULL = Sizes(
    classify=("epochs=10",),
    compress=("prune.sparsity=0.5", "qat=true", "epochs=2"),
    detect=("model=yolov8_xxs", "data.count=8000", "data.val_fraction=0.05",
            "data.test_fraction=0.05", "epochs=24", "batch_size=64", "optimizer.lr=0.003",
            "detect.eval_every=0"),
    pretrain=("data.count=3000", "epochs=8", "optimizer.warmup_epochs=1"),
    pretrain_seconds=120.0,
    benchmark_runs=100,
)
QUICK = Sizes(
    classify=("data.count=1200", "epochs=3"),
    compress=("prune.sparsity=0.5", "qat=true", "epochs=1"),
    detect=("data.count=160", "data.image_size=32", "epochs=2", "detect.draw_images=4"),
    pretrain=("data.count=600", "epochs=1", "batch_size=128", "optimizer.warmup_epochs=0"),
    pretrain_seconds=30.0,
    benchmark_runs=20,
)


def run(recipes: Callable[[str], Path], quick: bool = False, runs_root: str = "runs",
        budget_minutes: float = 15.0, pretrain: str = "auto", verbose: int = 2) -> dict:
    """Run every stage; returns {run_dir, artifacts, metrics} like the other commands.

    `recipes` gives the YAML file of a recipe name (the commands' `pipelines._cli.resolve_recipe`;
    the library does not know where they keep theirs). `pretrain`: "auto" (if the budget
    allows), "true" or "false". Runs go under `runs_root`, SavedModels and TFLite files under
    ./saved_models, as with `train`.
    """
    if pretrain not in ("auto", "true", "false"):
        raise TfkarpaError(f"demo option 'pretrain' must be auto, true or false, got '{pretrain}'")
    if budget_minutes <= 0:
        raise TfkarpaError(f"demo option 'budget' must be a positive number of minutes, got "
                           f"{budget_minutes}")
    ensure_writable(runs_root, "runs_root")
    ensure_writable(EXPORT_DIR, "saved_models")
    tour = _Tour(QUICK if quick else FULL, recipes, runs_root, verbose, time.time())
    base, compressed = tour.classify_and_compress()
    tour.export_evaluate_benchmark(base, compressed)
    tour.detect()
    tour.pretrain(budget_minutes, pretrain)
    tour.report(base)
    tour.metrics["demo_seconds"] = round(time.time() - tour.started, 1)
    return {"run_dir": base, "artifacts": tour.artifacts, "metrics": tour.metrics,
            "runs": tour.run_dirs}


EXPORT_DIR = Path("saved_models")
STAGES = 8


@dataclasses.dataclass
class _Tour:
    """The demo's state as its stages run: what they measured, wrote and trained."""

    sizes: Sizes
    recipes: Callable[[str], Path]
    runs_root: str
    verbose: int
    started: float
    metrics: dict = dataclasses.field(default_factory=dict)
    artifacts: dict = dataclasses.field(default_factory=dict)
    run_dirs: list = dataclasses.field(default_factory=list)

    def stage(self, i: int, text: str) -> None:
        log.info("demo [%d/%d] %s (%.0fs so far)", i, STAGES, text, time.time() - self.started)

    def fit(self, recipe: str, name: str, *overrides: str) -> dict:
        cfg = config_lib.build([self.recipes(recipe)], [*overrides, f"name={name}",
                                                   f"runs_root={self.runs_root}"])
        result = tasks.run(cfg, verbose=self.verbose)
        self.run_dirs.append(result["run_dir"])
        return result

    def classify_and_compress(self) -> tuple[str, str]:
        """Stages 1-2; returns the classifier's run and the last compression stage's run."""
        self.stage(1, "train the small CNN on the shapes set")
        classifier = self.fit("demo", "demo", *self.sizes.classify)
        base = classifier["run_dir"]
        self.metrics["classifier_test_accuracy"] = classifier["metrics"]["test_accuracy"]
        self.artifacts["classifier_run"] = base
        self.stage(2, "prune to 50% sparsity, then quantization-aware training")
        compressed = compress_run(base, [*self.sizes.compress, f"runs_root={self.runs_root}"],
                                  verbose=self.verbose)
        stage_runs = compressed["artifacts"]["stage_runs"].split(",")
        self.run_dirs += stage_runs
        self.metrics["compressed_test_accuracy"] = compressed["metrics"]["test_accuracy"]
        self.artifacts["compressed_run"] = stage_runs[-1]
        return base, stage_runs[-1]

    def export_evaluate_benchmark(self, base: str, compressed: str) -> None:
        """Stages 3-5: the edge files, the int8 file's accuracy, the table over everything."""
        self.stage(3, "export SavedModel and TFLite (float, int8), each checked")
        exported = tasks.export_run(base, ("saved_model", "tflite"), ("none", "int8"), EXPORT_DIR)
        exported_qat = tasks.export_run(compressed, ("tflite",), ("int8",), EXPORT_DIR)
        int8 = Path(exported["artifacts"]["tflite_int8"])
        qat_int8 = Path(exported_qat["artifacts"]["tflite_int8"])
        self.artifacts.update({"saved_model": exported["artifacts"]["saved_model"],
                               "tflite_int8": str(int8), "qat_tflite_int8": str(qat_int8)})
        self.stage(4, f"evaluate {int8.name} on the test split")
        lite = tasks.evaluate(tasks.load_predictor(int8), "test",
                              out_dir=int8.parent / f"{int8.name}.eval" / "test")
        self.metrics["tflite_int8_test_accuracy"] = lite["accuracy"]
        self.stage(5, "benchmark every artifact (size, accuracy, batch-1 latency)")
        bench = tasks.benchmark([base, compressed], Path(base) / "benchmark",
                                self.sizes.benchmark_runs,
                                tensorboard_dir=Path(base) / "logs" / "benchmark")
        rows = {r["artifact"]: r for r in bench["rows"]}
        for label, key in ((int8.name, "tflite_int8"), (qat_int8.name, "qat_tflite_int8")):
            if label in rows:
                self.metrics[f"{key}_kb"] = round(rows[label]["size_bytes"] / 1024, 1)
                self.metrics[f"{key}_gzip_kb"] = round(rows[label]["gzip_bytes"] / 1024, 1)
                self.metrics[f"{key}_latency_ms"] = round(rows[label]["latency_2t"]["p50_ms"], 3)
        self.artifacts["benchmark"] = bench["artifacts"]["table"]

    def detect(self) -> None:
        self.stage(6, "train a YOLOv8 detector on multi-object scenes")
        detector = self.fit("shapes_yolov8", "demo-detect", *self.sizes.detect)
        self.metrics["detector_test_map50"] = detector["metrics"]["test_map50"]
        self.metrics["detector_test_map"] = detector["metrics"]["test_map"]
        self.artifacts["detector_run"] = detector["run_dir"]

    def pretrain(self, budget_minutes: float, pretrain: str) -> None:
        elapsed = time.time() - self.started
        room = budget_minutes * 60 - elapsed - 30  # the report takes seconds; keep a margin
        if pretrain == "true" or (pretrain == "auto" and room >= self.sizes.pretrain_seconds):
            self.stage(7, "a short SimCLR pretraining of the CNN's encoder")
            simclr = self.fit("shapes_simclr", "demo-simclr", *self.sizes.pretrain)
            self.metrics["simclr_test_knn_accuracy"] = simclr["metrics"]["test_knn_accuracy"]
            self.artifacts["simclr_run"] = simclr["run_dir"]
            return
        reason = "pretrain=false" if pretrain == "false" else (
            f"{elapsed:.0f}s spent leaves {max(room, 0):.0f}s of the {budget_minutes:g}-minute "
            f"budget, pretraining needs about {self.sizes.pretrain_seconds:.0f}s")
        log.info("demo [7/%d] SimCLR pretraining skipped: %s", STAGES, reason)
        self.metrics["simclr_skipped"] = reason

    def report(self, base: str) -> None:
        self.stage(8, "write the report over every run")
        out = Path(self.runs_root) / f"{Path(base).name}-report"
        written = tasks.report(self.run_dirs, out)
        self.artifacts.update({"report_html": written["report_html"],
                               "report_md": written["report_md"]})

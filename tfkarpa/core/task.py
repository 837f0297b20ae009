"""The interface between the core and a task: what a task must answer, and nothing else.

The core (fit loop, export, artifact loading, benchmark, report) never names a task. It is handed
a `Task` object and asks it: check this config, load its data, build the model and datasets
inside the strategy scope (`FitParts`), finish the fitted model into metrics and artifacts, load
a predictor for an artifact, evaluate a predictor, export a run, predict files, add report
blocks. Tasks live in `tfkarpa.tasks`, one package each, found by name in `tasks.TASKS`.

A method a task does not support raises `TfkarpaError` with a sentence saying so (the defaults
below do), so a user asking, say, for the benchmark of a task that has none gets an answer, not
an AttributeError.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa.core.auto import AutoRules
from tfkarpa.errors import TfkarpaError


@dataclasses.dataclass
class FitParts:
    """What a task hands the fit loop. Built inside the strategy's scope by `Task.build`."""

    model: tf.keras.Model  # compiled: what `fit` trains (may wrap `net`)
    net: tf.keras.Model  # what the run delivers
    train_ds: tf.data.Dataset
    val_ds: tf.data.Dataset
    sample: np.ndarray  # a batch of training inputs for the TensorBoard grid
    monitor: str = "val_accuracy"  # what `best.weights.h5` maximises
    callbacks: list = dataclasses.field(default_factory=list)  # the task's own, run first
    reload_best: bool = True  # finish from the best checkpoint (else from the last epoch)
    first_eligible: int = 0  # epochs before this (0-based) never count as best
    extra: dict = dataclasses.field(default_factory=dict)  # task state for `finish`


class Predictor:
    """Something loaded that predicts: a run's Keras model, a SavedModel or a TFLite file.

    Every predictor knows its artifact kind ("keras" | "saved_model" | "tflite"), path, class
    names, input size, the config it was trained with (data source, seed, splits) and its task's
    name. What it predicts (probabilities, boxes) is its task's business.
    """

    task = ""

    def __init__(self, kind: str, path, class_names: list[str], image_size: int, config,
                 model: tf.keras.Model | None = None):
        self.kind, self.path, self.class_names = kind, Path(path), list(class_names)
        self.image_size, self.config, self.model = image_size, config, model

    def timed(self, threads: int | None):
        """A callable on one uint8 image batch [1, S, S, 3] for latency measurement; `threads`
        applies to LiteRT files (None: the runtime's default)."""
        raise TfkarpaError(f"{self.task or 'this'} predictor cannot be timed")


class Task:
    """One kind of training (classify, detect, pretrain, ...) on the shared core.

    Training: `check_model` and `check` run before anything is created; `build` inside the
    strategy scope returns the compiled model and data; `finish` turns the fitted model into the
    run's deliverables and returns (metrics, artifacts). Everything else (run directory,
    resume, strategy, callbacks, checkpoints, errors) is the loop's.
    """

    name = ""
    key_metric = "test_accuracy"  # the run's headline figure (runs listing, report overview)
    # The per-epoch validation figure (higher is better) that picks the best checkpoint
    # (`FitParts.monitor`) and that a search maximises by default.
    val_metric = "val_accuracy"
    run_suffix = ""  # added to the default run name
    default_quantize = ("none", "int8")  # export's TFLite modes when none are asked for
    # What `export formats=` writes for this task (none: its runs are not exported); where it
    # writes TFLite, every format converted from TFLite (ONNX, core.formats) is offered too.
    formats: tuple[str, ...] = ()
    default_recipe = ""  # the recipe `train task=NAME` starts from when none is given
    # The recipe for any other data source than the embedded one the default recipe is tuned
    # on (its size-dependent keys left at auto); "" = the default recipe for every source.
    data_recipe = ""
    auto = AutoRules()  # how settings left at auto are chosen from the data (`core.auto`)

    def recipe_for(self, source: str) -> str:
        """The recipe `train task=NAME data=SOURCE` starts from when none is given."""
        embedded = source.split(":", 1)[0] in ("", "shapes", "digits")
        return self.default_recipe if embedded or not self.data_recipe else self.data_recipe

    # ---- training
    def check_model(self, cfg: config_lib.Config) -> None:
        raise NotImplementedError

    def load_data(self, cfg: config_lib.Config):
        """The run's data: an object with `source`, `splits` (train/val/test, each with
        `num_examples`), `class_names`, `num_classes`, `summary()`, and `image_sizes` ((width,
        height) per image, or None) from which an auto `data.image_size` is chosen."""
        raise NotImplementedError

    def check(self, cfg: config_lib.Config, data) -> None:
        pass

    def build(self, cfg, data, placement, run_, steps: int) -> FitParts:
        raise NotImplementedError

    def finish(self, cfg, data, placement, run_, parts: FitParts, export_dir: Path,
               hist: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    # ---- artifacts
    def load_predictor(self, artifact) -> Predictor:
        """The predictor for an opened artifact (`core.artifacts.Artifact`)."""
        raise TfkarpaError(f"task {self.name} has no predictor for '{artifact.path}'")

    def evaluate(self, predictor: Predictor, split: str = "test", out_dir: Path | None = None,
                 data=None, tensorboard_dir: Path | None = None,
                 options: dict | None = None) -> dict:
        """Metrics of a predictor on a split of its data; reports into `out_dir`. `options`:
        the `evaluate` verb's task-specific options (a task refuses those it does not take)."""
        raise TfkarpaError(f"task {self.name} has no evaluation for '{predictor.path}'")

    def evaluation_summary(self, metrics: dict, out_dir: Path) -> tuple[dict, dict]:
        """The headline figures of `evaluate`'s metrics and the files it wrote into `out_dir`."""
        return metrics, {}

    def export(self, run_dir: Path, formats, quantize, out_dir: Path, representative: int,
               check: int, per_channel: bool) -> dict:
        """Write and check the run's exports: {"artifacts", "checks", "metrics"}."""
        raise TfkarpaError(f"task {self.name} runs cannot be exported")

    def predict(self, predictor: Predictor, inputs: list[str], options: dict) -> dict:
        """Predictions for image files: {"artifacts", "metrics", "predictions", "lines"}."""
        raise TfkarpaError(f"task {self.name} has no predict")

    benchmark_figure = "test accuracy"  # what `benchmark_metric` is, for the table's reader

    def benchmark_metric(self, metrics: dict) -> float:
        """The figure the benchmark table compares artifacts on, from `evaluate`'s metrics."""
        raise TfkarpaError(f"benchmark compares classifiers' artifacts; task {self.name} has no "
                           "benchmark figure yet")

    def report_blocks(self, run_dir: Path, slug: str) -> list:
        """The task's own sections of a run's report (core.report blocks)."""
        return []

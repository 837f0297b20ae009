"""The tasks, found by name in `TASKS`, and the calls that pick a task for you.

Each task is a package of its own (`classify`, `detect`, `pretrain`) holding its model
building, losses, metrics, serving signatures, predictors, evaluator and report sections, behind
the interface in `core.task.Task`. The core below never names a task; the functions here look
one up (by a config's `task`, or by what an artifact records) and hand it to the core. Adding a
task is a new package here and one line in `TASKS`.

Tasks may build on each other's runs (a classifier or a detector starts from a SimCLR encoder, a
detector from a classifier's backbone), so their imports go one way: pretrain <- classify <-
detect <- segment (instance masks are detection with masks), and classify <- multitask (its
backbones are the classifiers'). Drivers that span
tasks or run many fits sit beside this file (`demo`, `search`).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from tfkarpa.core import artifacts, benchmark as benchmark_lib, export, fit
from tfkarpa.core import report as report_lib
from tfkarpa.core.task import Predictor, Task
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify.task import TASK as CLASSIFY
from tfkarpa.tasks.detect.task import TASK as DETECT
from tfkarpa.tasks.multitask.task import TASK as MULTITASK
from tfkarpa.tasks.pretrain.task import TASK as PRETRAIN
from tfkarpa.tasks.segment.task import TASK as SEGMENT

TASKS: dict[str, Task] = {"classify": CLASSIFY, "detect": DETECT, "pretrain": PRETRAIN,
                          "multitask": MULTITASK, "segment": SEGMENT}


def get(name: str) -> Task:
    """The task called `name`, or an error that names the nearest one."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TfkarpaError(f"config key 'task': unknown task '{name}'{hint} (choose from "
                           f"{', '.join(TASKS)})")
    return TASKS[name]


def run(cfg, verbose: int = 2, callbacks: list = ()) -> dict:
    """Train `cfg` with its task (`cfg.task`): {run_dir, artifacts, metrics}."""
    return fit.run(cfg, get(cfg.task), verbose=verbose, callbacks=callbacks)


def load_predictor(path: str | Path, overrides: list[str] = ()) -> Predictor:
    """A predictor for a run directory, a SavedModel or a .tflite file, by its own task."""
    artifact = artifacts.open_artifact(path, overrides)
    return get(artifact.task).load_predictor(artifact)


def evaluate(predictor: Predictor, split: str = "test", out_dir=None, data=None,
             tensorboard_dir=None) -> dict:
    """`predictor`'s metrics on a split of its data, by its task; reports into `out_dir`."""
    return get(predictor.task).evaluate(predictor, split, out_dir, data, tensorboard_dir)


def export_run(run_dir: str | Path, formats=("saved_model",), quantize=(), out_dir=None,
               representative: int = 256, check: int = 64, per_channel: bool = True) -> dict:
    """Export a finished run (its task decides how), each file checked before it is written."""
    task = get(artifacts.run_task(run_dir))
    return export.export_run(run_dir, task, formats, quantize, out_dir, representative, check,
                             per_channel)


def benchmark(targets: list[str], out_dir: str | Path, runs: int = 100,
              tensorboard_dir=None) -> dict:
    """The size, quality and latency table over every artifact of `targets`."""
    return benchmark_lib.benchmark(targets, out_dir, TASKS, runs, tensorboard_dir)


def report(run_dirs: list[str | Path], out_dir=None) -> dict:
    """report.md and report.html over runs, each with its task's sections."""
    return report_lib.write(run_dirs, out_dir, TASKS)

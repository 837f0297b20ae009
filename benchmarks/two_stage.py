"""Faster R-CNN against Cascade R-CNN against YOLOv8-xs on the same shapes scenes, this CPU.

Each model trains through `tasks.run` (as `python -m pipelines train shapes_yolov8
model.name=...` does) on the same scenes, with the same optimizer, epochs and batch: the
shapes_yolov8 recipe at a smaller budget. Recorded per model: test COCO mAP, mAP@0.5, mAP@0.75
(pycocotools, through `evaluate`'s path on the exported SavedModel, which the export checked
against the Keras model), fit seconds, and the SavedModel's batch-1 latency (serving_default on
one 64x64 uint8 image: letterbox, network, NMS). Models run one after another in one process, so
their seconds are comparable with each other; run nothing else beside it.

    python benchmarks/two_stage.py             # writes benchmarks/results/two_stage.json
    python benchmarks/two_stage.py --quick     # 1 epoch on 400 scenes, nothing written
    python benchmarks/two_stage.py --throughput  # add isolated training images/s to the file
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import write

import tensorflow as tf
from tfkarpa import config, tasks
from tfkarpa.data import detection as dd
from tfkarpa.tasks import load_predictor
from tfkarpa.tasks.detect.task import evaluate_artifact

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "shapes_yolov8.yaml"
MODELS = ("faster_rcnn_resnet18", "cascade_rcnn_resnet18", "yolov8_xs")
BUDGET = ["data.count=3000", "epochs=8", "batch_size=16"]


def latency_ms(saved_model: str, images: np.ndarray, repeats: int) -> dict:
    serve = tf.saved_model.load(saved_model).signatures["serving_default"]
    for image in images[:5]:  # warm-up
        serve(images=tf.constant(image[None]))
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        serve(images=tf.constant(images[i % len(images)][None]))
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 2),
            "p90_ms": round(float(np.percentile(times, 90)), 2), "runs": repeats}


def train_throughput(names, steps: int = 30) -> dict:
    """Training images per second of each model on the same batches (16 shapes scenes at
    64 px), `steps` steps after 5 of warm-up, one model after another in this process: the
    models' relative training cost, free of whatever else ran during the full runs."""
    from tfkarpa.models import detectors

    cfg = config.build([RECIPE], ["data.count=200"])
    data = dd.load(cfg.data, cfg.seed)
    batch = next(iter(dd.make_dataset(data.splits["train"], cfg, False, dd.max_boxes(data, cfg),
                                      batch_size=16)))
    out = {}
    for name in names:
        cfg.model.name = name
        model = detectors.build_detector(cfg.model, cfg.detect, (64, 64, 3), data.num_classes)
        detectors.compile_detector(model, name, tf.keras.optimizers.Adam(1e-3), cfg.detect)
        model.fit(tf.data.Dataset.from_tensors(batch).repeat(5), verbose=0)
        start = time.perf_counter()
        model.fit(tf.data.Dataset.from_tensors(batch).repeat(steps), verbose=0)
        out[name] = round(16 * steps / (time.perf_counter() - start), 1)
        print(name, out[name], "train images/s", flush=True)
    return out


def one(name: str, root: Path, extra: list[str], repeats: int) -> dict:
    cfg = config.build([RECIPE], [f"model.name={name}", f"runs_root={root}",
                                  f"export_dir={root / 'sm' / name}", *extra])
    started = time.time()
    result = tasks.run(cfg, verbose=0)
    seconds = round(time.time() - started, 1)
    m = result["metrics"]
    saved = result["artifacts"]["saved_model"]
    data = dd.load(cfg.data, cfg.seed)
    test = evaluate_artifact(load_predictor(saved), "test", None, data)
    images, _ = dd.images_of(data.splits["test"], cfg.data.image_size, 20)
    row = {"params": m["params"], "fit_seconds": m["fit_seconds"], "run_seconds": seconds,
           "best_val_map": round(m["best_val_map"], 4),
           **{f"test_{k}": test[k] for k in ("map", "map50", "map75", "map_small", "map_medium",
                                            "map_large", "ar100")},
           "val_map_keras": m["val_map_keras"], "val_map_saved_model": m["val_map_saved_model"],
           "saved_model_latency_batch1": latency_ms(saved, images, repeats)}
    print(name, row, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--throughput", action="store_true",
                    help="only measure training images/s and add them to the results file")
    args = ap.parse_args()
    if args.throughput:
        import json

        from _common import RESULTS

        figures = train_throughput(args.models.split(","))
        path = RESULTS / "two_stage.json"
        payload = {k: v for k, v in json.loads(path.read_text()).items() if k != "machine"}
        payload["train_images_per_second_isolated"] = figures
        if {"faster_rcnn_resnet18", "cascade_rcnn_resnet18"} <= set(figures):
            payload["cascade_over_faster_train_cost_isolated"] = round(
                figures["faster_rcnn_resnet18"] / figures["cascade_rcnn_resnet18"], 3)
        write("two_stage", payload)
        return
    extra = ["data.count=400", "epochs=1", "batch_size=16"] if args.quick else BUDGET
    root = Path(tempfile.mkdtemp(prefix="tfkarpa-two-stage-bench-"))
    try:
        rows = {name: one(name, root, extra, 10 if args.quick else 100)
                for name in args.models.split(",")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    payload = {"recipe": "shapes_yolov8", "overrides": extra,
               "image_size": 64, "models": rows}
    if {"faster_rcnn_resnet18", "cascade_rcnn_resnet18"} <= set(rows):
        faster, cascade = rows["faster_rcnn_resnet18"], rows["cascade_rcnn_resnet18"]
        payload["cascade_minus_faster_map75"] = round(cascade["test_map75"] - faster["test_map75"], 4)
        payload["cascade_over_faster_fit_seconds"] = round(
            cascade["fit_seconds"] / faster["fit_seconds"], 3)
    print(payload)
    if not args.quick:
        write("two_stage", payload)


if __name__ == "__main__":
    main()

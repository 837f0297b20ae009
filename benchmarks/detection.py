"""Object detection on the embedded shapes scenes, from scratch on this machine's CPU.

Trains the `shapes_yolov8` recipe (YOLOv8-xs, 64x64, 1-3 objects per scene) through the same
`train.run` as `python -m pipelines train shapes_yolov8`, recording the validation COCO mAP
(pycocotools) after every epoch against wall time, then exports float and int8 TFLite files
(each checked against the Keras model's validation mAP by the export itself) and measures
their batch-1 latency with the LiteRT interpreter on 2 threads.

    python benchmarks/detection.py           # writes benchmarks/results/detection.json
    python benchmarks/detection.py --quick   # 2 epochs on 1,000 scenes, nothing written
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import write

import tensorflow as tf
from tfkarpa import config, detection, train
from tfkarpa.data import detection as dd
from tfkarpa.export import export_run

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "shapes_yolov8.yaml"
TARGET_MAP50 = 0.90


class WallClock(tf.keras.callbacks.Callback):
    """Seconds since training began at every epoch end, with the epoch's validation mAP. It
    runs after the COCO evaluation callback (the task's own callbacks run first)."""

    def __init__(self):
        super().__init__()
        self.curve = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.curve.append({"epoch": epoch + 1,
                           "seconds": round(time.perf_counter() - self.start, 1),
                           "val_map": logs.get("val_map"), "val_map50": logs.get("val_map50"),
                           "loss": round(float(logs.get("loss", float("nan"))), 4)})
        print(self.curve[-1], flush=True)


def latency_ms(path: str, images: np.ndarray, repeats: int) -> dict:
    runner = detection.TFLiteDetector(Path(path).read_bytes(), num_threads=2)
    for image in images[:5]:  # warm-up: first invocations allocate
        runner(image[None])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        runner(images[i % len(images)][None])
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 3),
            "p90_ms": round(float(np.percentile(times, 90)), 3), "runs": repeats,
            "bytes": Path(path).stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    extra = ["data.count=1000", "epochs=2"] if args.quick else []
    with tempfile.TemporaryDirectory() as root:
        cfg = config.build([RECIPE], [f"runs_root={root}", f"export_dir={root}/sm", *extra])
        clock = WallClock()
        started = time.time()
        result = train.run(cfg, verbose=0, callbacks=[clock])
        train_seconds = time.time() - started
        exported = export_run(result["run_dir"], ["tflite"], ["none", "int8"], f"{root}/out", 200)
        data = dd.load(cfg.data, cfg.seed)
        images, _ = dd.images_of(data.splits["test"], cfg.data.image_size, 50)
        latency = {mode: latency_ms(exported["artifacts"][f"tflite_{mode}"], images,
                                    30 if args.quick else 300) for mode in ("none", "int8")}
    m = result["metrics"]
    reached = next((p for p in clock.curve if (p["val_map50"] or 0) >= TARGET_MAP50), None)
    payload = {
        "recipe": "shapes_yolov8", "model": cfg.model.name, "image_size": cfg.data.image_size,
        "scenes": {"train": data.splits["train"].num_examples,
                   "val": data.splits["val"].num_examples, "test": data.splits["test"].num_examples},
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "params": m["params"],
        "target_map50": TARGET_MAP50,
        "test": {k: m[k] for k in ("test_map", "test_map50", "test_map75", "test_map_small",
                                   "test_map_medium", "test_map_large")},
        "best_val_map": m["best_val_map"],
        "first_epoch_at_target": reached,
        "fit_seconds": m["fit_seconds"], "run_seconds": round(train_seconds, 1),
        "curve": clock.curve,
        "export": {name: {k: v for k, v in check.items() if k != "images"}
                   for name, check in exported["checks"].items()},
        "keras_val_map": exported["reference"]["map"],
        "tflite_latency_batch1_2threads": latency,
        "int8_over_float_latency": round(latency["int8"]["median_ms"] / latency["none"]["median_ms"], 3),
        "int8_over_float_bytes": round(latency["int8"]["bytes"] / latency["none"]["bytes"], 3),
    }
    print(payload)
    if not args.quick:
        write("detection", payload)


if __name__ == "__main__":
    main()

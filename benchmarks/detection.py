"""Object detection on the embedded shapes scenes, from scratch on this machine's CPU.

Trains the `shapes_yolov8` recipe (YOLOv8-xs, 64x64, 1-3 objects per scene) through the same
`tasks.run` as `python -m pipelines train shapes_yolov8`, recording the validation COCO mAP
(pycocotools) after every epoch against wall time, then exports float and dynamic-range TFLite
files (each checked against the Keras model's validation mAP by the export itself), builds the
full-int8 file (scored the same way; the export refuses it beyond a 1-point drop) and measures
the batch-1 latency of all three with the LiteRT interpreter on 2 threads.

    python benchmarks/detection.py           # writes benchmarks/results/detection.json
    python benchmarks/detection.py --quick   # 2 epochs on 1,000 scenes, nothing written
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import WallClock, write

from tfkarpa import config, tasks
from tfkarpa.data import detection as dd
from tfkarpa.tasks import export_run, load_predictor
from tfkarpa.tasks.detect import metrics, predict, serving
from tfkarpa.tasks.detect.task import evaluate_artifact

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "shapes_yolov8.yaml"
TARGET_MAP50 = 0.90


def latency_ms(path: str, images: np.ndarray, repeats: int) -> dict:
    runner = predict.TFLiteDetector(Path(path).read_bytes(), num_threads=2)
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


def _int8(run_dir: Path, cfg, data, reference: dict, path: str) -> dict:
    from tfkarpa.errors import TfkarpaError

    model = predict.load_run_detector(run_dir, cfg, data.num_classes)
    calibration, _ = dd.images_of(data.splits["train"], cfg.data.image_size, 200)
    content = serving.tflite_bytes(model, cfg.data.image_size, "int8", calibration)
    Path(path).write_bytes(content)
    predictor = predict.DetectionPredictor("tflite", path, data.class_names,
                                             cfg.data.image_size, cfg,
                                             predict.TFLiteDetector(content), batch=16)
    got = metrics.coco_metrics(data.splits["val"].truth,
                                 predictor.detect_split(data.splits["val"]), data.class_names)
    try:
        metrics.check_close(reference, got, "int8")
        verdict = "passes the 1-point export check"
    except TfkarpaError as err:
        verdict = f"refused by the export check: {err}"
    return {"val_map": got["map"], "val_map50": got["map50"], "bytes": len(content),
            "export_check": verdict}


def _train(root: Path, extra: list[str]):
    """Train once per root: the run, its wall-clock curve and time are kept in training.json."""
    saved = root / "training.json"
    cfg = config.build([RECIPE], [f"runs_root={root}", f"export_dir={root}/sm", *extra])
    if saved.exists():
        kept = json.loads(saved.read_text())
        return kept["result"], kept["curve"], kept["train_seconds"], cfg
    clock = WallClock(("val_map", "val_map50", "loss"))
    started = time.time()
    result = tasks.run(cfg, verbose=0, callbacks=[clock])
    train_seconds = round(time.time() - started, 1)
    result = {k: result[k] for k in ("run_dir", "metrics")}
    saved.write_text(json.dumps({"result": result, "curve": clock.curve,
                                 "train_seconds": train_seconds}, default=str))
    return result, clock.curve, train_seconds, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--root", help="keep the run and files here; a later call with the same "
                    "root reuses the trained run and its curve (export and latency only)")
    args = ap.parse_args()
    extra = ["data.count=1000", "epochs=2"] if args.quick else []
    root = Path(args.root or tempfile.mkdtemp(prefix="tfkarpa-detection-bench-"))
    try:
        result, curve, train_seconds, cfg = _train(root, extra)
        run_dir = Path(result["run_dir"])
        exported = export_run(run_dir, ["tflite"], ["none", "dynamic"], root / "out", 200)
        data = dd.load(cfg.data, cfg.seed)
        files = {mode: exported["artifacts"][f"tflite_{mode}"] for mode in ("none", "dynamic")}
        # Full int8: the export refuses a file more than 1 mAP point below Keras, so build it
        # here too, to time it and to record what the check said.
        int8_check = _int8(run_dir, cfg, data, exported["reference"], root / "int8.tflite")
        files["int8"] = root / "int8.tflite"
        # Test metrics through `evaluate`'s path, with the decoder as the code now builds it.
        test = evaluate_artifact(load_predictor(run_dir), "test", None, data)
        images, _ = dd.images_of(data.splits["test"], cfg.data.image_size, 50)
        latency = {mode: latency_ms(path, images, 30 if args.quick else 300)
                   for mode, path in files.items()}
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    m = result["metrics"]
    reached = next((p for p in curve if (p["val_map50"] or 0) >= TARGET_MAP50), None)
    payload = {
        "recipe": "shapes_yolov8", "model": cfg.model.name, "image_size": cfg.data.image_size,
        "scenes": {"train": data.splits["train"].num_examples,
                   "val": data.splits["val"].num_examples, "test": data.splits["test"].num_examples},
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "params": m["params"],
        "target_map50": TARGET_MAP50,
        "test": {f"test_{k}": test[k] for k in ("map", "map50", "map75", "map_small",
                                                 "map_medium", "map_large", "ar100")},
        "test_per_class_ap": test["per_class_ap"],
        "best_val_map": m["best_val_map"],
        "first_epoch_at_target": reached,
        "fit_seconds": m["fit_seconds"], "run_seconds": train_seconds,
        "curve": curve,
        "export": {name: {k: v for k, v in check.items() if k != "images"}
                   for name, check in exported["checks"].items()},
        "tflite_int8": int8_check,
        "keras_val_map": exported["reference"]["map"],
        "keras_val_map50": exported["reference"]["map50"],
        "tflite_latency_batch1_2threads": latency,
        "int8_over_float_latency": round(latency["int8"]["median_ms"] / latency["none"]["median_ms"], 3),
        "int8_over_float_bytes": round(latency["int8"]["bytes"] / latency["none"]["bytes"], 3),
        "dynamic_over_float_latency": round(
            latency["dynamic"]["median_ms"] / latency["none"]["median_ms"], 3),
    }
    print(payload)
    if not args.quick:
        write("detection", payload)


if __name__ == "__main__":
    main()

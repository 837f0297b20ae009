"""Mask R-CNN on the shapes scenes from scratch on this CPU, with its mask mAP cross-checked.

Trains the `shapes_mask_rcnn` recipe (what `python -m pipelines train task=segment` runs) through
`tasks.run`, recording validation box and mask mAP after every epoch against wall time. Then,
as a user would check it: the test scenes are written as PNG files with a COCO ground-truth file
(their masks as RLE), `predict` runs the exported SavedModel over the PNGs with that file's ids
(`coco=`), and pycocotools' COCOeval (iouType segm and bbox) scores predict's detections.json
against the file: numbers computed outside tfkarpa's evaluation, to compare with the run's.

    python benchmarks/segment.py           # writes benchmarks/results/segment.json
    python benchmarks/segment.py --quick   # 1 epoch on 400 scenes, nothing written
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

from _common import WallClock, write

from PIL import Image
from tfkarpa import config, tasks
from tfkarpa.data import detection as dd

RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "recipes" / "shapes_mask_rcnn.yaml"
TARGET_MASK_MAP50 = 0.85
BUDGET_SECONDS = 30 * 60


def cross_check(saved_model: str, data, root: Path) -> dict:
    """pycocotools on predict's output for the test scenes written as files."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from tfkarpa.tasks.detect.metrics import coco_ground_truth

    split = data.splits["test"]
    folder = root / "test_images"
    folder.mkdir()
    files = []
    for i, (image, _, _) in enumerate(split.make()):
        files.append(folder / f"{i:04d}.png")
        Image.fromarray(image.numpy()).save(files[-1])
    truth = [dd.GroundTruth(f.name, t.height, t.width, t.boxes, t.classes, i + 1, t.masks)
             for i, (f, t) in enumerate(zip(files, split.truth))]
    doc = coco_ground_truth(truth, data.class_names)
    for image, file in zip(doc["images"], files):
        image["file_name"] = file.name
    (folder / "truth.json").write_text(json.dumps(doc))
    predictor = tasks.load_predictor(saved_model)
    tasks.get("segment").predict(predictor, [str(folder)], {
        "out": str(root / "predicted"), "min_score": "0", "coco": str(folder / "truth.json")})
    out = {}
    results = json.loads((root / "predicted" / "detections.json").read_text())
    if not results:  # nothing detected (loadRes refuses an empty list)
        return {kind: {"map": 0.0, "map50": 0.0, "map75": 0.0} for kind in ("segm", "bbox")}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(folder / "truth.json"))
        dt = gt.loadRes(results)
        for kind in ("segm", "bbox"):
            ev = COCOeval(gt, dt, kind)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            out[kind] = {"map": round(float(ev.stats[0]), 5), "map50": round(float(ev.stats[1]), 5),
                         "map75": round(float(ev.stats[2]), 5)}
    out["detections"] = len(results)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pictures", help="copy the test split's drawn pictures here, to look at")
    args = ap.parse_args()
    extra = ["data.count=400", "epochs=1"] if args.quick else []
    root = Path(tempfile.mkdtemp(prefix="tfkarpa-segment-bench-"))
    try:
        cfg = config.build([RECIPE], [f"runs_root={root}", f"export_dir={root}/sm", *extra])
        clock = WallClock(("val_mask_map", "val_mask_map50", "val_map", "val_map50"))
        started = time.time()
        result = tasks.run(cfg, verbose=0, callbacks=[clock])
        run_seconds = round(time.time() - started, 1)
        data = dd.load(cfg.data, cfg.seed, with_masks=True)
        check = cross_check(result["artifacts"]["saved_model"], data, root)
        if args.pictures:
            shutil.copytree(result["artifacts"]["test_images"], args.pictures, dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m = result["metrics"]
    reached = next((p for p in clock.curve if (p["val_mask_map50"] or 0) >= TARGET_MASK_MAP50),
                   None)
    payload = {
        "recipe": "shapes_mask_rcnn", "overrides": extra,
        "model": cfg.model.name, "image_size": cfg.data.image_size, "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "params": m["params"],
        "scenes": {n: s.num_examples for n, s in data.splits.items()},
        "test": {k: m[k] for k in m if k.startswith("test_")},
        "fit_seconds": m["fit_seconds"], "run_seconds": run_seconds,
        # Met: validation mask mAP@0.5 reached the target within the budget of training time,
        # and the finished run's test split holds it.
        "target": {"mask_map50": TARGET_MASK_MAP50, "seconds": BUDGET_SECONDS,
                   "met": bool(reached and reached["seconds"] <= BUDGET_SECONDS
                               and m["test_mask_map50"] >= TARGET_MASK_MAP50)},
        "first_epoch_at_target": reached,
        "pycocotools_on_predict_output": check,
        "cross_check_gap_mask_map": round(abs(check["segm"]["map"] - m["test_mask_map"]), 5),
        "curve": clock.curve,
    }
    print(payload)
    if not args.quick:
        write("segment", payload)


if __name__ == "__main__":
    main()

"""The detector's sections of a run report: the test split's COCO table (boxes, and masks for
models with a mask head), AP per class and a gallery of test images with truth and predictions,
from what the run wrote into `eval/test/`."""

from __future__ import annotations

from pathlib import Path

from tfkarpa import runs
from tfkarpa.core.report import Figure, Heading, Table, Text, gallery_png

GALLERY = 8  # test images shown


COCO_NAMES = {"map": "mAP@[.5:.95]", "map50": "mAP@0.5", "map75": "mAP@0.75",
              "map_small": "mAP small", "map_medium": "mAP medium", "map_large": "mAP large",
              "ar100": "AR@100"}


def blocks(run_dir: Path, slug: str) -> list:
    test = run_dir / "eval" / "test"
    metrics = runs.read_json(test / "metrics.json")
    if not metrics:
        return []
    if "mask_map" in metrics:  # a model with a mask head: boxes and masks side by side
        out = [Heading(3, "Test results (COCO)"),
               Text(f"{metrics['images']} test images, {metrics['detections']} detections, "
                    "scored by pycocotools' COCOeval (bbox and segm)."),
               Table(["metric", "boxes", "masks"],
                     [[label, metrics.get(key), metrics.get(f"mask_{key}")]
                      for key, label in COCO_NAMES.items()]),
               Table(["class", "box AP@[.5:.95]", "mask AP@[.5:.95]"],
                     [[c, ap, metrics["mask_per_class_ap"].get(c)]
                      for c, ap in metrics["per_class_ap"].items()])]
    else:
        out = [Heading(3, "Test results (COCO)"),
               Text(f"{metrics['images']} test images, {metrics['detections']} detections, "
                    "scored by pycocotools' COCOeval (bbox)."),
               Table(["metric", "value"], [[label, metrics.get(key)]
                                           for key, label in COCO_NAMES.items()]),
               Table(["class", "AP@[.5:.95]"],
                     [[c, ap] for c, ap in metrics["per_class_ap"].items()])]
    pictures = sorted((test / "images").glob("*.png"))[:GALLERY]
    if pictures:
        out.append(Figure(f"{slug}-gallery.png", gallery_png(pictures),
                             "test images: ground truth in green, predictions in their class "
                             "colour with name and score (masks tinted in it)"))
    return out

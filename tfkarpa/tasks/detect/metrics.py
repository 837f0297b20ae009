"""COCO metrics of detections, in the original image's pixels, by pycocotools.

`Detections` is one image's result; `coco_metrics` turns a split's truth and detections into
mAP@[.5:.95], mAP@0.5, mAP@0.75, small/medium/large, recall and per-class AP with pycocotools'
COCOeval (the field's reference implementation); `write_eval` writes them as metrics.json,
report.md and a COCO results file; `check_close` is the export gate (within a point of mAP).
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tfkarpa import runs
from tfkarpa.data import detection as det_data
from tfkarpa.data import masks
from tfkarpa.errors import TfkarpaError

STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
         "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


@dataclass
class Detections:
    """One image's detections in its own pixels: xyxy boxes [n, 4], scores [n], classes [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    masks: list | None = None  # instance masks: one COCO RLE dict per detection (data.masks)

    @classmethod
    def from_padded(cls, boxes, scores, classes, count, scale: float, height: int, width: int,
                    masks=None):
        """From a model's padded outputs at the letterboxed size: unscale and clip. `masks`
        (a mask head's box-relative probabilities [D, m, m]) are pasted into the image at the
        unscaled boxes (the boxes the model decoded, before clipping) and kept at >= 0.5."""
        n = int(count)
        unclipped = np.asarray(boxes[:n], np.float32) / scale
        b = np.clip(unclipped, 0, [width, height, width, height]).astype(np.float32)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # wholly in the letterbox padding
        rles = None
        if masks is not None:
            rles = paste(np.asarray(masks[:n])[keep], unclipped[keep], height, width)
        return cls(b[keep], np.asarray(scores[:n], np.float32)[keep],
                   np.asarray(classes[:n]).astype(np.int32)[keep], rles)

    def keep(self, where: np.ndarray) -> "Detections":
        """The detections `where` selects (a bool mask or indices), masks included."""
        index = np.flatnonzero(where) if np.asarray(where).dtype == bool else np.asarray(where)
        return Detections(self.boxes[index], self.scores[index], self.classes[index],
                          None if self.masks is None else [self.masks[i] for i in index])

    def to_json(self, class_names: list[str]) -> list[dict]:
        return [{"bbox": [round(float(v), 2) for v in b], "score": round(float(s), 5),
                 "class_id": int(c), "class_name": class_names[int(c)]}
                for b, s, c in zip(self.boxes, self.scores, self.classes)]


def paste(box_masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> list[dict]:
    """Box-relative mask probabilities [n, m, m] at `boxes` [n, 4] (image pixels) -> the
    image's binary masks as RLE dicts (>= 0.5), by `rcnn.roi.paste_masks`."""
    if not len(box_masks):
        return []
    import tensorflow as tf

    from tfkarpa.models.rcnn.roi import paste_masks

    pasted = paste_masks(tf.constant(box_masks, tf.float32), tf.constant(boxes, tf.float32),
                         height, width).numpy()
    return masks.encode(pasted >= 0.5)


def _category(class_index: int, category_ids: list[int] | None) -> int:
    return category_ids[class_index] if category_ids else class_index + 1


def image_ids(truth: list[det_data.GroundTruth]) -> list[int]:
    """Each image's id: the annotation file's own where every image has a distinct one, else
    1..N (images from several files may share ids)."""
    ids = [t.image_id for t in truth]
    if truth and None not in ids and len(set(ids)) == len(ids):
        return [int(i) for i in ids]
    return list(range(1, len(truth) + 1))


def coco_ground_truth(truth: list[det_data.GroundTruth], class_names: list[str],
                      category_ids: list[int] | None = None) -> dict:
    """A COCO-format ground-truth document, with the source's own image and category ids
    where it has them (COCO files), else 1..N and class index + 1."""
    images, anns = [], []
    for image_id, t in zip(image_ids(truth), truth):
        images.append({"id": image_id, "file_name": t.name, "height": t.height, "width": t.width})
        areas = masks.area(t.masks) if t.masks is not None else None
        for k, (box, cls) in enumerate(zip(t.boxes, t.classes)):
            x0, y0, x1, y1 = (float(v) for v in box)
            ann = {"id": len(anns) + 1, "image_id": image_id,
                   "category_id": _category(int(cls), category_ids),
                   "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                   "iscrowd": 0}
            if areas is not None:  # COCO's area is the mask's: small/medium/large by it
                ann.update(segmentation=t.masks[k], area=float(areas[k]))
            anns.append(ann)
    return {"images": images, "annotations": anns,
            "categories": [{"id": _category(k, category_ids), "name": n}
                           for k, n in enumerate(class_names)]}


def coco_results(detections: list[Detections], image_ids: list[int] | None = None,
                 category_ids: list[int] | None = None) -> list[dict]:
    """Detections in the COCO results format ([x, y, w, h] boxes), with the given image ids
    (default 1..N) and category ids (default class index + 1)."""
    out = []
    for i, d in enumerate(detections):
        image_id = image_ids[i] if image_ids else i + 1
        for k, (box, score, cls) in enumerate(zip(d.boxes, d.scores, d.classes)):
            x0, y0, x1, y1 = (float(v) for v in box)
            out.append({"image_id": image_id, "category_id": _category(int(cls), category_ids),
                        "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                        "score": round(float(score), 6)})
            if d.masks is not None:
                out[-1]["segmentation"] = d.masks[k]
    return out


def coco_metrics(truth: list[det_data.GroundTruth], detections: list[Detections],
                 class_names: list[str], category_ids: list[int] | None = None,
                 iou_type: str = "bbox") -> dict:
    """pycocotools' COCOeval: the 12 standard numbers and AP per class, of boxes (`iou_type`
    bbox) or masks (segm). With bbox, where truth and detections both carry masks, the mask
    numbers come too, as `mask_map`, `mask_map50`, ..., `mask_per_class_ap`.

    Values COCO cannot define (no object of that size, no class instance) are None.
    """
    out = _cocoeval(truth, detections, class_names, category_ids, iou_type)
    if iou_type == "bbox" and truth and all(t.masks is not None for t in truth) and all(
            d.masks is not None for d in detections):
        segm = _cocoeval(truth, detections, class_names, category_ids, "segm")
        out.update({f"mask_{k}": segm[k] for k in (*STATS, "per_class_ap")})
    return out


def _cocoeval(truth, detections, class_names, category_ids, iou_type: str) -> dict:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(detections):
        raise ValueError(f"{len(truth)} images but {len(detections)} detection lists")
    results = coco_results(detections, image_ids(truth), category_ids)
    gt = COCO()
    gt.dataset = coco_ground_truth(truth, class_names, category_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        if not results:  # loadRes refuses an empty list; nothing detected scores 0
            return {**{k: 0.0 for k in STATS}, "per_class_ap": {n: 0.0 for n in class_names},
                    "images": len(truth), "detections": 0}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: (None if v < 0 else round(float(v), 5)) for k, v in zip(STATS, ev.stats)}
    # precision: [IoU thresholds, recall points, classes, area ranges, max dets]
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k]
        per_class[name] = None if not np.any(p > -1) else round(float(np.mean(p[p > -1])), 5)
    return {**stats, "per_class_ap": per_class, "images": len(truth), "detections": len(results)}


def metrics_markdown(metrics: dict, title: str) -> str:
    show = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    masked = "mask_map" in metrics
    names = {"map": "mAP@[.5:.95]", "map50": "mAP@0.5", "map75": "mAP@0.75",
             "map_small": "mAP small", "map_medium": "mAP medium", "map_large": "mAP large",
             "ar100": "AR@100"}
    if masked:  # instance masks: box and mask numbers side by side
        rows = [f"# {title}", "", "| metric | boxes | masks |", "|---|---|---|"]
        rows += [f"| {label} | {show(metrics.get(key))} | {show(metrics.get('mask_' + key))} |"
                 for key, label in names.items()]
        kind = "bbox and segm"
    else:
        rows = [f"# {title}", "", "| metric | value |", "|---|---|"]
        rows += [f"| {label} | {show(metrics.get(key))} |" for key, label in names.items()]
        kind = "bbox"
    rows += ["", f"{metrics['images']} images, {metrics['detections']} detections "
             f"(pycocotools COCOeval, {kind})", ""]
    if masked:
        rows += ["| class | box AP@[.5:.95] | mask AP@[.5:.95] |", "|---|---|---|"]
        rows += [f"| {name} | {show(ap)} | {show(metrics['mask_per_class_ap'].get(name))} |"
                 for name, ap in metrics["per_class_ap"].items()]
    else:
        rows += ["| class | AP@[.5:.95] |", "|---|---|"]
        rows += [f"| {name} | {show(ap)} |" for name, ap in metrics["per_class_ap"].items()]
    return "\n".join(rows) + "\n"


def write_eval(metrics: dict, detections: list[Detections], truth: list[det_data.GroundTruth],
               class_names: list[str], out_dir: Path, title: str, skipped: list[str] = (),
               category_ids: list[int] | None = None) -> dict:
    """metrics.json, report.md and detections.json (COCO results with the annotation file's
    own image and category ids, so pycocotools scores it against that file) into `out_dir`,
    atomically. `skipped`: annotations left out at load (data.skip_bad), listed in the report."""
    report = metrics_markdown(metrics, title)
    if skipped:
        report += (f"\n{len(skipped)} bad annotation(s) were left out of the data "
                   "(data.skip_bad=true):\n\n" + "".join(f"- {s}\n" for s in skipped[:50]))
        if len(skipped) > 50:
            report += f"- ... and {len(skipped) - 50} more (manifest.json lists them all)\n"
    with runs.atomic_dir(out_dir, "evaluation", "evaluate out") as tmp:
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "skipped_annotations":
                                                      len(skipped)}, indent=2))
        (tmp / "report.md").write_text(report)
        ids = image_ids(truth)
        doc = coco_results(detections, ids, category_ids)
        names = {image_id: t.name for image_id, t in zip(ids, truth)}
        for row in doc:
            row["file_name"] = names[row["image_id"]]
        (tmp / "detections.json").write_text(json.dumps(doc))
    return {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.md"),
            "detections": str(out_dir / "detections.json")}


def check_close(expected: dict, got: dict, what: str, tolerance: float = 0.01) -> dict:
    """Refuse an export whose mAP (box, and mask where there are masks) falls more than
    `tolerance` below the Keras model's."""
    keys = ("map", "map50", "mask_map", "mask_map50") if "mask_map" in expected else ("map", "map50")
    gaps = {k: round((expected[k] or 0.0) - (got.get(k) or 0.0), 5) for k in keys}
    if max(gaps.values()) > tolerance:
        raise TfkarpaError(f"{what}: validation mAP drops by {gaps} against the Keras model "
                           f"(allowed {tolerance}); the export was not written")
    return gaps


def partners(a: tuple, b: tuple, box_atol: float, score_atol: float,
             allowed: np.ndarray | None = None) -> np.ndarray:
    """For each detection of `a` (boxes [N, 4], scores [N], classes [N]), the index of its
    partner in `b`, or -1: the nearest free detection of the same class with every box side
    within `box_atol` px and the score within `score_atol` (and `allowed[i, j]`, e.g. masks that
    agree). Order-blind: NMS may return detections whose scores tie in either order on another
    CPU. Where detection i of `b` fits as well as any, it is i's partner (the order kept)."""
    a_boxes, a_scores, a_classes = (np.asarray(x) for x in a[:3])
    b_boxes, b_scores, b_classes = (np.asarray(x) for x in b[:3])
    free = np.ones(len(b_boxes), bool)
    found = np.full(len(a_boxes), -1, np.int64)
    for i, (box, score, cls) in enumerate(zip(a_boxes, a_scores, a_classes)):
        apart = np.abs(b_boxes - box).max(axis=1) if len(b_boxes) else np.zeros(0)
        fits = (free & (b_classes == cls) & (apart <= box_atol)
                & (np.abs(b_scores - score) <= score_atol))
        if allowed is not None:
            fits &= allowed[i]
        if not fits.any():
            continue
        nearest = apart[fits].min()
        k = i if i < len(fits) and fits[i] and apart[i] == nearest else int(
            np.flatnonzero(fits)[np.argmin(apart[fits])])
        free[k] = False
        found[i] = k
    return found


def unpaired(a: Detections, b: Detections, box_atol: float, score_atol: float,
             mask_share: float = 0.02) -> int:
    """How many detections of `a` and `b` (one image) have no partner in the other
    (`partners`), masks compared too where both have them: differing on at most `mask_share`
    of their union's pixels (or 2 pixels: a small mask's edge)."""
    allowed = None
    if a.masks is not None and b.masks is not None:
        differ = masks.different_pixels(a.masks, b.masks)
        union = (masks.area(a.masks)[:, None] + masks.area(b.masks)[None, :] + differ) / 2
        allowed = differ <= np.maximum(mask_share * union, 2)
    paired = int((partners((a.boxes, a.scores, a.classes), (b.boxes, b.scores, b.classes),
                           box_atol, score_atol, allowed) >= 0).sum())
    return len(a.boxes) - paired + len(b.boxes) - paired


def check_same(expected: list[Detections], got: list[Detections], names: list[str], what: str,
               box_atol: float = 1.0, score_atol: float = 0.02,
               tolerance: float = 0.01) -> dict:
    """Refuse a file that does not return `expected`'s detections, masks included (another
    runtime's file of the same graph): at most `tolerance` of the detections may lack a partner (`unpaired`:
    a score on the confidence threshold or an overlap on the NMS threshold may tip either
    way). mAP alone is not enough: a file returning 3 of 100 detections can keep it."""
    lost = [unpaired(a, b, box_atol, score_atol) for a, b in zip(expected, got)]
    total = sum(len(a.boxes) for a in expected)
    if sum(lost) > tolerance * max(total, 1):
        worst = int(np.argmax(lost))
        raise TfkarpaError(
            f"{what}: {sum(lost)} of {total} detections differ from the TFLite file's on the "
            f"validation images (allowed {tolerance:.0%}); on image '{names[worst]}' it returns "
            f"{len(got[worst].boxes)} where the TFLite file returns "
            f"{len(expected[worst].boxes)}; the export was not written (formats=tflite runs "
            "this mode)")
    return {"detections": total, "unpaired": sum(lost), "box_atol_px": box_atol,
            "score_atol": score_atol}


def empty_like(n: int) -> list[Detections]:
    return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int32)) for _ in range(n)]

"""Instance masks: COCO polygons and RLE read and checked (bad ones named by annotation id),
shapes' exact masks, and mask mAP by pycocotools (iouType segm) on cases worked by hand."""

import json

import numpy as np
import pytest
from PIL import Image

from tfkarpa import config
from tfkarpa.data import annotations, masks
from tfkarpa.data import detection as dd
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.detect import metrics


def test_rle_round_trip_area_and_box():
    drawn = np.zeros((2, 5, 6), np.uint8)
    drawn[0, 1:3, 2:5] = 1
    drawn[1, 4, 0] = 1
    rles = masks.encode(drawn)
    assert json.loads(json.dumps(rles)) == rles  # plain JSON: str counts
    np.testing.assert_array_equal(masks.decode(rles, 5, 6), drawn)
    np.testing.assert_array_equal(masks.area(rles), [6, 1])
    np.testing.assert_array_equal(masks.to_box(rles[0]), [2, 1, 5, 3])
    assert masks.encode(np.zeros((0, 5, 6))) == [] and masks.decode([], 5, 6).shape == (0, 5, 6)


@pytest.mark.parametrize("segmentation, problem", [
    ([[1, 1, 4, 1, 4, 3]], None),
    ({"size": [5, 6], "counts": [7, 2, 3, 2, 3, 2, 11]}, None),
    ([[1, 1, 40, 1, 4, 3]], "reaches outside the 6x5 image"),
    ([[1, 1, 4, 1, 4]], "even count of numbers"),
    ([[1, 1, 4, 1]], "at least 3 points"),
    ([], "non-empty list"),
    ([[1, 1, 1, 1, 1, 1]], "mask is empty"),
    ({"size": [6, 5], "counts": [30]}, "is not the image's [5, 6]"),
    ({"size": [5, 6], "counts": [7, 2, 3]}, "adding up to height x width = 30"),
    ({"size": [5, 6], "counts": "zzzz"}, "do not describe a 5x6 mask"),
    ({"size": [5, 6], "counts": ";23"}, "do not describe a 5x6 mask"),
    ({"counts": [30]}, "needs 'size'"),
    ("polygon", "polygons (a list) or an RLE"),
])
def test_coco_segmentations_are_read_or_named(segmentation, problem):
    rle, found = masks.from_coco(segmentation, 5, 6)
    if problem is None:
        assert found is None and masks.area([rle])[0] > 0
        if isinstance(segmentation, dict):  # the RLE's own pixels
            assert masks.decode([rle], 5, 6)[0].sum() == 6
    else:
        assert rle is None and problem in found


def _coco_with_masks(root, segmentations):
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "a.png")
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
           "categories": [{"id": 3, "name": "blob"}], "annotations": []}
    for k, seg in enumerate(segmentations):
        ann = {"id": 50 + k, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]}
        if seg is not None:
            ann["segmentation"] = seg
        doc["annotations"].append(ann)
    (root / "instances.json").write_text(json.dumps(doc))
    return root / "instances.json"


def test_coco_masks_load_and_bad_ones_are_named_by_annotation_id(tmp_path):
    square = [[2, 2, 12, 2, 12, 12, 2, 12]]
    good = _coco_with_masks(tmp_path / "good", [square])
    found = annotations.load_coco(good, with_masks=True)
    mask = masks.decode(found.examples[0].masks, 30, 40)[0]
    assert mask[5, 5] == 1 and mask[20, 20] == 0 and 90 <= mask.sum() <= 121
    assert annotations.load_coco(good).examples[0].masks is None  # boxes only: not read
    bad = _coco_with_masks(tmp_path / "bad", [square, None, [[0, 0, 50, 0, 50, 5]]])
    with pytest.raises(TfkarpaError, match=r"annotation id 51 .*no 'segmentation'"):
        annotations.load_coco(bad, with_masks=True)
    skipped = annotations.load_coco(bad, skip_bad=True, with_masks=True)
    assert len(skipped.examples[0].masks) == 1
    assert any("annotation id 52" in s and "outside the 40x30 image" in s
               for s in skipped.skipped)


def test_shapes_masks_are_each_objects_visible_pixels():
    cfg = config.build(overrides=["task=detect", "data.count=40", "data.image_size=64",
                                  "data.objects=1-3", "data.overlap=0.3"]).data
    with_masks = dd.load(cfg, 0, with_masks=True)
    plain = dd.load(cfg, 0)
    assert with_masks.fingerprint == plain.fingerprint  # the same scenes
    for truth in with_masks.splits["train"].truth:
        assert len(truth.masks) == len(truth.boxes)
        drawn = masks.decode(truth.masks, 64, 64)
        assert drawn.sum(axis=0).max() <= 1  # no pixel belongs to two objects
        for rle, box in zip(truth.masks, truth.boxes):
            tight = masks.to_box(rle)  # the visible part lies inside the object's box
            assert np.all(tight[:2] >= box[:2] - 1) and np.all(tight[2:] <= box[2:] + 1)
    with pytest.raises(TfkarpaError, match="instance masks come from shapes or coco"):
        dd.load(config.build(overrides=["task=detect", "data.source=yolo:/x"]).data, 0,
                with_masks=True)


def _square(y0, x0, side, size=20):
    drawn = np.zeros((size, size), np.uint8)
    drawn[y0:y0 + side, x0:x0 + side] = 1
    return drawn


def test_mask_map_by_pycocotools_on_cases_worked_by_hand():
    objects = np.stack([_square(2, 2, 8), _square(10, 10, 8)])
    truth = [dd.GroundTruth("a", 20, 20, np.array([[2, 2, 10, 10], [10, 10, 18, 18]], np.float32),
                            np.array([0, 1], np.int32), masks=masks.encode(objects))]
    boxes = truth[0].boxes.copy()

    def found(drawn):
        return [metrics.Detections(boxes, np.array([0.9, 0.8], np.float32),
                                   np.array([0, 1], np.int32), masks.encode(drawn))]

    exact = metrics.coco_metrics(truth, found(objects), ["a", "b"], iou_type="segm")
    assert exact["map"] == pytest.approx(1.0) and exact["detections"] == 2
    # The second mask covers only the top half of its object: mask IoU 0.5, box IoU still 1.
    half = objects.copy()
    half[1, 14:] = 0
    segm = metrics.coco_metrics(truth, found(half), ["a", "b"], iou_type="segm")
    bbox = metrics.coco_metrics(truth, found(half), ["a", "b"])
    assert bbox["map"] == pytest.approx(1.0)
    # Class b matches at IoU 0.50 only (1 of 10 thresholds): AP 0.1; class a 1.0.
    assert segm["per_class_ap"]["b"] == pytest.approx(0.1)
    assert segm["map"] == pytest.approx(0.55) and segm["map50"] == pytest.approx(1.0)

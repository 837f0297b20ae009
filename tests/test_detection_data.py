"""Detection sources and pipeline: shapes scenes, COCO/VOC/YOLO and TFDS through one form,
the letterbox that training and serving share, and box-aware batches."""

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfkarpa import config
from tfkarpa.data import detection as dd
from tfkarpa.data import shapes
from tfkarpa.errors import TfkarpaError


def det_cfg(*extra):
    return config.build(overrides=["task=detect", "data.count=60", "data.image_size=32",
                                   "batch_size=8", *extra])


def test_shapes_scenes_have_boxes_inside_and_counts_in_range():
    cfg = det_cfg("data.objects=1-3", "data.min_scale=0.3", "data.max_scale=0.5")
    data = dd.load(cfg.data, seed=1)
    assert data.class_names == list(shapes.CLASSES)
    names = [t.name for s in data.splits.values() for t in s.truth]
    assert len(names) == 60 and len(set(names)) == 60  # disjoint, complete splits
    for split in data.splits.values():
        for t in split.truth:
            assert 1 <= len(t.classes) <= 3 and t.boxes.shape == (len(t.classes), 4)
            assert np.all(t.boxes[:, :2] >= 0) and np.all(t.boxes[:, 2:] <= 32)
            sides = np.maximum(t.boxes[:, 2] - t.boxes[:, 0], t.boxes[:, 3] - t.boxes[:, 1])
            assert np.all(sides <= 0.5 * 32 + 1e-3)  # a shape fits in its diameter
    again = dd.load(cfg.data, seed=1)
    assert again.fingerprint == data.fingerprint
    assert dd.load(cfg.data, seed=2).fingerprint != data.fingerprint


def test_single_object_scenes_match_the_classification_set():
    """Detection's range parameter leaves the classification scenes as they were."""
    images, labels, boxes, classes = shapes.generate(5, 32, seed=0)
    again = shapes.generate(5, 32, seed=0, num_objects=(1, 1))
    np.testing.assert_array_equal(images, again[0])
    assert [c[0] for c in classes] == list(labels)


def test_letterbox_is_identity_at_size_and_maps_boxes_otherwise():
    image = tf.constant(np.random.default_rng(0).integers(0, 255, (32, 32, 3)), tf.uint8)
    same, scale = dd.letterbox(image, 32)
    assert same is image and float(scale) == 1.0
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[10:20, 40:60] = 255  # a white block: box [40, 10, 60, 20]
    boxed, scale = dd.letterbox(tf.constant(wide), 32)
    assert boxed.shape == (32, 32, 3) and float(scale) == pytest.approx(0.4)
    rows, cols = np.nonzero(boxed.numpy()[..., 0] > 127)
    box = np.array([40, 10, 60, 20]) * 0.4
    assert cols.min() >= box[0] - 1 and cols.max() <= box[2] and rows.min() >= box[1] - 1
    assert np.all(boxed.numpy()[16:] == 0)  # padding below the 80x40 -> 32x16 content


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["off", "light", "strong"])
def test_batches_are_dense_padded_and_boxes_stay_valid(augment):
    cfg = det_cfg(f"data.augment={augment}", "data.objects=2-3")
    data = dd.load(cfg.data, seed=0)
    boxes = dd.max_boxes(data, cfg)
    assert boxes == (12 if augment == "strong" else 3)
    ds = dd.make_dataset(data.splits["train"], cfg, training=augment != "off", boxes=boxes)
    for images, target in ds.take(3):
        assert images.dtype == tf.float32 and images.shape[1:] == (32, 32, 3)
        b, c = target["boxes"].numpy(), target["classes"].numpy()
        assert b.shape[1:] == (boxes, 4) and c.shape[1:] == (boxes,)
        real = c >= 0
        if augment == "off":
            assert real.any(axis=1).all()  # every image keeps its objects
        else:  # a jittered crop may push an image's objects out of the frame, rarely all
            assert real.any(axis=1).mean() >= 0.5
        assert np.all(c[real] < 6) and np.all(c[~real] == -1)
        kept = b[real]
        assert np.all(kept[:, 2] > kept[:, 0]) and np.all(kept[:, 3] > kept[:, 1])
        assert np.all(kept >= -1e-3) and np.all(kept <= 32 + 1e-3)


def test_evaluation_batches_keep_the_truth():
    cfg = det_cfg()
    data = dd.load(cfg.data, seed=0)
    split = data.splits["val"]
    images, target = next(iter(dd.make_dataset(split, cfg, training=False, boxes=4,
                                               batch_size=64)))
    for i, truth in enumerate(split.truth):
        n = len(truth.classes)
        np.testing.assert_allclose(target["boxes"][i, :n], truth.boxes, atol=1e-4)
        np.testing.assert_array_equal(target["classes"][i, :n], truth.classes)


def _coco_folder(root, sizes=((40, 30), (60, 60), (30, 50))):
    root.mkdir(parents=True, exist_ok=True)
    doc = {"images": [], "annotations": [], "categories": [{"id": 7, "name": "dot"},
                                                          {"id": 9, "name": "bar"}]}
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 20 * i, np.uint8)).save(root / f"{i}.png")
        doc["images"].append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        doc["annotations"].append({"id": 100 + i, "image_id": i + 1, "category_id": 9,
                                   "bbox": [1, 2, 10, 8]})
    (root / "instances.json").write_text(json.dumps(doc))
    return root / "instances.json"


def test_coco_files_letterbox_into_batches(tmp_path):
    path = _coco_folder(tmp_path / "coco", sizes=[(40, 30), (60, 60), (30, 50)] * 4)
    cfg = det_cfg(f"data.source=coco:{path}", "data.val_fraction=0.2", "data.test_fraction=0.2")
    data = dd.load(cfg.data, seed=0)
    assert data.class_names == ["dot", "bar"] and data.source.startswith("coco:")
    assert sum(s.num_examples for s in data.splits.values()) == 12
    split = data.splits["train"]
    images, target = next(iter(dd.make_dataset(split, cfg, training=False, boxes=2,
                                               batch_size=16)))
    for i, truth in enumerate(split.truth):
        scale = 32 / max(truth.height, truth.width)
        np.testing.assert_allclose(target["boxes"][i, 0], truth.boxes[0] * scale, rtol=1e-5)
        assert int(target["classes"][i, 0]) == 1


def test_bad_detection_sources_are_named(tmp_path):
    with pytest.raises(TfkarpaError, match="not a detection source"):
        dd.load(det_cfg("data.source=digits").data)
    with pytest.raises(TfkarpaError, match="'coco' needs an argument"):
        dd.load(det_cfg("data.source=coco").data)
    with pytest.raises(TfkarpaError, match="data.objects"):
        dd.load(det_cfg("data.objects=3-1").data)
    with pytest.raises(TfkarpaError, match="data.objects"):
        dd.parse_objects("many")
    path = _coco_folder(tmp_path / "c", sizes=[(40, 30), (60, 60), (30, 50)] * 3)
    doc = json.loads(path.read_text())
    doc["annotations"][1]["bbox"] = [50, 50, 20, 20]  # outside the 60x60 image
    path.write_text(json.dumps(doc))
    with pytest.raises(TfkarpaError, match=r"annotation id 101 .*1\.png.*outside"):
        dd.load(det_cfg(f"data.source=coco:{path}").data)
    skipped = dd.load(det_cfg(f"data.source=coco:{path}", "data.skip_bad=true").data, seed=0)
    assert len(skipped.skipped) == 1 and "annotation id 101" in skipped.skipped[0]


def _voc_examples(count=6):
    """VOC-shaped examples with known boxes (TFDS's own mock draws inverted, mismatched ones)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        h, w = 30 + 5 * i, 50
        y0, x0 = rng.uniform(0, 0.5, (2, 2))
        boxes = np.stack([y0, x0, y0 + 0.3, x0 + 0.4], -1).astype(np.float32)  # relative yxyx
        out.append({"image": rng.integers(0, 255, (h, w, 3)).astype(np.uint8),
                    "objects": {"bbox": boxes, "label": np.array([i % 20, 14], np.int64)}})
    return out


def test_tfds_voc_maps_relative_yxyx_to_pixel_xyxy():
    import tensorflow_datasets as tfds

    examples = _voc_examples()

    def as_dataset(self, split, **_):
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature={
            "image": tf.TensorSpec((None, None, 3), tf.uint8),
            "objects": {"bbox": tf.TensorSpec((None, 4), tf.float32),
                        "label": tf.TensorSpec((None,), tf.int64)}})

    cfg = det_cfg("data.source=tfds:voc/2007")
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        data = dd.load(cfg.data, seed=0)
        assert len(data.class_names) == 20 and data.class_names[0] == "aeroplane"
        split = data.splits["train"]
        for truth, example in zip(split.truth, examples):
            h, w = example["image"].shape[:2]
            ymin, xmin, ymax, xmax = np.moveaxis(example["objects"]["bbox"], -1, 0)
            np.testing.assert_allclose(truth.boxes, np.stack([xmin * w, ymin * h, xmax * w,
                                                              ymax * h], -1), rtol=1e-5)
            np.testing.assert_array_equal(truth.classes, example["objects"]["label"])
            assert (truth.height, truth.width) == (h, w)
        images, target = next(iter(dd.make_dataset(split, cfg, training=True, boxes=2)))
        assert images.shape == (6, 32, 32, 3) and int((target["classes"] >= 0).numpy().sum()) == 12
        # Bad boxes are named like any annotation's.
        examples[2]["objects"]["bbox"][0] = [0.5, 0.5, 0.2, 0.9]
        with pytest.raises(TfkarpaError, match=r"tfds:voc/2007\[train\]\[2\] object 0: box"):
            dd.load(cfg.data, seed=0)

"""COCO / VOC / YOLO readers: conversions through keras-cv, every bad annotation named, path
escapes refused, and hypothesis fuzzing: any input gives a result or a TfkarpaError."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tfkarpa.data import annotations as ann
from tfkarpa.errors import TfkarpaError

FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)


def _coco(tmp_path, **changes):
    for name in ("a.png", "b.png"):
        _image(tmp_path / "images" / name)
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5]},
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 30]},
            {"id": 12, "image_id": 2, "category_id": 1, "bbox": [5, 5, 4, 4], "iscrowd": 1},
        ],
        "categories": [{"id": 3, "name": "star"}, {"id": 1, "name": "circle"}],
    }
    for key, value in changes.items():
        doc[key] = value(doc) if callable(value) else value
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def test_coco_reads_boxes_as_xyxy_with_classes_ordered_by_id(tmp_path):
    data = ann.load_coco(_coco(tmp_path), tmp_path / "images")
    assert data.class_names == ["circle", "star"]
    first = data.examples[0]
    np.testing.assert_allclose(first.boxes, [[2, 3, 12, 8], [0, 0, 40, 30]])
    assert first.classes.tolist() == [1, 0]
    assert len(data.examples[1].classes) == 0  # only a crowd region: an image without objects


def _edit_ann(i, **fields):
    def change(doc):
        doc["annotations"][i].update(fields)
        return doc["annotations"]
    return change


@pytest.mark.parametrize("changes, message", [
    ({"categories": None}, "missing key 'categories'"),
    ({"annotations": _edit_ann(0, category_id=7)}, "annotation id 10 (image 'a.png'): unknown category_id 7"),
    ({"annotations": _edit_ann(0, bbox=[2, 3, -1, 5])}, "annotation id 10 (image 'a.png'): bbox [2, 3, -1, 5] has non-positive"),
    ({"annotations": _edit_ann(0, bbox=[35, 3, 10, 5])}, "extends outside the 40x30 image"),
    ({"annotations": _edit_ann(0, bbox=[1, 2, 3])}, "'bbox' must be 4 numbers"),
    ({"annotations": _edit_ann(0, image_id=99)}, "annotation id 10: image_id 99 is not in 'images'"),
    ({"annotations": _edit_ann(1, id=10)}, "annotation id 10 appears twice"),
    ({"images": lambda d: d["images"] + [d["images"][0]]}, "image id 1 appears twice"),
    ({"categories": lambda d: d["categories"] + [{"id": 1, "name": "x"}]}, "category id 1 appears twice"),
    ({"images": lambda d: [{**d["images"][0], "file_name": "../escape.png"}, d["images"][1]]}, "leaves the data directory"),
    ({"images": lambda d: [{**d["images"][0], "file_name": "missing.png"}, d["images"][1]]}, "image file does not exist"),
    ({"images": lambda d: [{**d["images"][0], "width": 50}, d["images"][1]]}, "the file is 40x30, the JSON says 50x30"),
    ({"images": lambda d: [{**d["images"][0], "height": 0}, d["images"][1]]}, "needs positive integer 'width' and 'height'"),
])
def test_coco_bad_annotations_are_named(tmp_path, changes, message):
    with pytest.raises(TfkarpaError, match=__import__("re").escape(message)):
        ann.load_coco(_coco(tmp_path, **changes), tmp_path / "images")


def test_coco_skip_bad_leaves_out_and_lists(tmp_path):
    path = _coco(tmp_path, annotations=_edit_ann(0, category_id=7))
    data = ann.load_coco(path, tmp_path / "images", skip_bad=True)
    assert len(data.skipped) == 1 and "unknown category_id 7" in data.skipped[0]
    assert data.num_boxes == 1


def test_coco_unreadable_json_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(TfkarpaError, match=r"broken.json: not valid JSON .* line 2"):
        ann.load_coco(path)


def _voc(tmp_path, objects, filename="img.png", size=(40, 30), text=None):
    _image(tmp_path / "JPEGImages" / "img.png", size)
    xml = tmp_path / "Annotations" / "img.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    xml.write_text(text if text is not None else
                   f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
                   f"<height>{size[1]}</height><depth>3</depth></size>{body}</annotation>")
    return tmp_path


def test_voc_one_based_pixels_become_zero_based_edges(tmp_path):
    data = ann.load_voc(_voc(tmp_path, [("dog", (1, 1, 10, 20)), ("cat", (5, 6, 40, 30))]))
    assert data.class_names == ["cat", "dog"]
    np.testing.assert_allclose(data.examples[0].boxes, [[0, 0, 10, 20], [4, 5, 40, 30]])
    assert data.examples[0].classes.tolist() == [1, 0]


@pytest.mark.parametrize("objects, text, message", [
    ([], "<annotation><filename>img.png</filename>\n<size><width>4", "malformed XML at line 2"),
    ([("dog", (1, 1, 50, 20))], None, "object 1 ('dog'): box [0.0, 0.0, 50.0, 20.0] (xyxy) extends outside"),
    ([("dog", (5, 1, 3, 20))], None, "has no area"),
    ([("", (1, 1, 3, 3))], None, "object 1 has no <name>"),
])
def test_voc_bad_annotations_are_named(tmp_path, objects, text, message):
    with pytest.raises(TfkarpaError, match=__import__("re").escape(message)):
        ann.load_voc(_voc(tmp_path, objects, text=text))


def test_voc_path_escape_and_unknown_class(tmp_path):
    with pytest.raises(TfkarpaError, match="leaves the data directory"):
        ann.load_voc(_voc(tmp_path, [("dog", (1, 1, 5, 5))], filename="../../etc/passwd"))
    with pytest.raises(TfkarpaError, match="unknown class name"):
        ann.load_voc(_voc(tmp_path, [("dog", (1, 1, 5, 5))]), class_names=["cat"])


def _yolo(tmp_path, lines, names="circle\nstar\n"):
    _image(tmp_path / "images" / "a.png")
    (tmp_path / "labels").mkdir(parents=True, exist_ok=True)
    (tmp_path / "labels" / "a.txt").write_text("\n".join(lines))
    if names is not None:
        (tmp_path / "classes.txt").write_text(names)
    return tmp_path


def test_yolo_centres_become_xyxy_pixels(tmp_path):
    data = ann.load_yolo(_yolo(tmp_path, ["1 0.5 0.5 0.5 0.2", "", "0 0.25 0.5 0.5 1.0"]))
    assert data.class_names == ["circle", "star"]
    np.testing.assert_allclose(data.examples[0].boxes, [[10, 12, 30, 18], [0, 0, 20, 30]],
                               atol=1e-4)
    assert data.examples[0].classes.tolist() == [1, 0]


@pytest.mark.parametrize("line, message", [
    ("1 0.5 0.5", "a.txt line 1: expected 5 fields (class cx cy w h), got 3"),
    ("2 0.5 0.5 0.1 0.1", "a.txt line 1: class 2 is not in 0..1"),
    ("x 0.5 0.5 0.1 0.1", "a.txt line 1: not numbers"),
    ("0 0.5 0.5 1.5 0.1", "coordinates must be in [0, 1]"),
    ("0 0.9 0.5 0.5 0.1", "extends outside the 40x30 image"),
    ("0 0.5 0.5 0 0.1", "has no area"),
])
def test_yolo_bad_lines_are_named(tmp_path, line, message):
    with pytest.raises(TfkarpaError, match=__import__("re").escape(message)):
        ann.load_yolo(_yolo(tmp_path, [line]))


def test_yolo_names_from_data_yaml_and_missing_names(tmp_path):
    root = _yolo(tmp_path, ["1 0.5 0.5 0.5 0.2"], names=None)
    with pytest.raises(TfkarpaError, match="no class names file"):
        ann.load_yolo(root)
    (root / "data.yaml").write_text("names: {0: circle, 1: star}\n")
    assert ann.load_yolo(root).class_names == ["circle", "star"]


@FUZZ
@given(doc=st.recursive(
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["images", "annotations", "categories", "id", "file_name", "width",
                         "height", "image_id", "category_id", "bbox", "name", "iscrowd"]),
        inner, max_size=6),
    max_leaves=25))
def test_fuzz_coco_gives_a_result_or_a_clear_error(tmp_path, doc):
    _image(tmp_path / "a.png")
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(doc))
    try:
        ann.load_coco(path)
    except TfkarpaError:
        pass


@FUZZ
@given(text=st.text(alphabet="0123456789 .-e\nxa", max_size=80))
def test_fuzz_yolo_label_lines(tmp_path, text):
    try:
        ann.load_yolo(_yolo(tmp_path, [text]))
    except TfkarpaError:
        pass


@FUZZ
@given(text=st.text(max_size=120) | st.sampled_from([
    "<annotation><filename>img.png</filename><size><width>40</width><height>30</height>"
    "</size><object><name>a</name><bndbox><xmin>1e9</xmin></bndbox></object></annotation>",
    '<!DOCTYPE a [<!ENTITY x "xx"><!ENTITY y "&x;&x;&x;&x;">]><annotation>&y;</annotation>']))
def test_fuzz_voc_xml(tmp_path, text):
    try:
        ann.load_voc(_voc(tmp_path, [], text=text))
    except TfkarpaError:
        pass


@FUZZ
@given(boxes=st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0.5, 50),
                                st.floats(0.5, 50)), min_size=1, max_size=6))
def test_fuzz_box_conversions_round_trip(boxes):
    xywh = np.array(boxes, np.float32)
    xyxy = ann.convert_boxes(xywh, "xywh", "xyxy")
    np.testing.assert_allclose(xyxy[:, 2:] - xyxy[:, :2], xywh[:, 2:], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(ann.convert_boxes(xyxy, "xyxy", "xywh"), xywh, rtol=1e-5, atol=1e-3)
    centre = ann.convert_boxes(xyxy, "xyxy", "center_xywh")
    np.testing.assert_allclose(ann.convert_boxes(centre, "center_xywh", "xyxy"), xyxy,
                               rtol=1e-5, atol=1e-3)

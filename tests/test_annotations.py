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


# ----------------------------------------------------------------------------- fuzzing
# Each fuzz test checks two things: a bad input ends in a TfkarpaError (nothing else escapes),
# and an input that loads gives what the file says, by an oracle worked here from the fuzzed
# document alone (the format's rules written out again, not the loader's code).

def _xyxy_inside(boxes, width, height):
    """Every xyxy box has area and lies in a width x height image (the readers' 0.5 px slack)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return bool(np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
                and np.all(boxes[:, :2] >= -0.5) and np.all(boxes[:, 2] <= width + 0.5)
                and np.all(boxes[:, 3] <= height + 0.5))


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
        data = ann.load_coco(path)
    except TfkarpaError:
        return
    # Loaded: the classes are the file's categories in id order, every example one of its
    # images at its stated size, holding at most that image's annotations, all inside it.
    categories = sorted((c["id"], c["name"]) for c in doc["categories"])
    assert data.class_names == [name for _, name in categories]
    images = {img["id"]: img for img in doc["images"]}
    assert 1 <= len(data.examples) <= len(images)
    for example in data.examples:
        img = images[example.image_id]
        assert (example.width, example.height) == (img["width"], img["height"]) == (40, 30)
        assert example.path == (tmp_path / img["file_name"]).resolve()
        assert len(example.classes) <= sum(isinstance(a, dict) and a.get("image_id") == img["id"]
                                           for a in doc["annotations"])
        assert _xyxy_inside(example.boxes, 40, 30)
        assert np.all((example.classes >= 0) & (example.classes < len(categories)))


# Structured COCO documents, mostly well formed, so that many load: the images on disk are
# a.png (40x30) and b.png (24x20) in images/, and a.png again one level up (a path escape).
_SIZES = {"a.png": (40, 30), "b.png": (24, 20), "../a.png": (40, 30), "missing.png": (40, 30)}
_half = st.integers(-2, 40).map(lambda v: v / 2)  # halves: exact in float32 and in JSON


def _often(good, *bad, weight=3):
    """`good` `weight` times as often as each of `bad` (st.one_of would merge repeats)."""
    choices = [good] * weight + list(bad)
    return st.sampled_from(range(len(choices))).flatmap(lambda i: choices[i])


_coco_image = st.fixed_dictionaries({
    "id": st.integers(1, 3),
    "file_name": _often(st.sampled_from(["a.png", "b.png"]),
                        st.sampled_from(["../a.png", "missing.png"])),
    "error": _often(st.just(""), st.sampled_from(["wider", "no height"]))})
_coco_ann = st.fixed_dictionaries({
    # Which image and category, by position in their lists (None: an id not in the file).
    "image": _often(st.integers(0, 3), st.none(), weight=8),
    "category": _often(st.integers(0, 3), st.none(), weight=8),
    "bbox": _often(st.lists(_half, min_size=4, max_size=4),
                   st.lists(_half, max_size=5), st.just("12"), weight=12),  # not 4 numbers
    "iscrowd": _often(st.just(0), st.just(1), weight=8)})


def _coco_oracle(images, annotations, categories):
    """What load_coco(skip_bad=True) must return for this document, worked from COCO's rules:
    None where the document is refused (duplicate ids, an image without a positive size, no
    categories, no usable image), else (class names, [(file, image id, width, height, xyxy boxes,
    class indices)], number of skipped entries)."""
    ids = [c["id"] for c in categories]
    if not ids or len(set(ids)) < len(ids) or len({i["id"] for i in images}) < len(images):
        return None
    if any(w <= 0 or h <= 0 for w, h in ((i["width"], i["height"]) for i in images)):
        return None
    order = sorted(ids)
    entry = {i["id"]: i for i in images}
    kept, bad = {i["id"]: [] for i in images}, 0
    for a in annotations:
        img = entry.get(a["image_id"])
        bbox = a["bbox"]
        if img is None or a["category_id"] not in order:
            bad += 1
        elif not (isinstance(bbox, list) and len(bbox) == 4):
            bad += 1
        elif a["iscrowd"]:
            continue  # an "ignore" region: neither an object nor a problem
        elif bbox[2] <= 0 or bbox[3] <= 0:
            bad += 1
        else:
            x, y, w, h = bbox  # COCO: top-left corner and size, in pixels
            xyxy = [x, y, x + w, y + h]
            if x < -0.5 or y < -0.5 or x + w > img["width"] + 0.5 or y + h > img["height"] + 0.5:
                bad += 1
            else:
                kept[img["id"]].append((xyxy, order.index(a["category_id"])))
    examples = []
    for img in images:
        if img["file_name"] in ("../a.png", "missing.png") or (
                (img["width"], img["height"]) != _SIZES[img["file_name"]]):
            bad += 1  # leaves images/, does not exist, or is not the size the file says
            continue
        boxes = kept[img["id"]]
        examples.append((img["file_name"], img["id"], img["width"], img["height"],
                         [b for b, _ in boxes], [c for _, c in boxes]))
    if not examples:
        return None
    names = {c["id"]: c["name"] for c in categories}
    return [names[i] for i in order], examples, bad


@FUZZ
@given(images=st.lists(_coco_image, min_size=1, max_size=4, unique_by=lambda i: i["id"]),
       annotations=st.lists(_coco_ann, max_size=8),
       category_ids=st.lists(st.integers(1, 4), min_size=1, max_size=3, unique=True))
def test_fuzz_coco_loads_what_the_document_says(tmp_path, images, annotations, category_ids):
    """Duplicate ids are refused whole (tested above); here every id is unique, so each
    document either loads with skip_bad or is refused for a reason the oracle names."""
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "b.png", (24, 20))
    _image(tmp_path / "a.png")
    images = [{"id": i["id"], "file_name": i["file_name"],
               "width": _SIZES[i["file_name"]][0] + (i["error"] == "wider"),
               "height": 0 if i["error"] == "no height" else _SIZES[i["file_name"]][1]}
              for i in images]
    categories = [{"id": c, "name": f"class{c}"} for c in category_ids]
    annotations = [{"id": 100 + k, "image_id": 9 if a["image"] is None else
                    images[a["image"] % len(images)]["id"],
                    "category_id": 9 if a["category"] is None else
                    category_ids[a["category"] % len(category_ids)],
                    "bbox": a["bbox"], "iscrowd": a["iscrowd"]} for k, a in enumerate(annotations)]
    doc = {"images": images, "categories": categories, "annotations": annotations}
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(doc))
    want = _coco_oracle(images, annotations, categories)
    if want is None:
        with pytest.raises(TfkarpaError):
            ann.load_coco(path, tmp_path / "images", skip_bad=True)
        return
    data = ann.load_coco(path, tmp_path / "images", skip_bad=True)
    names, examples, bad = want
    assert data.class_names == names and len(data.skipped) == bad
    assert len(data.examples) == len(examples)
    for got, (file, image_id, width, height, boxes, classes) in zip(data.examples, examples):
        assert got.path == (tmp_path / "images" / file).resolve() and got.image_id == image_id
        assert (got.width, got.height) == (width, height)
        np.testing.assert_array_equal(got.boxes, np.array(boxes, np.float32).reshape(-1, 4))
        assert got.classes.tolist() == classes
    assert data.num_boxes == sum(len(e[4]) for e in examples)


def _yolo_oracle(text, width=40, height=30, classes=2):
    """Each label line of a YOLO file, judged from its text: ("good", xyxy pixel box, class),
    ("bad", ...) for a line that is not `class cx cy w h`, has a class outside 0..classes-1, a
    coordinate outside [0, 1], or a box without area or reaching out of the image; "either"
    where an edge lies within 1e-3 px of the border's 0.5 px slack (float32 and float64 may
    disagree there)."""
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            cls, cx, cy, w, h = int(fields[0]), *(float(v) for v in fields[1:])
        except ValueError:  # not numbers, or not 5 fields
            lines.append(("bad", None, None))
            continue
        values = np.array([cx, cy, w, h])
        if not 0 <= cls < classes or not np.all(np.isfinite(values)) or not np.all(
                (values >= 0) & (values <= 1)):
            lines.append(("bad", None, None))
            continue
        # Relative centre and size -> pixel corners.
        box = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
               (cy + h / 2) * height]
        edges = np.abs(np.array(box) - [-0.5, -0.5, width + 0.5, height + 0.5])
        if edges.min() < 1e-3 or 0 < min(box[2] - box[0], box[3] - box[1]) < 1e-3:
            lines.append(("either", box, cls))
        else:
            lines.append(("good" if _xyxy_inside([box], width, height) else "bad", box, cls))
    return lines


def _check_yolo(tmp_path, text, skip_bad=False):
    """load_yolo on a one-image set whose label file is `text`, against `_yolo_oracle`: with
    skip_bad, the good lines kept and the bad ones listed; without, refused if any is bad."""
    lines = _yolo_oracle(text)
    verdicts = {v for v, _, _ in lines}
    try:
        data = ann.load_yolo(_yolo(tmp_path, [text]), skip_bad=skip_bad)
    except TfkarpaError:
        assert not skip_bad and verdicts & {"bad", "either"}, f"refused good labels: {text!r}"
        return
    assert skip_bad or "bad" not in verdicts, f"loaded a bad label file: {text!r}"
    assert data.class_names == ["circle", "star"] and len(data.examples) == 1
    got = data.examples[0]
    assert (got.width, got.height) == (40, 30) and _xyxy_inside(got.boxes, 40, 30)
    if "either" in verdicts:
        return
    good = [(box, cls) for v, box, cls in lines if v == "good"]
    assert got.classes.tolist() == [cls for _, cls in good]
    np.testing.assert_allclose(got.boxes, np.array([b for b, _ in good]).reshape(-1, 4),
                               atol=1e-3)
    assert len(data.skipped) == len(lines) - len(good)


@FUZZ
@given(text=st.text(alphabet="0123456789 .-e\nxa", max_size=80))
def test_fuzz_yolo_label_lines(tmp_path, text):
    _check_yolo(tmp_path, text)


# Lines that are mostly well formed: corners on a grid of 1/64 of the image (left edge x,
# extent d), written as YOLO's centre and size, k/128 and k/64: exact in binary, so the
# oracle's float64 and the loader's float32 agree at the border. With skip_bad every file
# loads, and the oracle says which lines it keeps.
_corner = st.tuples(_often(st.integers(0, 48), st.just(-1)),
                    _often(st.integers(1, 16), st.just(0), st.integers(17, 64)))


@FUZZ
@given(rows=st.lists(st.tuples(_often(st.integers(0, 1), st.sampled_from([-1, 2])), _corner,
                               _corner), min_size=1, max_size=4),
       skip_bad=st.booleans())
def test_fuzz_yolo_boxes_against_the_format(tmp_path, rows, skip_bad):
    text = "\n".join(f"{cls} {(2 * x + dx) / 128} {(2 * y + dy) / 128} {dx / 64} {dy / 64}"
                     for cls, (x, dx), (y, dy) in rows)
    assert all(v != "either" for v, _, _ in _yolo_oracle(text))  # clear of the border
    _check_yolo(tmp_path, text, skip_bad)


@FUZZ
@given(text=st.text(max_size=120) | st.sampled_from([
    "<annotation><filename>img.png</filename><size><width>40</width><height>30</height>"
    "</size><object><name>a</name><bndbox><xmin>1e9</xmin></bndbox></object></annotation>",
    '<!DOCTYPE a [<!ENTITY x "xx"><!ENTITY y "&x;&x;&x;&x;">]><annotation>&y;</annotation>']))
def test_fuzz_voc_xml(tmp_path, text):
    try:
        data = ann.load_voc(_voc(tmp_path, [], text=text))
    except TfkarpaError:
        return
    # Loaded: the one image, every box inside it, every class index naming a class.
    assert len(data.examples) == 1 and data.class_names
    got = data.examples[0]
    assert _xyxy_inside(got.boxes, got.width, got.height)
    assert np.all((got.classes >= 0) & (got.classes < len(data.class_names)))


@FUZZ
@given(objects=st.lists(st.tuples(st.sampled_from(["cat", "dog", "emu"]),
                                  _often(st.integers(1, 25), st.integers(-2, 45)),
                                  _often(st.integers(1, 20), st.integers(-2, 45)),
                                  _often(st.integers(0, 14), st.integers(-3, 40)),
                                  _often(st.integers(0, 9), st.integers(-3, 40))),
                        min_size=1, max_size=4).map(
    lambda rows: [(n, (x, y, x + dx, y + dy)) for n, x, y, dx, dy in rows]))
def test_fuzz_voc_objects_against_the_format(tmp_path, objects):
    """VOC's 1-based inclusive pixels [xmin, xmax] are the edges [xmin - 1, xmax]: what is kept
    (skip_bad) is each object with area inside the 40x30 image, classes named in sorted order."""
    good = [(name, [x0 - 1, y0 - 1, x1, y1]) for name, (x0, y0, x1, y1) in objects
            if x1 > x0 - 1 and y1 > y0 - 1 and _xyxy_inside([[x0 - 1, y0 - 1, x1, y1]], 40, 30)]
    root = _voc(tmp_path, objects)
    if not good:  # no object left: no class to learn
        with pytest.raises(TfkarpaError, match="no object classes found"):
            ann.load_voc(root, skip_bad=True)
        return
    data = ann.load_voc(root, skip_bad=True)
    names = sorted({name for name, _ in good})
    assert data.class_names == names and len(data.skipped) == len(objects) - len(good)
    np.testing.assert_array_equal(data.examples[0].boxes,
                                  np.array([b for _, b in good], np.float32))
    assert data.examples[0].classes.tolist() == [names.index(n) for n, _ in good]


@FUZZ
@given(boxes=st.lists(st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0.5, 50),
                                st.floats(0.5, 50)), min_size=1, max_size=6))
def test_fuzz_box_conversions_round_trip(boxes):
    xywh = np.array(boxes, np.float32)
    xyxy = ann.convert_boxes(xywh, "xywh", "xyxy")
    # By hand: corners (x, y) and (x + w, y + h); the centre is the corner plus half the size.
    x, y, w, h = xywh.T
    np.testing.assert_allclose(xyxy, np.stack([x, y, x + w, y + h], -1), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ann.convert_boxes(xywh, "xywh", "center_xywh"),
                               np.stack([x + w / 2, y + h / 2, w, h], -1), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ann.convert_boxes(xyxy, "xyxy", "xywh"), xywh, rtol=1e-5, atol=1e-3)
    centre = ann.convert_boxes(xyxy, "xyxy", "center_xywh")
    np.testing.assert_allclose(ann.convert_boxes(centre, "center_xywh", "xyxy"), xyxy,
                               rtol=1e-5, atol=1e-3)

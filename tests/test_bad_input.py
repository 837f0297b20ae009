"""The bad-input table: what every command answers to broken files, annotations, configs, paths
and artifacts. Each row runs the real command in this process and checks three things: exit
status 1 (or 0 with a counted skip where the user asked for skipping), a message that names the
file, line, key or path and what is wrong, and nothing written into the working directory.
"""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from pipelines.__main__ import main

DETECT = ["task=detect", "model=yolov8_xs", "data.image_size=32", "epochs=1", "batch_size=2"]
SEGMENT = ["task=segment", "model=mask_rcnn_resnet18", "data.image_size=32", "epochs=1",
           "batch_size=2"]


def _png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _huge_png(path, side=60_000):
    """A valid PNG header that claims side x side pixels (3.6 gigapixels) over a few bytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def _coco(root, name, edit=None, text=None):
    """root/name.json over images root/{a,b}.png beside it; `edit(doc)` breaks it."""
    for image in ("a.png", "b.png"):
        if not (root / image).exists():
            _png(root / image, np.full((30, 40, 3), 120, np.uint8))
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                      {"id": 2, "file_name": "b.png", "width": 40, "height": 30}],
           "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 5]},
                           {"id": 11, "image_id": 2, "category_id": 2, "bbox": [5, 5, 9, 9]}],
           "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "star"}]}
    if edit:
        edit(doc)
    path = root / f"{name}.json"
    path.write_text(text if text is not None else json.dumps(doc))
    return f"coco:{path}"


def _voc(root, name, xml):
    folder = root / f"voc_{name}"
    _png(folder / "JPEGImages" / "img.png", np.full((30, 40, 3), 90, np.uint8))
    (folder / "Annotations").mkdir(parents=True, exist_ok=True)
    (folder / "Annotations" / "img.xml").write_text(xml)
    return f"voc:{folder}"


def _voc_xml(objects="<object><name>dog</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax>"
             "<ymax>20</ymax></bndbox></object>", filename="img.png"):
    return (f"<annotation><filename>{filename}</filename><size><width>40</width><height>30"
            f"</height><depth>3</depth></size>{objects}</annotation>")


def _yolo(root, name, line, names="circle\nstar\n"):
    folder = root / f"yolo_{name}"
    _png(folder / "images" / "a.png", np.full((30, 40, 3), 60, np.uint8))
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    (folder / "labels" / "a.txt").write_text(line + "\n")
    if names is not None:
        (folder / "classes.txt").write_text(names)
    return f"yolo:{folder}"


def _folder_with(root, name, bad_name, content):
    folder = write_image_folder(root / f"folder_{name}", per_class=4)
    path = folder / "dog" / bad_name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return folder


def _valid_png_bytes():
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, trained_run):
    """Every bad input, made once: {name: value to put on the command line}."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = _valid_png_bytes()
    made = {"run": trained_run["run_dir"]}
    # Images in a class folder
    made["corrupt_jpeg"] = _folder_with(root, "corrupt", "x.jpg", b"\xff\xd8\xff\xe0garbage" * 5)
    made["truncated_png"] = _folder_with(root, "truncated", "cut.png", good[: len(good) // 2])
    made["zero_byte"] = _folder_with(root, "empty", "empty.png", b"")
    made["text_as_png"] = _folder_with(root, "text", "notes.png", b"just some text\n")
    made["huge_png"] = _folder_with(root, "huge", "huge.png", _huge_png)
    mixed = write_image_folder(root / "folder_mixed", per_class=4)
    Image.fromarray(np.full((20, 20), 50, np.uint8), "L").save(mixed / "cat" / "gray.png")
    Image.fromarray(np.full((20, 20, 4), 50, np.uint8), "RGBA").save(mixed / "cat" / "rgba.png")
    Image.fromarray(np.full((20, 20), 4000, np.uint16)).save(mixed / "dog" / "deep.png")
    Image.fromarray(np.full((20, 20, 3), 70, np.uint8)).convert("P").save(mixed / "dog" / "pal.png")
    made["mixed_modes"] = mixed
    made["one_class"] = write_image_folder(root / "folder_one", classes=("cat",), per_class=4)
    made["class_newline"] = write_image_folder(root / "folder_newline", classes=("cat", "do\ng"),
                                               per_class=4)
    # COCO
    made["coco_syntax"] = _coco(root, "syntax", text='{"images": [\n  {"id": 1,,}\n]}')
    made["coco_no_images"] = _coco(root, "no_images", lambda d: d.pop("images"))
    made["coco_no_categories"] = _coco(root, "no_categories", lambda d: d.pop("categories"))
    made["coco_unknown_category"] = _coco(
        root, "unknown_cat", lambda d: d["annotations"][0].update(category_id=7))
    made["coco_duplicate_image"] = _coco(
        root, "dup_image", lambda d: d["images"][1].update(id=1))
    made["coco_duplicate_annotation"] = _coco(
        root, "dup_ann", lambda d: d["annotations"][1].update(id=10))
    made["coco_negative_box"] = _coco(
        root, "negative", lambda d: d["annotations"][0].update(bbox=[2, 3, -10, 5]))
    made["coco_outside_box"] = _coco(
        root, "outside", lambda d: d["annotations"][0].update(bbox=[30, 3, 30, 5]))
    made["coco_short_bbox"] = _coco(
        root, "short_bbox", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))
    made["coco_missing_image"] = _coco(
        root, "missing_image", lambda d: d["images"][0].update(file_name="gone.png"))
    made["coco_escape"] = _coco(
        root, "escape", lambda d: d["images"][0].update(file_name="../../etc/passwd"))
    made["coco_unknown_image"] = _coco(
        root, "unknown_image", lambda d: d["annotations"][0].update(image_id=99))
    made["coco_newline_name"] = _coco(
        root, "newline_name", lambda d: d["categories"][0].update(name="cir\ncle"))
    made["coco_blank_name"] = _coco(
        root, "blank_name", lambda d: d["categories"][1].update(name=" "))
    # COCO instance masks (task=segment)
    def masked(edit):
        def apply(d):
            for ann in d["annotations"]:
                x, y, w, h = ann["bbox"]
                ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            edit(d["annotations"][0])
        return apply

    made["mask_missing"] = _coco(root, "mask_missing", masked(lambda a: a.pop("segmentation")))
    made["mask_outside"] = _coco(root, "mask_outside", masked(
        lambda a: a.update(segmentation=[[2, 3, 90, 3, 12, 8]])))
    made["mask_odd_polygon"] = _coco(root, "mask_odd", masked(
        lambda a: a.update(segmentation=[[2, 3, 12, 3, 12]])))
    made["mask_empty"] = _coco(root, "mask_empty", masked(
        lambda a: a.update(segmentation=[[2, 3, 2, 3, 2, 3]])))
    made["mask_rle_size"] = _coco(root, "mask_rle_size", masked(
        lambda a: a.update(segmentation={"size": [40, 30], "counts": [1200]})))
    made["mask_rle_counts"] = _coco(root, "mask_rle_counts", masked(
        lambda a: a.update(segmentation={"size": [30, 40], "counts": "zz!!"})))
    made["mask_rle_unicode"] = _coco(root, "mask_rle_unicode", masked(
        lambda a: a.update(segmentation={"size": [30, 40], "counts": "0\u00e9\u2603?"})))
    # VOC
    made["voc_malformed"] = _voc(root, "malformed", "<annotation><object><name>dog</name>")
    made["voc_no_bndbox"] = _voc(root, "no_bndbox", _voc_xml("<object><name>dog</name></object>"))
    made["voc_inverted"] = _voc(root, "inverted", _voc_xml(
        "<object><name>dog</name><bndbox><xmin>20</xmin><ymin>2</ymin><xmax>5</xmax>"
        "<ymax>20</ymax></bndbox></object>"))
    made["voc_escape"] = _voc(root, "escape", _voc_xml(filename="../../../etc/hostname"))
    # YOLO
    made["yolo_few_fields"] = _yolo(root, "few", "0 0.5 0.5 0.2")
    made["yolo_class_range"] = _yolo(root, "range", "5 0.5 0.5 0.2 0.2")
    made["yolo_not_number"] = _yolo(root, "nan", "0 half 0.5 0.2 0.2")
    made["yolo_outside"] = _yolo(root, "outside", "0 0.5 0.5 1.5 0.2")
    made["yolo_no_names"] = _yolo(root, "no_names", "0 0.5 0.5 0.2 0.2", names=None)
    # Configs and paths
    (root / "bad.yaml").write_text("epochs: 3\ndata:\n  source: shapes\n   count: 10\n")
    (root / "list.yaml").write_text("- epochs\n- 3\n")
    (root / "a_file").write_text("not a directory\n")
    made["root"] = root
    # Artifacts that are not what they claim
    (root / "fake.tflite").write_bytes(b"this is not a flatbuffer" * 10)
    (root / "empty.tflite").write_bytes(b"")
    (root / "not_saved_model").mkdir()
    (root / "not_saved_model" / "saved_model.pb").write_bytes(b"\x00\x01garbage")
    (root / "photo.png").write_bytes(good)
    _huge_png(root / "huge_photo.png")
    _damaged_artifacts(root, made, trained_run)
    return made


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _damaged_artifacts(root, made, trained_run):
    """A finished run whose weights are cut short, a SavedModel whose variables are, and a
    TFRecord directory with a shard cut in half (test_damaged_files.py has every kind)."""
    import shutil

    from tfkarpa import config
    from tfkarpa.data import sources, tfrecord

    run = root / "run_cut_weights"
    shutil.copytree(trained_run["run_dir"], run, ignore=shutil.ignore_patterns("eval", "logs"))
    _cut(run / "checkpoints" / "final.weights.h5")
    made["run_cut_weights"] = run
    saved = root / "saved_model_cut"
    shutil.copytree(trained_run["artifacts"]["saved_model"], saved)
    _cut(saved / "variables" / "variables.data-00000-of-00001")
    made["saved_model_cut"] = saved
    data = sources.load(config.build([], ["data=shapes", "data.count=60",
                                          "data.image_size=16"]).data, 0)
    tfrecord.convert(data, root / "tfrecord_cut", shards=2, progress=lambda line: None)
    _cut(root / "tfrecord_cut" / "train-00000-of-00002.tfrecord")
    made["tfrecord_cut"] = root / "tfrecord_cut"


def _folder(key):
    return lambda m: ["data", "convert", f"folder:{m[key]}", f"out={m['root']}/out_{key}"]


def _train(data_key, *extra):
    return lambda m: ["train", f"data={m[data_key]}", *DETECT, *extra]


def _segment(data_key):
    return lambda m: ["train", f"data={m[data_key]}", *SEGMENT]


# (row id, argv from the inputs, exit status, fragments the message must hold). A COCO run that
# skips a bad annotation and trains on is in test_detection.py.
TABLE = [
    # -- images
    ("corrupt jpeg", _folder("corrupt_jpeg"), 1, ["x.jpg", "not a readable image"]),
    ("truncated png", _folder("truncated_png"), 1, ["cut.png", "not a readable image"]),
    ("zero-byte file", _folder("zero_byte"), 1, ["empty.png", "empty"]),
    ("text named .png", _folder("text_as_png"), 1, ["notes.png", "not a readable image"]),
    ("huge image", _folder("huge_png"), 1, ["huge.png", "pixels"]),
    ("corrupt jpeg, skip_bad", lambda m: [*_folder("corrupt_jpeg")(m), "data.skip_bad=true"],
     0, ["skipped_files              1", "x.jpg"]),
    ("gray, RGBA, 16-bit, palette", _folder("mixed_modes"), 0, []),
    ("one class folder", _folder("one_class"), 1, ["found 1 class sub-folder", "at least 2 classes"]),
    ("class folder name with a newline", _folder("class_newline"), 1,
     ["do\\ng", "line break", "labels.txt", "rename the folder"]),
    ("folder missing", lambda m: ["data", "convert", "folder:/no/such/folder",
                                  f"out={m['root']}/o"], 1, ["/no/such/folder"]),
    # -- COCO
    ("coco syntax", _train("coco_syntax"), 1, ["syntax.json", "line 2"]),
    ("coco no images", _train("coco_no_images"), 1, ["no_images.json", "images"]),
    ("coco no categories", _train("coco_no_categories"), 1, ["no_categories.json", "categories"]),
    ("coco unknown category", _train("coco_unknown_category"), 1, ["unknown_cat.json", "10", "7"]),
    ("coco duplicate image id", _train("coco_duplicate_image"), 1, ["dup_image.json", "1"]),
    ("coco duplicate annotation id", _train("coco_duplicate_annotation"), 1,
     ["dup_ann.json", "10"]),
    ("coco negative box", _train("coco_negative_box"), 1, ["negative.json", "annotation id 10"]),
    ("coco box outside image", _train("coco_outside_box"), 1, ["outside.json", "annotation id 10"]),
    ("coco bbox of 3 numbers", _train("coco_short_bbox"), 1, ["short_bbox.json", "annotation id 10"]),
    ("coco image file missing", _train("coco_missing_image"), 1, ["gone.png"]),
    ("coco path escape", _train("coco_escape"), 1, ["escape.json", "leaves the data directory"]),
    ("coco unknown image id", _train("coco_unknown_image"), 1, ["unknown_image.json", "99"]),
    ("coco category name with a newline", _train("coco_newline_name"), 1,
     ["newline_name.json", "cir\\ncle", "line break"]),
    ("coco blank category name", _train("coco_blank_name"), 1,
     ["blank_name.json", "empty or blank"]),
    # -- VOC
    ("coco mask missing", _segment("mask_missing"), 1,
     ["mask_missing.json", "annotation id 10", "no 'segmentation'"]),
    ("coco polygon outside image", _segment("mask_outside"), 1,
     ["mask_outside.json", "annotation id 10", "outside the 40x30 image"]),
    ("coco polygon odd count", _segment("mask_odd_polygon"), 1,
     ["mask_odd.json", "annotation id 10", "even count"]),
    ("coco empty mask", _segment("mask_empty"), 1,
     ["mask_empty.json", "annotation id 10", "empty (0 pixels)"]),
    ("coco rle wrong size", _segment("mask_rle_size"), 1,
     ["mask_rle_size.json", "annotation id 10", "is not the image's [30, 40]"]),
    ("coco rle bad counts", _segment("mask_rle_counts"), 1,
     ["mask_rle_counts.json", "annotation id 10", "do not describe a 30x40 mask"]),
    ("coco rle non-ascii counts", _segment("mask_rle_unicode"), 1,
     ["mask_rle_unicode.json", "annotation id 10", "non-ASCII"]),
    ("masks from voc", lambda m: ["train", f"data={m['voc_inverted']}", *SEGMENT], 1,
     ["instance masks come from shapes or coco"]),
    ("voc malformed xml", _train("voc_malformed"), 1, ["img.xml"]),
    ("voc object without box", _train("voc_no_bndbox"), 1, ["img.xml", "bndbox"]),
    ("voc inverted box", _train("voc_inverted"), 1, ["img.xml"]),
    ("voc path escape", _train("voc_escape"), 1, ["img.xml", "leaves the data directory"]),
    # -- YOLO
    ("yolo too few fields", _train("yolo_few_fields"), 1, ["a.txt", "line 1"]),
    ("yolo class out of range", _train("yolo_class_range"), 1, ["a.txt", "line 1"]),
    ("yolo not a number", _train("yolo_not_number"), 1, ["a.txt", "line 1"]),
    ("yolo box outside", _train("yolo_outside"), 1, ["a.txt", "line 1"]),
    ("yolo no class names", _train("yolo_no_names"), 1, ["classes.txt"]),
    # -- configs
    ("unknown key", lambda m: ["train", "epohcs=2"], 1, ["epohcs", "did you mean 'epochs'"]),
    ("wrong type", lambda m: ["train", "epochs=many"], 1, ["epochs", "many"]),
    ("negative size", lambda m: ["train", "data.image_size=-32"], 1, ["data.image_size"]),
    ("1 px classifier", lambda m: ["train", "data.image_size=1"], 1,
     ["data.image_size", "too small", "at least 8"]),
    ("16 px detector", lambda m: ["train", *DETECT, "data.image_size=16"], 1,
     ["data.image_size", "task=detect", "at least 32"]),
    ("8 px contrastive views", lambda m: ["pretrain", "data.image_size=8"], 1,
     ["data.image_size", "task=pretrain", "at least 16"]),
    ("zero batch", lambda m: ["train", "batch_size=0"], 1, ["batch_size"]),
    ("bad yaml", lambda m: ["train", "--config", str(m["root"] / "bad.yaml")], 1,
     ["bad.yaml", "line 4"]),
    ("yaml not a mapping", lambda m: ["train", "--config", str(m["root"] / "list.yaml")], 1,
     ["list.yaml"]),
    ("config file missing", lambda m: ["train", "--config", "/no/such.yaml"], 1,
     ["/no/such.yaml"]),
    ("unknown recipe", lambda m: ["train", "no_such_recipe"], 1, ["unknown recipe"]),
    ("unknown model", lambda m: ["train", "model=resnet9000"], 1, ["resnet9000"]),
    ("unknown mix", lambda m: ["train", "data.mix=mixdown"], 1, ["data.mix", "mixdown"]),
    ("mix alpha 0", lambda m: ["train", "data.mix=cutmix:0"], 1, ["data.mix", "ALPHA > 0"]),
    ("mix on a detector", lambda m: ["train", "task=detect", "data.mix=mixup"], 1,
     ["data.mix", "task=detect"]),
    ("mix in pretraining", lambda m: ["pretrain", "data.mix=mixup"], 1, ["data.mix"]),
    ("drop_path on small_cnn", lambda m: ["train", "model.drop_path=0.2"], 1,
     ["model.drop_path", "small_cnn"]),
    ("adversarial eps 0", lambda m: ["train", "adversarial=pgd", "adversarial.eps=0"], 1,
     ["adversarial.eps", "(0, 1]"]),
    ("adversarial on a detector", lambda m: ["train", "task=detect", "adversarial=pgd"], 1,
     ["adversarial training", "task=detect"]),
    ("adversarial with a teacher", lambda m: ["train", "adversarial=trades",
                                              f"distill.teacher={m['run']}"], 1,
     ["distill.teacher", "choose one"]),
    ("drop_path of 1", lambda m: ["train", "model=resnet", "model.drop_path=1"], 1,
     ["model.drop_path", "[0, 1)"]),
    ("head the data lacks", lambda m: ["train", "task=multitask", "heads=class,texture"], 1,
     ["heads", "no head 'texture'", "colour"]),
    ("head weight 0", lambda m: ["train", "task=multitask", "heads=class:0"], 1,
     ["heads", "class:0"]),
    ("multitask on digits", lambda m: ["train", "task=multitask", "data=digits"], 1,
     ["data.source", "shapes or csv:FILE"]),
    ("multitask with mixup", lambda m: ["train", "task=multitask", "data.mix=mixup"], 1,
     ["data.mix", "task=multitask"]),
    ("heads on a classifier", lambda m: ["train", "heads=class,size"], 1,
     ["heads", "task=multitask", "task=classify"]),
    ("multitask on two replicas", lambda m: ["train", "task=multitask", "strategy=mirrored",
                                             "devices=/cpu:0,/cpu:1"], 1,
     ["strategy", "one device", "mirrored"]),
    ("head that collides", lambda m: ["train", "task=multitask", "heads=class,class_score"], 1,
     ["heads", "class_score", "collide"]),
    # -- paths
    ("run_dir under a file", lambda m: ["train", f"run_dir={m['root']}/a_file/run"], 1,
     ["a_file", "not a directory"]),
    ("export out under a file", lambda m: ["export", m["run"], f"out={m['root']}/a_file/x"], 1,
     ["a_file", "not a directory"]),
    ("evaluate missing path", lambda m: ["evaluate", "/no/such/run"], 1, ["/no/such/run"]),
    ("predict missing image", lambda m: ["predict", m["run"], "/no/such/photo.png"], 1,
     ["/no/such/photo.png"]),
    ("predict a huge image", lambda m: ["predict", m["run"], f"{m['root']}/huge_photo.png"], 1,
     ["huge_photo.png", "too large to decode safely"]),
    ("report out under a file", lambda m: ["report", m["run"], f"out={m['root']}/a_file/r"], 1,
     ["a_file", "not a directory"]),
    # -- artifacts
    ("tflite that is not one", lambda m: ["evaluate", f"{m['root']}/fake.tflite"], 1,
     ["fake.tflite"]),
    ("empty tflite", lambda m: ["predict", f"{m['root']}/empty.tflite",
                                f"{m['root']}/photo.png"], 1, ["empty.tflite"]),
    ("saved_model.pb of garbage", lambda m: ["predict", f"{m['root']}/not_saved_model",
                                             f"{m['root']}/photo.png"], 1, ["not_saved_model"]),
    ("compress unfinished run", lambda m: ["compress", str(m["root"]), "qat=true"], 1,
     ["not a run directory"]),
    ("finetune labels=0%", lambda m: ["finetune", f"from={m['run']}", "labels=0%"], 1,
     ["labels"]),
    ("unknown quantize mode", lambda m: ["export", m["run"], "quantize=int4"], 1, ["int4"]),
    ("run weights cut short", lambda m: ["evaluate", str(m["run_cut_weights"])], 1,
     ["run_cut_weights/checkpoints/final.weights.h5", "does not load"]),
    ("savedmodel variables cut short", lambda m: ["predict", str(m["saved_model_cut"]),
                                                  f"{m['root']}/photo.png"], 1,
     ["saved_model_cut", "not a loadable SavedModel"]),
    ("tfrecord shard cut in half", lambda m: ["train", f"data=tfrecord:{m['tfrecord_cut']}",
                                              "epochs=1"], 1,
     ["train-00000-of-00002.tfrecord", "cut short"]),
]


def _files(directory: Path) -> set:
    return {p.relative_to(directory) for p in directory.rglob("*")}


@pytest.mark.parametrize("argv, status, fragments", [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_bad_input_table(inputs, argv, status, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = _files(inputs["root"])
    args = argv(inputs)
    code = main([*args, "--quiet"])
    out, err = capsys.readouterr()
    assert code == status, err
    said = err if status else out  # errors on stderr; a counted skip in the summary
    for fragment in fragments:
        assert fragment in said, f"{fragment!r} not in {said!r}"
    if status:
        assert err.startswith("error: ") and err.count("\n") == 1  # one line
        assert _files(inputs["root"]) == before  # nothing written beside the inputs
    assert not [p for p in tmp_path.rglob("*") if status or p.name.startswith(".")]


def test_the_table_is_big_enough():
    assert len(TABLE) >= 40


def test_nothing_loads_code_from_data_or_model_files():
    """The loading rules README.md states, kept true: no pickle, no unsafe YAML, no eval, and no
    whole Keras model files (only weights go into architectures built from tfkarpa's code)."""
    import re

    root = Path(__file__).resolve().parents[1]
    banned = re.compile(r"\bimport pickle\b|\bpickle\.|allow_pickle\s*=\s*True|yaml\.load\(|"
                        r"yaml\.unsafe_load|\beval\(|\bexec\(|keras\.models\.load_model|"
                        r"safe_mode\s*=\s*False|marshal\.loads")
    # The one reviewed exception: the restricted reader of PyTorch checkpoints, whose
    # `find_class` admits only tensor names (tests/test_efficientnet_lite.py shows it refusing
    # a file that names os.system).
    reviewed = {"tfkarpa/models/legacy_torch.py": ["import pickle  # the reviewed exception: "
                                                   "see the module docstring and "
                                                   "`_Reader.find_class`",
                                                   "class _Reader(pickle.Unpickler):",
                                                   "except (pickle.UnpicklingError, EOFError, "
                                                   "KeyError, ValueError, TypeError) as err:"]}
    found = [f"{path.relative_to(root)}:{n}: {line.strip()}"
             for folder in ("tfkarpa", "pipelines")
             for path in sorted((root / folder).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if banned.search(line) and not line.lstrip().startswith("#")
             and line.strip() not in reviewed.get(str(path.relative_to(root)), [])]
    assert found == []


def _wide_yolo(root):
    """A YOLO folder: ten ordinary 40x30 images and one 5000x50 image whose 10x10 px box is
    0.06 px wide once letterboxed to 32 px (Harm 9 of issue 32)."""
    folder = root / "yolo_wide"
    for i in range(10):
        _png(folder / "images" / f"n{i}.png", np.full((30, 40, 3), 60 + i, np.uint8))
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        (folder / "labels" / f"n{i}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    _png(folder / "images" / "wide.png", np.full((50, 5000, 3), 90, np.uint8))
    (folder / "labels" / "wide.txt").write_text("0 0.5 0.5 0.002 0.2\n1 0.5 0.5 0.5 0.6\n")
    (folder / "classes.txt").write_text("circle\nstar\n")
    return folder


def test_boxes_under_a_pixel_after_letterboxing_are_counted_and_dropped(tmp_path):
    import tensorflow as tf

    from tfkarpa import config
    from tfkarpa.data import detection as det_data

    folder = _wide_yolo(tmp_path)
    data = det_data.load(config.build([], [f"data=yolo:{folder}"]).data, 0)
    tiny = det_data.tiny_boxes(data, 32)
    # Both boxes of the 5000x50 image: at 32/5000 its 50 px height is 0.32 px.
    assert sum(tiny["count"].values()) == 2 and tiny["min_side_px"] == 1.0
    assert "wide.png: box 0" in tiny["examples"][0] and "data.image_size=32" in tiny["examples"][0]
    boxes = tf.constant([[2, 2, 12, 12], [0, 0, 40, 30]], tf.float32)  # a 40x30 image's boxes
    assert det_data.seen_boxes(boxes, 0.25).numpy().tolist() == [True, True]  # 2.5 px: kept
    assert det_data.seen_boxes(boxes, 0.05).numpy().tolist() == [False, True]  # 0.5 px; 1.5
    assert det_data.seen_boxes(boxes, 0.03).numpy().tolist() == [False, False]
    assert det_data.tiny_boxes(data, 4096)["count"] == {"train": 0, "val": 0, "test": 0}
    # The detect task's check, which runs before the manifest is written, puts them there.
    from tfkarpa import tasks

    cfg = config.build([], [f"data=yolo:{folder}", *DETECT])
    tasks.get("detect").check(cfg, data)
    assert data.summary()["tiny_boxes_dropped"] == tiny


@pytest.mark.slow  # builds and compiles a detector before its manifest is written
@pytest.mark.timeout(300)  # a minute on 2 shared cores: keras-cv's YOLOv8 and its compile
def test_a_run_logs_and_records_the_dropped_boxes(tmp_path, monkeypatch, capsys, caplog):
    """The count reaches the log and manifest.json; stopped right after the manifest is written
    (training itself is test_detection's)."""
    from tfkarpa.core import fit

    monkeypatch.chdir(tmp_path)
    folder = _wide_yolo(tmp_path)
    seen = {}

    def record_then_stop(cfg, cfg_dict, data, run_, *args):
        real_record_start(cfg, cfg_dict, data, run_, *args)
        seen.update(json.loads((run_.dir / "manifest.json").read_text()))
        raise KeyboardInterrupt

    real_record_start = fit.record_start
    monkeypatch.setattr(fit, "record_start", record_then_stop)
    assert main(["train", f"data=yolo:{folder}", *DETECT, f"runs_root={tmp_path / 'runs'}",
                 "export=false", "--quiet"]) == 130
    assert "2 box(es) are under 1 px at data.image_size=32" in caplog.text
    assert "wide.png" in caplog.text
    dropped = seen["data"]["tiny_boxes_dropped"]
    assert sum(dropped["count"].values()) == 2 and "wide.png: box 0" in dropped["examples"][0]


def test_a_tfds_data_set_is_prepared_from_its_download(tmp_path):
    """The path that downloads and prepares a TFDS data set, run against a file served on
    127.0.0.1 (tests never reach the network): it needs `importlib_resources`, which TFDS
    imports there but does not declare (Harm 8 of issue 32; pinned in setup.cfg)."""
    import functools
    import http.server
    import threading

    import tensorflow_datasets as tfds

    from tfkarpa import config
    from tfkarpa.data import sources

    served, asked = tmp_path / "served", []
    served.mkdir()
    rng = np.random.default_rng(0)
    np.savez(served / "tiny.npz", images=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8),
             labels=np.arange(12) % 2)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            asked.append(self.path)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tiny.npz"

    class TfkarpaLocalTiny(tfds.core.GeneratorBasedBuilder):
        """Two classes of 8x8 images, downloaded as one .npz file."""

        VERSION = tfds.core.Version("1.0.0")
        # A module inside a package: TFDS then finds the builder's code path through
        # importlib_resources, the import a clean install lacked.
        __module__ = "tfkarpa.data.local_test_builder"

        def _info(self):
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(8, 8, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b"])}))

        def _split_generators(self, dl_manager):
            path = dl_manager.download(url)
            return {"train": self._generate_examples(path, range(8)),
                    "test": self._generate_examples(path, range(8, 12))}

        def _generate_examples(self, path, rows):
            with np.load(path) as f:
                images, labels = f["images"], f["labels"]
            for i in rows:
                yield i, {"image": images[i], "label": int(labels[i])}

    try:
        data = sources.load(config.build([], [
            "data=tfds:tfkarpa_local_tiny", f"data.data_dir={tmp_path / 'tfds'}",
            "data.image_size=8"]).data, 0)
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["/tiny.npz"]  # downloaded once, from the local server
    assert data.class_names == ["a", "b"]
    assert sum(1 for _ in data.splits["test"].make()) == 4

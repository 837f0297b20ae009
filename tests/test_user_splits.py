"""A user's own data as they have it: splits already made (separate COCO files, Ultralytics'
data.yaml, VOC's ImageSets, train/val/test folders) are used as given; settings left at auto
are chosen from the data; every image of a source can be scored (`split=all`)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfkarpa import config
from tfkarpa.core import auto
from tfkarpa.data import detection as dd
from tfkarpa.data import sources
from tfkarpa.data.splits import Split
from tfkarpa.errors import TfkarpaError

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
import textured  # noqa: E402


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """The textured set: train.json (24), val.json (10), test.json (6), ids not 1..N."""
    root = tmp_path_factory.mktemp("textured")
    return root, textured.write(root, train=24, val=10, test=6, classes=2, seed=3)


def det(*extra):
    return config.build(overrides=["task=detect", *extra]).data


def test_coco_val_and_test_files_are_used_as_given(coco_set):
    root, files = coco_set
    data = dd.load(det(f"data=coco:{files['train']}", f"data.val={files['val']}",
                       f"data.test=coco:{files['test']}"))
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 24, "val": 10,
                                                                   "test": 6}
    assert data.given_splits and data.category_ids == [3, 7]
    val = json.loads(files["val"].read_text())
    assert [t.image_id for t in data.splits["val"].truth] == [i["id"] for i in val["images"]]
    # Without a test file the validation file is the test set, and "all" counts it once.
    data = dd.load(det(f"data=coco:{files['train']}", f"data.val={files['val']}"))
    assert data.splits["test"] is data.splits["val"]
    assert data.split("all").num_examples == 34


def _as_shipped(coco_set, root: Path) -> Path:
    """The textured set in COCO's own layout: annotations/instances_{train,val}.json with bare
    file names, images in train/ and val/."""
    source, files = coco_set
    for split in ("train", "val"):
        doc = json.loads(files[split].read_text())
        (root / split).mkdir(parents=True)
        for img in doc["images"]:
            name = Path(img["file_name"]).name
            (root / split / name).write_bytes((source / img["file_name"]).read_bytes())
            img["file_name"] = name
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def test_coco_as_it_ships_each_file_finds_its_own_images(coco_set, tmp_path):
    """Issue 33: with data.images=TRAIN the validation images were looked for in TRAIN and
    refused as missing; with one folder of symlinks to both, every image was refused as
    leaving the data directory."""
    root = _as_shipped(coco_set, tmp_path / "aerial")
    ann = root / "annotations"
    for extra in ([], [f"data.images={root / 'train'}"]):
        data = dd.load(det(f"data=coco:{ann / 'instances_train.json'}",
                           f"data.val={ann / 'instances_val.json'}", *extra))
        assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 24, "val": 10,
                                                                       "test": 10}
        assert {Path(t.name).parent for t in data.splits["val"].truth} == {root / "val"}
        assert {Path(t.name).parent for t in data.splits["train"].truth} == {root / "train"}
    # The user's own folder of symlinks to both is their data; a path climbing out is not.
    links = root / "all"
    links.mkdir()
    for split in ("train", "val"):
        for image in (root / split).iterdir():
            (links / image.name).symlink_to(image)
    data = dd.load(det(f"data=coco:{ann / 'instances_train.json'}", f"data.images={links}",
                       f"data.val={ann / 'instances_val.json'}", f"data.val_images={links}"))
    assert data.splits["val"].num_examples == 10
    doc = json.loads((ann / "instances_val.json").read_text())
    doc["images"][0]["file_name"] = "../train/" + doc["images"][0]["file_name"]
    (ann / "instances_val.json").write_text(json.dumps(doc))
    with pytest.raises(TfkarpaError, match=r"instances_val.json: 1 bad annotation.*'\.\./train/val_0000"
                                           r"\.jpg' leaves the data directory .*aerial/val'"):
        dd.load(det(f"data=coco:{ann / 'instances_train.json'}",
                    f"data.val={ann / 'instances_val.json'}"))


def test_a_coco_folder_brings_its_splits(coco_set, tmp_path):
    """`coco:DIR`: the split files a COCO folder ships are found and used as given; without a
    validation file it is carved from train, with the given test file kept; ambiguity and a
    folder without a training file are refused by name."""
    root = _as_shipped(coco_set, tmp_path / "shipped")
    data = dd.load(det(f"data=coco:{root}"))
    assert data.given_splits
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 24, "val": 10,
                                                                   "test": 10}
    assert {Path(t.name).parent for t in data.splits["val"].truth} == {root / "val"}
    # train + test only (the validation file renamed to test): val carved from train, seeded.
    (root / "annotations" / "instances_val.json").rename(root / "annotations" / "instances_test.json")
    (root / "val").rename(root / "test")
    data = dd.load(det(f"data=coco:{root}", "data.val_fraction=0.25"))
    sizes = {k: s.num_examples for k, s in data.splits.items()}
    assert sizes == {"train": 18, "val": 6, "test": 10}
    train = {t.name for t in data.splits["train"].truth}
    val = {t.name for t in data.splits["val"].truth}
    assert not train & val and {Path(n).parent for n in train | val} == {root / "train"}
    again = dd.load(det(f"data=coco:{root}", "data.val_fraction=0.25"))
    assert {t.name for t in again.splits["val"].truth} == val
    # A train file only: val and test carved by the fractions, as for coco:FILE.
    (root / "annotations" / "instances_test.json").unlink()
    data = dd.load(det(f"data=coco:{root}"))
    assert not data.given_splits and sum(s.num_examples for s in data.splits.values()) == 24
    # Roboflow's layout beside COCO's: two training files, the user must choose.
    (root / "train" / "_annotations.coco.json").write_text(
        (root / "annotations" / "instances_train.json").read_text())
    with pytest.raises(TfkarpaError, match=r"2 train annotation files .*instances_train.json, "
                                           r"train/_annotations.coco.json.*coco:FILE"):
        dd.load(det(f"data=coco:{root}"))
    with pytest.raises(TfkarpaError, match="no COCO annotation files found"):
        dd.load(det(f"data=coco:{tmp_path}"))
    with pytest.raises(TfkarpaError, match="brings its own splits"):
        dd.load(det(f"data=coco:{root}", f"data.val={root / 'train' / '_annotations.coco.json'}"))


def test_coco_split_all_scores_every_image_of_one_file(coco_set):
    _, files = coco_set
    data = dd.load(det(f"data=coco:{files['val']}"))
    everything = data.split("all")
    assert everything.num_examples == 10
    assert sorted(t.image_id for t in everything.truth) == sorted(
        i["id"] for i in json.loads(files["val"].read_text())["images"])
    assert len(list(everything.make())) == 10


def test_given_splits_must_agree_and_only_file_sources_take_them(coco_set, tmp_path):
    _, files = coco_set
    other = json.loads(files["val"].read_text())
    other["categories"][1]["name"] = "kite"
    (files["val"].parent / "renamed.json").write_text(json.dumps(other))
    with pytest.raises(TfkarpaError, match="renamed.json.*differ from the training set"):
        dd.load(det(f"data=coco:{files['train']}",
                    f"data.val={files['val'].parent / 'renamed.json'}"))
    with pytest.raises(TfkarpaError, match="'data.test' needs 'data.val'"):
        dd.load(det(f"data=coco:{files['train']}", f"data.test={files['test']}"))
    with pytest.raises(TfkarpaError, match="is a voc source"):
        dd.load(det(f"data=coco:{files['train']}", f"data.val=voc:{tmp_path}"))
    with pytest.raises(TfkarpaError, match="not shapes"):
        dd.load(det("data=shapes", f"data.val={files['val']}"))
    with pytest.raises(TfkarpaError, match="not digits"):
        sources.load(config.build(overrides=["data=digits", "data.val=/x"]).data)


def _yolo_image(path: Path, label: Path, rows: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    label.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(path)
    label.write_text("\n".join(rows) + "\n")


def test_ultralytics_data_yaml_splits(tmp_path):
    root = tmp_path / "ds"
    for split, count in (("train", 4), ("val", 2), ("test", 1)):
        for k in range(count):
            _yolo_image(root / "images" / split / f"{k}.png", root / "labels" / split / f"{k}.txt",
                        [f"{k % 2} 0.5 0.5 0.4 0.5"])
    # A .txt list of images (lines relative to the root) for val, as Ultralytics allows.
    (root / "val.txt").write_text("images/val/0.png\n./images/val/1.png\n")
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: val.txt\ntest: images/test\n"
        "names:\n  0: cup\n  1: pen\n")
    data = dd.load(det(f"data=yolo:{root / 'data.yaml'}"))
    assert data.class_names == ["cup", "pen"] and data.given_splits
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 4, "val": 2, "test": 1}
    box = data.splits["train"].truth[0].boxes[0]
    np.testing.assert_allclose(box, [18, 10, 42, 30], atol=0.01)  # 0.4x0.5 of 60x40, centred
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames: [cup, pen]\n")
    with pytest.raises(TfkarpaError, match="data.yaml: missing 'val'"):
        dd.load(det(f"data=yolo:{root / 'data.yaml'}"))


def test_voc_image_sets_are_the_splits(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for k in range(5):
        Image.fromarray(np.full((30, 40, 3), 50, np.uint8)).save(root / "JPEGImages" / f"im{k}.jpg")
        (root / "Annotations" / f"im{k}.xml").write_text(
            f"<annotation><filename>im{k}.jpg</filename><size><width>40</width><height>30"
            "</height></size><object><name>dog</name><bndbox><xmin>5</xmin><ymin>5</ymin>"
            "<xmax>20</xmax><ymax>25</ymax></bndbox></object></annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("im0\nim1\nim2\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("im3\nim4\n")
    data = dd.load(det(f"data=voc:{root}"))
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 3, "val": 2, "test": 2}
    assert [Path(t.name).stem for t in data.splits["val"].truth] == ["im3", "im4"]


def test_class_folders_with_train_val_test_are_used_as_given(tmp_path):
    from conftest import write_image_folder

    for split, n in (("train", 5), ("val", 3), ("test", 2)):
        write_image_folder(tmp_path / "set" / split, per_class=n, seed=n)
    data = sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set'}"]).data)
    assert data.class_names == ["cat", "dog"]
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 10, "val": 6, "test": 4}
    assert data.split("all").num_examples == 20
    # The same with data.val pointing elsewhere; test falls back to the validation set.
    write_image_folder(tmp_path / "elsewhere", per_class=2, seed=9)
    data = sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set' / 'train'}",
                                                f"data.val={tmp_path / 'elsewhere'}"]).data)
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 10, "val": 4, "test": 4}
    write_image_folder(tmp_path / "odd", classes=("cat", "cow"), per_class=2)
    with pytest.raises(TfkarpaError, match="odd: its class folders"):
        sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set' / 'train'}",
                                             f"data.val={tmp_path / 'odd'}"]).data)


def test_train_and_test_folders_without_val_carve_validation_from_train(tmp_path, caplog):
    """The most common layout of public sets, DIR/train/<class>/ and DIR/test/<class>/: split
    folders, never classes; validation is carved from train, the same fraction of each class."""
    from conftest import write_image_folder

    write_image_folder(tmp_path / "set" / "train", per_class=10, seed=1)
    write_image_folder(tmp_path / "set" / "test", per_class=3, seed=2)
    with caplog.at_level("INFO", logger="tfkarpa.data.sources"):
        data = sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set'}",
                                                    "data.val_fraction=0.2"]).data)
    assert data.class_names == ["cat", "dog"]
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 16, "val": 4,
                                                                  "test": 6}
    assert sorted(np.bincount(data.splits["val"].labels)) == [2, 2]
    assert "4 of the 20 training images held out as validation" in caplog.text
    train_files = {x.tobytes() for x, _ in data.splits["train"].make().as_numpy_iterator()}
    val_files = {x.tobytes() for x, _ in data.splits["val"].make().as_numpy_iterator()}
    assert not train_files & val_files  # carved, not copied
    # valid/ is the validation split too; data.test= without data.val= carves as well.
    (tmp_path / "set" / "test").rename(tmp_path / "set" / "valid")
    data = sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set'}"]).data)
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 20, "val": 6,
                                                                  "test": 6}
    write_image_folder(tmp_path / "held", per_class=2, seed=3)
    data = sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set' / 'train'}",
                                                f"data.test={tmp_path / 'held'}",
                                                "data.val_fraction=0.1"]).data)
    assert {k: s.num_examples for k, s in data.splits.items()} == {"train": 18, "val": 2,
                                                                  "test": 4}


def test_split_folders_mixed_with_class_folders_are_named(tmp_path):
    from conftest import write_image_folder

    write_image_folder(tmp_path / "set" / "train", per_class=2)
    write_image_folder(tmp_path / "set" / "test", per_class=2)
    write_image_folder(tmp_path / "set" / "bird", classes=("a", "b"), per_class=1)
    with pytest.raises(TfkarpaError, match=r"split folders \(test, train\) beside other "
                                           r"folders \(bird\)"):
        sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set'}"]).data)
    (tmp_path / "set" / "bird").rename(tmp_path / "set" / "val")
    write_image_folder(tmp_path / "set" / "validation", per_class=1)
    with pytest.raises(TfkarpaError, match="both val/ and validation/ are val splits"):
        sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'set'}"]).data)
    # "train" among classes (trains, buses) is a class: one split name alone is not a layout.
    write_image_folder(tmp_path / "vehicles", classes=("bus", "train"), per_class=3)
    data = sources.load(config.build(overrides=[f"data=folder:{tmp_path / 'vehicles'}"]).data)
    assert data.class_names == ["bus", "train"]


class _Data:
    def __init__(self, train: int, sizes):
        self.splits = {"train": Split(train, lambda: None)}
        self.image_sizes = sizes


def test_auto_settings_follow_the_data_and_yield_to_the_user():
    rules = auto.AutoRules(min_size=64, max_size=256, stride=32, samples=64_000, min_epochs=20,
                           max_epochs=300, small_data=2000, small_augment="strong",
                           large_augment="off")
    per_epoch = lambda batch: -(-320 // batch)  # noqa: E731
    cfg = config.build(overrides=["task=detect", "batch_size=32"])
    small = _Data(320, [(90 + k % 20, 80) for k in range(400)])
    done, chosen = auto.resolve(cfg, small, rules, per_epoch)
    assert (done.data.image_size, done.epochs, done.data.augment) == (96, 200, "strong")
    assert set(chosen) == {"data.image_size", "epochs", "data.augment"}
    assert "median longer image side 100" in chosen["data.image_size"]["why"]
    assert cfg.epochs == 0  # the caller's config is left as it was
    # Large images are capped, huge sets get the fewest epochs, no sizes: the smallest side.
    done, _ = auto.resolve(cfg, _Data(50_000, [(1024, 768)]), rules, lambda b: 1563)
    assert (done.data.image_size, done.epochs, done.data.augment) == (256, 20, "off")
    assert auto.resolve(cfg, _Data(10, None), rules, per_epoch)[0].data.image_size == 64
    # What the user set stays; steps= sets the epochs.
    mine = config.build(overrides=["task=detect", "batch_size=32", "data.image_size=128",
                                   "data.augment=light", "steps=1000"])
    done, chosen = auto.resolve(mine, small, rules, per_epoch)
    assert (done.data.image_size, done.epochs, done.data.augment) == (128, 100, "light")
    assert list(chosen) == ["epochs"] and "steps=1000" in chosen["epochs"]["why"]


def test_model_auto_fine_tunes_from_imagenet_on_small_sets_and_trains_from_scratch_on_large():
    """classify's recipe for a user's own data (model=auto, optimizer.lr=0), resolved by the
    task's Transfer rule; a model the user names stays, with the rate for how it starts."""
    from pipelines import _cli
    from tfkarpa.tasks.classify.task import TASK

    assert _cli.task_recipe([f"data=folder:/photos"]) == "classify"  # no task=: classify's
    assert _cli.task_recipe(["data=digits"]) == ""  # embedded data: the tuned defaults
    recipe = config.build([_cli.resolve_recipe("classify")], ["batch_size=32"])
    assert (recipe.model.name, recipe.optimizer.lr) == ("auto", 0)
    per_epoch = lambda batch: -(-800 // batch)  # noqa: E731
    small = _Data(800, [(28, 28)] * 800)
    done, chosen = auto.resolve(recipe, small, TASK.auto, per_epoch)
    assert (done.model.name, done.model.weights, done.optimizer.lr) == (
        "efficientnet_lite0", "imagenet", 0.001)
    assert done.data.image_size == 96  # 28 px photographs upsampled for ImageNet features
    assert done.epochs == 30  # 24,000 images seen over 800
    assert "800 training images, under 10000: fine-tune from ImageNet" in \
        chosen["model.name"]["why"]
    done, chosen = auto.resolve(recipe, _Data(20_000, [(28, 28)]), TASK.auto, lambda b: 625)
    assert (done.model.name, done.model.weights, done.optimizer.lr) == ("small_cnn", "", 0.05)
    assert done.data.image_size == 32 and "enough to learn from scratch" in \
        chosen["model.name"]["why"]
    # Named over the recipe: kept, with the rate for how it starts.
    mine = config.build([_cli.resolve_recipe("classify")], ["model=small_cnn"])
    done, chosen = auto.resolve(mine, small, TASK.auto, per_epoch)
    assert (done.model.name, done.optimizer.lr) == ("small_cnn", 0.05)
    assert "model.name" not in chosen
    mine = config.build([_cli.resolve_recipe("classify")],
                        ["model=efficientnet_lite0", "model.weights=imagenet",
                         "optimizer.lr=0.003"])
    done, chosen = auto.resolve(mine, _Data(50_000, [(28, 28)]), TASK.auto, lambda b: 1)
    assert (done.model.name, done.optimizer.lr) == ("efficientnet_lite0", 0.003)
    assert done.data.image_size == 96  # from ImageNet, named or chosen: sized for fine-tuning
    # A task without the rule refuses auto, and a rate of 0 never reaches an optimizer.
    with pytest.raises(TfkarpaError, match="auto is for classification and detection on your own data"):
        auto.resolve(config.build([], ["task=detect", "model=auto"]), small,
                     auto.AutoRules(), per_epoch)
    from tfkarpa.core.optim import make_optimizer

    with pytest.raises(TfkarpaError, match="optimizer.lr' must be positive here"):
        make_optimizer(recipe.optimizer, 1, 1)


def _pycocotools_map50(annotations: Path, rows: list[dict]) -> float:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        ev = COCOeval(gt, gt.loadRes([{k: r[k] for k in ("image_id", "category_id", "bbox",
                                                          "score")} for r in rows]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


def test_results_files_carry_the_annotation_files_ids(coco_set, tmp_path):
    """Perfect detections written by the evaluation report score 1.0 against the user's own
    file with pycocotools alone: image and category ids are the file's."""
    from tfkarpa.tasks.detect import metrics

    _, files = coco_set
    data = dd.load(det(f"data=coco:{files['val']}"))
    split = data.split("all")
    perfect = [metrics.Detections(t.boxes, np.ones(len(t.classes), np.float32), t.classes)
               for t in split.truth]
    ours = metrics.coco_metrics(split.truth, perfect, data.class_names, data.category_ids)
    written = metrics.write_eval(ours, perfect, split.truth, data.class_names, tmp_path / "e",
                                 "perfect", category_ids=data.category_ids)
    rows = json.loads(Path(written["detections"]).read_text())
    assert {r["category_id"] for r in rows} == {3, 7}
    assert ours["map50"] == pytest.approx(1.0)
    assert _pycocotools_map50(files["val"], rows) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def small_run(coco_set, tmp_path_factory):
    from tfkarpa import tasks

    _, files = coco_set
    tmp = tmp_path_factory.mktemp("userrun")
    cfg = config.build(overrides=[
        "task=detect", "model=yolov8_xxs", f"data=coco:{files['train']}", f"data.val={files['val']}",
        "data.image_size=32", "steps=2", "batch_size=8", "export=false",
        "detect.eval_every=0", "detect.draw_images=0", "detect.confidence=0",
        f"runs_root={tmp / 'runs'}"])
    return tasks.run(cfg, verbose=0)


@pytest.mark.slow  # its detector run (2 steps) costs a minute of tracing on 2 cores
def test_a_run_on_given_splits_records_its_choices_and_scores_other_files(
        small_run, coco_set, tmp_path, monkeypatch):
    """The commands' plumbing: `evaluate ... data=OTHER.json split=all` scores every image of
    that file and `predict ... coco=FILE` writes that file's ids. The model is replaced by one
    that finds every true box (a 2-step model finds nothing worth scoring), so the figures
    pycocotools gives against the user's file can be checked exactly."""
    from pipelines import evaluate, predict
    from tfkarpa.tasks.detect import metrics
    from tfkarpa.tasks.detect.predict import DetectionPredictor

    root, files = coco_set
    run = Path(small_run["run_dir"])
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["auto"]["epochs"]["value"] == 1  # steps=2 at 3 steps per epoch
    assert "data.image_size" not in manifest["auto"]  # set by the user: kept
    assert manifest["data"]["examples"] == {"train": 24, "val": 10, "test": 10}

    def perfect(self, split, progress=True):
        return [metrics.Detections(t.boxes, np.full(len(t.classes), 0.9, np.float32), t.classes)
                for t in split.truth]

    monkeypatch.setattr(DetectionPredictor, "detect_split", perfect)
    assert evaluate.main([str(run), f"data=coco:{files['test']}", "split=all",
                          f"out={tmp_path / 'all'}", "--quiet"]) == 0
    scores = json.loads((tmp_path / "all" / "metrics.json").read_text())
    rows = json.loads((tmp_path / "all" / "detections.json").read_text())
    test = json.loads(files["test"].read_text())
    assert scores["images"] == 6 and scores["map50"] == pytest.approx(1.0)
    assert {r["image_id"] for r in rows} == {a["image_id"] for a in test["annotations"]}
    assert _pycocotools_map50(files["test"], rows) == pytest.approx(1.0)
    # predict with coco=FILE: that file's ids, images matched by path.
    truth = {root / i["file_name"]: [a for a in test["annotations"] if a["image_id"] == i["id"]]
             for i in test["images"]}
    names = {3: 0, 7: 1}

    pixels = {k: np.asarray(Image.open(k).convert("RGB"), np.float32) for k in truth}

    def found(self, image):  # the file it was given: the same size, nearly the same pixels
        same = [k for k, v in pixels.items() if v.shape == image.shape]
        anns = truth[min(same, key=lambda k: np.abs(pixels[k] - image).mean())]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                           a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32).reshape(-1, 4)
        return metrics.Detections(boxes, np.full(len(anns), 0.9, np.float32),
                                  np.array([names[a["category_id"]] for a in anns], np.int32))

    monkeypatch.setattr(DetectionPredictor, "detect_image", found)
    assert predict.main([str(run), *map(str, truth), f"coco={files['test']}",
                         f"out={tmp_path / 'pred'}", "--quiet"]) == 0
    rows = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert _pycocotools_map50(files["test"], rows) == pytest.approx(1.0)
    assert predict.main([str(run), str(next(iter(truth))), f"coco={files['val']}",
                         "--quiet"]) == 1  # that image is not in val.json: named, exit 1


def test_detection_model_auto_fine_tunes_yolov8_on_imagenet_lite0_below_2000_images():
    """detect's recipe for a user's own data (model=auto): the Transfer rule measured in
    benchmarks/detection_transfer.py; a detector the user names stays, and auto passes the
    model check that runs before the data is read."""
    from pipelines import _cli
    from tfkarpa.tasks.detect.task import TASK

    assert _cli.task_recipe(["task=detect", "data=coco:/x/instances.json"]) == "detect"
    recipe = config.build([_cli.resolve_recipe("detect")], [])
    assert recipe.model.name == "auto"
    TASK.check_model(recipe)
    per_epoch = lambda batch: -(-200 // batch)  # noqa: E731
    done, chosen = auto.resolve(recipe, _Data(200, [(320, 320)] * 200), TASK.auto, per_epoch)
    assert (done.model.name, done.model.weights) == ("yolov8_lite0", "imagenet")
    assert done.optimizer.lr == recipe.optimizer.lr == 0.002  # the recipe's Adam rate stays
    assert done.data.image_size == 192 and done.epochs == 48  # 9,600 images seen over 200
    assert "200 training images, under 2000: fine-tune from ImageNet" in chosen["model.name"]["why"]
    # 1,000 images: 10 epochs (the fine-tuning floor is 5, not scratch's 20); at or above
    # 2,000: YOLOv8-xxs from scratch, 48,000 images seen, at least 20 epochs
    done, _ = auto.resolve(recipe, _Data(1000, [(96, 96)]), TASK.auto, lambda b: 63)
    assert (done.model.name, done.epochs) == ("yolov8_lite0", 10)
    done, _ = auto.resolve(recipe, _Data(5000, [(96, 96)]), TASK.auto, lambda b: 313)
    assert (done.model.name, done.model.weights, done.epochs) == ("yolov8_xxs", "", 20)
    named = config.build([_cli.resolve_recipe("detect")], ["model=yolov8_xxs"])
    done, chosen = auto.resolve(named, _Data(200, [(96, 96)] * 200), TASK.auto, per_epoch)
    assert done.model.name == "yolov8_xxs" and "model.name" not in chosen
    with pytest.raises(TfkarpaError, match="auto is for classification and detection"):
        from tfkarpa.tasks.segment.task import TASK as SEGMENT

        auto.resolve(config.build(overrides=["task=segment", "model=auto"]),
                     _Data(200, None), SEGMENT.auto, per_epoch)

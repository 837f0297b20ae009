"""Multi-task runs: shapes' and CSV tables' heads, the loss weighting worked by hand, one tiny
run through train, evaluate, export (SavedModel and TFLite), predict and report, and tables that
cannot be read."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import TINY
from pipelines.__main__ import main
from tfkarpa import config, tasks
from tfkarpa.data import shapes
from tfkarpa.tasks.multitask import data as data_lib
from tfkarpa.tasks.multitask import model as model_lib
from tfkarpa.tasks.multitask.data import Head

HEADS = ["task=multitask", "heads=class:1.0,colour:0.5,size:0.5"]


def _cli(capsys, *argv) -> dict:
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny multi-task run on shapes with learned (uncertainty) weights, exported. It trains:
    every test using it is marked slow."""
    root = tmp_path_factory.mktemp("multitask")
    cfg = config.build(overrides=[*TINY, *HEADS, "head_weighting=uncertainty",
                                  f"runs_root={root / 'runs'}",
                                  f"export_dir={root / 'saved_models' / 'mt'}"])
    return root, tasks.run(cfg, verbose=0)


def test_shapes_attributes_leave_the_scenes_as_they_were():
    drawn = []
    images, labels, _, _ = shapes.generate(20, 24, seed=3, attributes=drawn)
    again, _, _, _ = shapes.generate(20, 24, seed=3)
    np.testing.assert_array_equal(images, again)
    assert len(drawn) == 20 and all(len(d) == 1 for d in drawn)
    assert all(0.35 <= d[0]["diameter"] <= 0.9 for d in drawn)
    assert [shapes.hue_name(c) for c in [(250, 10, 10), (240, 230, 20), (10, 200, 10),
                                         (20, 220, 230), (10, 10, 240), (230, 20, 220),
                                         (250, 20, 60)]] == [
        "red", "yellow", "green", "cyan", "blue", "magenta", "red"]


def test_loss_weights_fixed_and_learned_worked_by_hand():
    heads = [Head("a", "class", ["x", "y"], weight=1.0), Head("b", "value", mean=2.0, std=0.5,
                                                            weight=0.25)]
    net = model_lib.build_model(config.build(overrides=["model.width=0.25"]), (8, 8, 3), heads)
    losses = [tf.constant(0.8), tf.constant(2.0)]
    fixed = model_lib.MultiTaskTrainer(net, heads, "fixed")
    assert float(fixed.total_loss(losses)) == pytest.approx(0.8 + 0.25 * 2.0)
    learned = model_lib.MultiTaskTrainer(net, heads, "uncertainty")
    learned.log_variance.assign([0.5, -1.0])
    # class: exp(-s) * L + s/2; value: exp(-s) * L / 2 + s/2
    expected = np.exp(-0.5) * 0.8 + 0.25 + 0.5 * np.exp(1.0) * 2.0 - 0.5
    assert float(learned.total_loss(losses)) == pytest.approx(expected, rel=1e-6)
    assert [v.name for v in learned.trainable_variables if "log_variance" in v.name]
    assert not [v for v in fixed.trainable_variables if "log_variance" in v.name]
    # a value head serves the data's units: mean + std * its linear output
    out = net(tf.zeros((1, 8, 8, 3)))
    linear = net.get_layer("head_b_linear").bias.numpy()[0]
    assert float(out["b"][0, 0]) == pytest.approx(2.0 + 0.5 * linear, abs=1e-5)


@pytest.mark.slow
# pytest-timeout counts fixture setup: the first test on `run` trains it (about 2 minutes with
# the 2 cores shared), and this one then exports float and int8 TFLite files through the CLI.
@pytest.mark.timeout(480)
def test_a_multitask_run_reports_trains_and_exports_every_head(run, capsys, monkeypatch):
    root, result = run
    run_dir = Path(result["run_dir"])
    m = result["metrics"]
    for key in ("test_score", "test_class_accuracy", "test_colour_accuracy", "test_size_r2",
                "test_size_mae"):
        assert np.isfinite(m[key]), key
    header = (run_dir / "history.csv").read_text().splitlines()[0].split(",")
    for column in ("val_score", "class_accuracy", "val_colour_loss", "size_r2", "size_weight"):
        assert column in header
    assert "## head colour" in (run_dir / "eval" / "test" / "report.md").read_text()
    report = json.loads((run_dir / "eval" / "test" / "report.json").read_text())
    assert list(report["heads"]) == ["class", "colour", "size"]
    assert report["heads"]["colour"]["class_names"] == list(shapes.HUES)
    for name in ("confusion_class.png", "confusion_colour.png", "scatter_size.png"):
        assert (run_dir / "eval" / "test" / name).stat().st_size > 1000

    # SavedModel: every head, in the data's units, the same as the run
    saved = tf.saved_model.load(result["artifacts"]["saved_model"])
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3)).astype(np.uint8)
    out = saved.signatures["serving_default"](images=tf.constant(images))
    assert {"class_probabilities", "colour_class_name", "size"} <= set(out)
    keras = tasks.load_predictor(run_dir)
    resized = tf.image.resize(images, (16, 16), antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
    np.testing.assert_allclose(out["size"].numpy(), keras.predict(resized)["size"], atol=1e-4)

    # TFLite (float and int8) carries every head and evaluates like the run
    monkeypatch.chdir(root)
    exported = _cli(capsys, "export", str(run_dir), "formats=tflite,onnx", "quantize=none,int8",
                    "out=exports", "representative=32", "check=16")
    float_file = exported["artifacts"]["tflite_none"]
    lite = _cli(capsys, "evaluate", float_file)
    assert lite["metrics"]["score"] == pytest.approx(m["test_score"], abs=1e-3)
    assert lite["metrics"]["class_accuracy"] == pytest.approx(m["test_class_accuracy"], abs=1e-6)
    int8 = tasks.load_predictor(exported["artifacts"]["tflite_int8"]).predict(resized)
    assert int8["colour"].shape == (3, 6) and int8["size"].shape == (3,)
    # ONNX: each file its TFLite file's graph in onnxruntime, every head read by name
    for mode, atol in (("none", 1e-5), ("int8", 0.02)):  # int8: one step of a probability
        lite_out = tasks.load_predictor(exported["artifacts"][f"tflite_{mode}"]).predict(resized)
        onnx_out = tasks.load_predictor(exported["artifacts"][f"onnx_{mode}"]).predict(resized)
        for head in ("class", "colour", "size"):
            np.testing.assert_allclose(onnx_out[head], lite_out[head], atol=atol, err_msg=head)
    as_onnx = _cli(capsys, "evaluate", exported["artifacts"]["onnx_none"])
    assert as_onnx["metrics"]["class_accuracy"] == pytest.approx(m["test_class_accuracy"], abs=1e-6)

    # predict names every head; the run report has the per-head table
    Image.fromarray(images[0]).save(root / "photo.png")
    predicted = _cli(capsys, "predict", float_file, str(root / "photo.png"))
    row = predicted["predictions"][0]
    assert row["class"]["label"] in shapes.CLASSES and row["colour"]["label"] in shapes.HUES
    assert isinstance(row["size"]["value"], float)
    _cli(capsys, "report", str(run_dir), "out=report")
    text = (root / "report" / "report.md").read_text()
    assert "Test results per head" in text and "| size | value |" in text

    # an unfinished run loads from its checkpoints (the trainer's, with the learned weights)
    final = run_dir / "checkpoints" / "final.weights.h5"
    final.rename(root / "final.weights.h5")
    try:
        best = tasks.load_predictor(run_dir).predict(resized)
        assert best["colour"].shape == (3, 6) and np.all(np.isfinite(best["size"]))
    finally:
        (root / "final.weights.h5").rename(final)


@pytest.mark.slow
@pytest.mark.timeout(360)  # trains `run` when selected alone (setup counts, as above)
def test_reported_head_metrics_are_scikit_learns_on_the_test_split(run):
    """The run's test figures per head are scikit-learn's accuracy, R^2 and MAE of the run's own
    predictions against the test split's labels, read here straight from the source's split."""
    from sklearn.metrics import accuracy_score, mean_absolute_error, r2_score

    _, result = run
    m = result["metrics"]
    predictor = tasks.load_predictor(result["run_dir"])
    data = data_lib.load(predictor.config, predictor.config.seed)
    split = data.splits["test"]
    # shapes are drawn at the model's size (16): the split's pixels are what the model sees
    assert split.in_memory_shape[:2] == (16, 16)
    images, labels = [], {"class": [], "colour": [], "size": []}
    for image, label in split.make().as_numpy_iterator():
        images.append(image)
        for name in labels:
            labels[name].append(label[name])
    got = predictor.predict(np.stack(images))
    assert len(images) == split.num_examples == json.loads(
        (Path(result["run_dir"]) / "eval" / "test" / "report.json").read_text())["examples"]
    reference = {
        "class_accuracy": accuracy_score(labels["class"], got["class"].argmax(-1)),
        "colour_accuracy": accuracy_score(labels["colour"], got["colour"].argmax(-1)),
        "size_r2": r2_score(labels["size"], got["size"]),
        "size_mae": mean_absolute_error(labels["size"], got["size"]),
    }
    for key, value in reference.items():
        # float32 predictions against float64 sums: agreement to float32 precision
        assert m[f"test_{key}"] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # the score that picks the best epoch: the mean of the heads' accuracies and R^2
    assert m["test_score"] == pytest.approx(np.mean([reference["class_accuracy"],
                                                     reference["colour_accuracy"],
                                                     reference["size_r2"]]), rel=1e-4, abs=1e-6)


def _table(root: Path, rows: list[list[str]], images: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 256, (10, 14, 3)).astype(np.uint8)).save(
            root / f"im{i}.png")
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _rows(n: int = 12) -> list[list[str]]:
    return [["image", "kind", "weight"]] + [[f"im{i}.png", "ab"[i % 2], str(0.5 * i)]
                                            for i in range(n)]


def test_a_csv_table_gives_class_and_value_heads(tmp_path):
    path = _table(tmp_path, _rows())
    cfg = config.build(overrides=["task=multitask", f"data=csv:{path}", "data.image_size=16",
                                  "heads=weight:2,kind"])
    data = data_lib.load(cfg, 0)
    assert [(h.name, h.kind, h.weight) for h in data.heads] == [("weight", "value", 2.0),
                                                                ("kind", "class", 1.0)]
    assert data.heads[1].classes == ["a", "b"] and data.class_names == ["a", "b"]
    assert sum(s.num_examples for s in data.splits.values()) == 12
    x, y = next(iter(data_lib.make_dataset(data.splits["train"], cfg, data.heads, False)))
    assert x.shape[1:] == (16, 16, 3) and y["kind"].shape[-1] == 2 and y["weight"].shape[-1] == 1
    assert data.summary()["heads"][0]["std"] > 0
    fixed = config.build(base=config.to_dict(cfg), overrides=["data.seed=0", "seed=5"])
    assert data_lib.load(fixed, fixed.seed).fingerprint == data.fingerprint
    assert [list(s.labels) for s in data_lib.load(fixed, 5).splits.values()] == [
        list(s.labels) for s in data.splits.values()]


@pytest.mark.parametrize("edit, message", [
    (lambda rows: [["file", "kind"]] + [r[:2] for r in rows[1:]], "line 1: no 'image' column"),
    (lambda rows: rows[:3] + [["im2.png", "", "1"]] + rows[4:], "line 4: column 'kind' is empty"),
    (lambda rows: rows[:5] + [["gone.png", "a", "1"]] + rows[6:], "line 6: image"),
    (lambda rows: rows[:2] + [["im1.png", "a"]] + rows[3:], "line 3: 2 cells"),
    (lambda rows: [["image", "kind"]] + [[f"im{i}.png", "a"] for i in range(12)],
     "has one class"),
    (lambda rows: rows[:7] + [["im6.png", "a", "nan"]] + rows[8:], "line 8: column 'weight'"),
    (lambda rows: [["image", "kind", "weight", "weight_loss"]] + [r + ["1"] for r in rows[1:]],
     "collide"),
])
def test_tables_that_cannot_be_read_are_refused_by_file_and_line(tmp_path, monkeypatch, capsys,
                                                                 edit, message):
    path = _table(tmp_path, edit(_rows()))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["train", "task=multitask", f"data=csv:{path}", "epochs=1"]) == 1
    err = capsys.readouterr().err
    assert "labels.csv" in err and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before

"""The SavedModel: loads with TensorFlow alone, any image size, bytes in, matches Keras."""

import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import run_process
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import load_predictor
from tfkarpa.tasks.classify import serving as export

# Every test on `trained_run` is slow: the session fixture trains a run, and the first test to
# ask pays for it inside its own timeout (pytest-timeout counts fixture setup: about a minute
# with the 2 cores shared). Those that also run long themselves get a bound of their own.

LOAD_WITHOUT_TFKARPA = r"""
import json, sys
sys.modules["tfkarpa"] = None  # any import of tfkarpa now fails
import numpy as np, tensorflow as tf
path, png = sys.argv[1], open(sys.argv[2], "rb").read()
model = tf.saved_model.load(path)
images = np.random.default_rng(0).integers(0, 256, (3, 50, 40, 3)).astype(np.uint8)
out = model.signatures["serving_default"](images=tf.constant(images))
by_bytes = model.signatures["serve_bytes"](image_bytes=tf.constant([png, png]))
print(json.dumps({
    "prob_shape": out["probabilities"].shape.as_list(),
    "prob_sums": out["probabilities"].numpy().sum(-1).tolist(),
    "names": [n.decode() for n in out["class_name"].numpy()],
    "bytes_probs": by_bytes["probabilities"].numpy().tolist(),
}))
"""


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.timeout(300)  # first on `trained_run` in this file; a fresh TensorFlow process
def test_saved_model_serves_in_a_process_without_tfkarpa(trained_run, tmp_path):
    path = trained_run["artifacts"]["saved_model"]
    meta = json.loads((Path(path) / "tfkarpa.json").read_text())
    image = np.random.default_rng(1).integers(0, 256, (24, 30, 3)).astype(np.uint8)
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    out = run_process([sys.executable, "-c", LOAD_WITHOUT_TFKARPA, path, str(png)],
                      text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["prob_shape"] == [3, len(meta["class_names"])]
    np.testing.assert_allclose(result["prob_sums"], 1.0, rtol=1e-5)
    assert set(result["names"]) <= set(meta["class_names"])
    # The bytes signature decodes and resizes exactly as predict does in this process.
    predictor = load_predictor(path)
    from tfkarpa.core.artifacts import read_image

    local = predictor.predict(read_image(png, predictor.image_size)[None])
    np.testing.assert_allclose(result["bytes_probs"][0], local[0], atol=1e-5)


@pytest.mark.slow
def test_saved_model_matches_the_run_on_the_test_split(trained_run):
    from tfkarpa.tasks import evaluate

    keras = evaluate(load_predictor(trained_run["run_dir"]))
    saved = evaluate(load_predictor(trained_run["artifacts"]["saved_model"]))
    assert keras["accuracy"] == saved["accuracy"]
    assert keras["confusion_matrix"] == saved["confusion_matrix"]
    assert saved["artifact_kind"] == "saved_model"


@pytest.mark.slow
def test_parity_failure_writes_nothing(trained_run, tmp_path, monkeypatch):
    predictor = load_predictor(trained_run["run_dir"])
    monkeypatch.setattr(export, "PARITY_MAX_ABS", -1.0)  # no export can pass this
    images = np.zeros((4, predictor.image_size, predictor.image_size, 3), np.uint8)
    target = tmp_path / "out"
    with pytest.raises(TfkarpaError, match="parity check"):
        export.export_saved_model(predictor.model, predictor.class_names, predictor.image_size,
                                  target, images)
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_tflite_parity_failure_writes_nothing(trained_run, tmp_path, monkeypatch):
    from tfkarpa.tasks import export_run

    monkeypatch.setitem(export.TFLITE_PARITY, "none", {"max_abs_diff": -1.0, "min_agreement": 1.0})
    with pytest.raises(TfkarpaError, match="failed its parity check"):
        export_run(trained_run["run_dir"], ["tflite"], ["none"], out_dir=tmp_path, check=4)
    assert list(tmp_path.iterdir()) == []


# The gate meeting a real divergence, with the limits as shipped (the two tests above only
# show it failing on limits no export can meet). A tiny classifier that rescales its own pixels,
# as every tfkarpa model does, exported as the exporter exports it, but serving something else.
SIZE, NAMES = 8, ["a", "b", "c"]


def _tiny_classifier() -> tf.keras.Model:
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    x = tf.keras.layers.Rescaling(1 / 255)(inputs)
    x = tf.keras.layers.Conv2D(8, 3, activation="relu",
                               kernel_initializer=tf.keras.initializers.GlorotUniform(seed=0))(x)
    x = tf.keras.layers.GlobalAveragePooling2D()(x)
    out = tf.keras.layers.Dense(len(NAMES), activation="softmax",
                                kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1))(x)
    return tf.keras.Model(inputs, out)


def _other_weights(model: tf.keras.Model) -> tf.keras.Model:
    """The same network with every weight moved: what a stale or wrong weights file serves."""
    other = tf.keras.models.clone_model(model)
    rng = np.random.default_rng(1)
    other.set_weights([w + 0.5 * rng.standard_normal(w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return other


class _NormalisedTwice(export._Serving):
    """A serving graph that scales pixels to [0, 1] in front of a model that rescales its own
    input: the training/serving preprocessing mismatch the gate is there to catch."""

    def outputs(self, images):
        return super().outputs(tf.cast(images, tf.float32) / 255.0)


def _check_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, SIZE, SIZE, 3)).astype(np.uint8)


def _reported_max_diff(message: str) -> float:
    return float(re.search(r"max \|diff\| ([0-9.e+-]+)", message).group(1))


def test_parity_gate_passes_the_saved_model_it_is_given(tmp_path):
    """The control for the refusals below: the model served as built passes the shipped limits
    and the SavedModel records the figures it passed with."""
    model, images = _tiny_classifier(), _check_images()
    saved = export.export_saved_model(model, NAMES, SIZE, tmp_path / "sm", images)
    assert saved["images"] == 6 and saved["max_abs_diff"] <= export.PARITY_MAX_ABS
    assert json.loads((tmp_path / "sm" / "tfkarpa.json").read_text())["parity"] == saved


@pytest.mark.slow  # the converter's first use in a process: 7 s alone
def test_tflite_parity_gate_passes_the_file_it_is_given(tmp_path):
    """The TFLite control: the float file converted from the model passes, and carries its
    figures."""
    from tfkarpa.core.export import read_metadata

    model, images = _tiny_classifier(), _check_images()
    lite = export.export_tflite(model, NAMES, SIZE, tmp_path / "m.tflite", "none", None, images)
    assert lite["images"] == 6
    assert lite["max_abs_diff"] <= export.TFLITE_PARITY["none"]["max_abs_diff"]
    assert read_metadata((tmp_path / "m.tflite").read_bytes())["parity"] == lite


@pytest.mark.parametrize("fault", ["normalised twice", "other weights"])
def test_parity_gate_refuses_a_saved_model_that_serves_something_else(tmp_path, monkeypatch,
                                                                      fault):
    """A SavedModel whose serving graph differs from the Keras model is refused by the shipped
    limits; the message names the difference the gate measured, and nothing is left behind."""
    model, images = _tiny_classifier(), _check_images()
    pixels = tf.cast(images, tf.float32)
    if fault == "normalised twice":
        monkeypatch.setattr(export, "_Serving", _NormalisedTwice)
        served = model(pixels / 255.0)
    else:
        other, serving = _other_weights(model), export._Serving
        monkeypatch.setattr(export, "_Serving", lambda _, names, size: serving(other, names, size))
        served = other(pixels)
    # The reference: the largest probability difference, worked eagerly here (0.117 and 0.161
    # for these faults: a thousand times the 1e-4 limit, no rounding noise).
    expected = float(np.max(np.abs(model(pixels).numpy() - served.numpy())))
    assert expected > 100 * export.PARITY_MAX_ABS
    target = tmp_path / "out"
    with pytest.raises(TfkarpaError, match=r"failed its parity check .* on 6 images") as err:
        export.export_saved_model(model, NAMES, SIZE, target, images)
    # "%.2e" in the message: three significant digits
    assert _reported_max_diff(str(err.value)) == pytest.approx(expected, rel=6e-3)
    assert str(target) in str(err.value) and "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no export and no temporary sibling


@pytest.mark.slow  # the converter's first use in a process: 7 s alone
def test_tflite_parity_gate_refuses_a_file_with_other_weights(tmp_path, monkeypatch):
    """A float TFLite file converted from other weights than the model it is checked against is
    refused by the shipped limits, naming the difference, and no file is written."""
    model, images = _tiny_classifier(), _check_images()
    other, convert = _other_weights(model), export.tflite_bytes
    monkeypatch.setattr(export, "tflite_bytes", lambda _, *args: convert(other, *args))
    pixels = tf.cast(images, tf.float32)
    expected = float(np.max(np.abs(model(pixels).numpy() - other(pixels).numpy())))
    assert expected > 100 * export.TFLITE_PARITY["none"]["max_abs_diff"]
    target = tmp_path / "m.tflite"
    refused = r"\(none\) failed its parity check .* on 6 images"
    with pytest.raises(TfkarpaError, match=refused) as err:
        export.export_tflite(model, NAMES, SIZE, target, "none", None, images)
    # "%.3g" in the message: three significant digits
    assert _reported_max_diff(str(err.value)) == pytest.approx(expected, rel=6e-3)
    assert str(target) in str(err.value) and "nothing was written" in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_encoded_bytes_of_every_format(trained_run):
    model = tf.saved_model.load(trained_run["artifacts"]["saved_model"])
    rgb = np.random.default_rng(2).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    blobs = []
    for fmt in ("PNG", "JPEG", "BMP", "GIF"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        blobs.append(buf.getvalue())
    out = model.signatures["serve_bytes"](image_bytes=tf.constant(blobs))
    assert out["probabilities"].shape[0] == 4


@pytest.mark.slow
@pytest.mark.timeout(300)  # five conversions, two calibrated: 90 s when loaded
def test_tflite_every_mode_checks_itself_and_carries_class_names(trained_run, tmp_path):
    from tfkarpa.core.export import read_metadata
    from tfkarpa.tasks import export_run
    from tfkarpa.tasks.classify.serving import QUANTIZE_MODES

    result = export_run(trained_run["run_dir"], formats=["tflite"], quantize=list(QUANTIZE_MODES),
                        out_dir=tmp_path, representative=32, check=16)
    sizes = {}
    for mode in QUANTIZE_MODES:
        path = Path(result["artifacts"][f"tflite_{mode}"])
        meta = read_metadata(path.read_bytes())
        assert meta["quantize"] == mode and meta["class_names"][0] == "circle"
        assert result["checks"][f"tflite_{mode}"]["top1_agreement_confident"] >= 0.95
        sizes[mode] = path.stat().st_size
    assert result["checks"]["tflite_none"]["max_abs_diff"] < 1e-4
    # int8 weights are a quarter of float32 ones; metadata and graph make up the rest.
    assert sizes["int8"] < 0.45 * sizes["none"] and sizes["dynamic"] < 0.45 * sizes["none"]
    assert sizes["fp16"] < 0.7 * sizes["none"]


@pytest.mark.slow
@pytest.mark.timeout(300)  # two conversions and three test-split evaluations
def test_tflite_evaluates_like_the_run(trained_run, tmp_path):
    from tfkarpa.tasks import evaluate
    from tfkarpa.tasks import export_run

    out = export_run(trained_run["run_dir"], formats=["tflite"], quantize=["none", "int8_full"],
                     out_dir=tmp_path, representative=32, check=8)
    keras = evaluate(load_predictor(trained_run["run_dir"]))
    float_lite = evaluate(load_predictor(out["artifacts"]["tflite_none"]))
    int8_lite = evaluate(load_predictor(out["artifacts"]["tflite_int8_full"]))
    assert float_lite["confusion_matrix"] == keras["confusion_matrix"]
    assert float_lite["artifact_kind"] == "tflite"
    assert abs(int8_lite["accuracy"] - keras["accuracy"]) <= 0.1


@pytest.mark.slow
def test_bad_tflite_and_bad_modes(trained_run, tmp_path):
    from tfkarpa.tasks import export_run

    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a flatbuffer")
    with pytest.raises(TfkarpaError, match="not a valid TFLite model"):
        load_predictor(junk)
    with pytest.raises(TfkarpaError, match="unknown quantize mode 'int4'"):
        export_run(trained_run["run_dir"], formats=["tflite"], quantize=["int4"], out_dir=tmp_path)
    with pytest.raises(TfkarpaError, match="unknown export format 'tfjs'"):
        export_run(trained_run["run_dir"], formats=["tfjs"], out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [junk]


@pytest.mark.slow
@pytest.mark.timeout(300)  # two calibrated int8 conversions
def test_per_tensor_int8_is_smaller_and_named_apart(trained_run, tmp_path):
    from tfkarpa.core.export import read_metadata
    from tfkarpa.tasks import export_run

    a = export_run(trained_run["run_dir"], ["tflite"], ["int8"], tmp_path, representative=16, check=8)
    b = export_run(trained_run["run_dir"], ["tflite"], ["int8"], tmp_path, representative=16, check=8,
                   per_channel=False)
    per_channel, per_tensor = Path(a["artifacts"]["tflite_int8"]), Path(b["artifacts"]["tflite_int8-per-tensor"])
    assert per_tensor.name.endswith(".int8-per-tensor.tflite")
    assert per_tensor.stat().st_size < per_channel.stat().st_size
    assert read_metadata(per_tensor.read_bytes())["per_channel"] is False

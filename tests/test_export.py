"""The SavedModel: loads with TensorFlow alone, any image size, bytes in, matches Keras."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from tfkarpa.tasks import load_predictor

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


def test_saved_model_serves_in_a_process_without_tfkarpa(trained_run, tmp_path):
    path = trained_run["artifacts"]["saved_model"]
    meta = json.loads((Path(path) / "tfkarpa.json").read_text())
    image = np.random.default_rng(1).integers(0, 256, (24, 30, 3)).astype(np.uint8)
    png = tmp_path / "x.png"
    Image.fromarray(image).save(png)
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TFKARPA, path, str(png)],
                         capture_output=True, text=True, timeout=120)
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


def test_saved_model_matches_the_run_on_the_test_split(trained_run):
    from tfkarpa.tasks import evaluate

    keras = evaluate(load_predictor(trained_run["run_dir"]))
    saved = evaluate(load_predictor(trained_run["artifacts"]["saved_model"]))
    assert keras["accuracy"] == saved["accuracy"]
    assert keras["confusion_matrix"] == saved["confusion_matrix"]
    assert saved["artifact_kind"] == "saved_model"


def test_parity_failure_writes_nothing(trained_run, tmp_path, monkeypatch):
    import pytest

    from tfkarpa.tasks.classify import serving as export
    from tfkarpa.errors import TfkarpaError

    predictor = load_predictor(trained_run["run_dir"])
    monkeypatch.setattr(export, "PARITY_MAX_ABS", -1.0)  # no export can pass this
    images = np.zeros((4, predictor.image_size, predictor.image_size, 3), np.uint8)
    target = tmp_path / "out"
    with pytest.raises(TfkarpaError, match="parity check"):
        export.export_saved_model(predictor.model, predictor.class_names, predictor.image_size,
                                  target, images)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_tflite_parity_failure_writes_nothing(trained_run, tmp_path, monkeypatch):
    import pytest

    from tfkarpa.errors import TfkarpaError
    from tfkarpa.tasks import export_run
    from tfkarpa.tasks.classify import serving as export

    monkeypatch.setitem(export.TFLITE_PARITY, "none", {"max_abs_diff": -1.0, "min_agreement": 1.0})
    with pytest.raises(TfkarpaError, match="failed its parity check"):
        export_run(trained_run["run_dir"], ["tflite"], ["none"], out_dir=tmp_path, check=4)
    assert list(tmp_path.iterdir()) == []


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


def test_bad_tflite_and_bad_modes(trained_run, tmp_path):
    import pytest

    from tfkarpa.errors import TfkarpaError
    from tfkarpa.tasks import export_run

    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a flatbuffer")
    with pytest.raises(TfkarpaError, match="not a valid TFLite model"):
        load_predictor(junk)
    with pytest.raises(TfkarpaError, match="unknown quantize mode 'int4'"):
        export_run(trained_run["run_dir"], formats=["tflite"], quantize=["int4"], out_dir=tmp_path)
    with pytest.raises(TfkarpaError, match="unknown export format 'onnx'"):
        export_run(trained_run["run_dir"], formats=["onnx"], out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [junk]


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

"""ONNX files: the TFLite graph of each mode converted by tf2onnx, opened in onnxruntime, gated on
parity with Keras, written atomically with the metadata inside; ops without an ONNX form are
refused by name; evaluate, predict and benchmark take the files like the others."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_process
from test_export import NAMES, SIZE, _check_images, _other_weights, _reported_max_diff, _tiny_classifier
from tfkarpa.core import onnx_format
from tfkarpa.core.formats import FORMATS, offered
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import load_predictor
from tfkarpa.tasks.classify import serving as export

# Each test converts (TFLite then ONNX): seconds, but the converter's first use in a process
# costs about 7 s, so they are in the slow tier with the other conversion tests.
pytestmark = pytest.mark.slow


def test_each_file_is_its_tflite_graph_in_onnxruntime(tmp_path):
    """The reference is the TFLite file of the same mode in LiteRT, on the same images: the
    float ONNX file gives its probabilities to float rounding, the full-int8 one (uint8 in and
    out) the same quantized outputs; both carry their metadata and pass the gate with the
    TFLite limits."""
    model, images = _tiny_classifier(), _check_images()
    representative = np.random.default_rng(3).integers(0, 256, (16, SIZE, SIZE, 3)).astype(np.uint8)
    for mode, tolerance in (("none", 1e-5), ("int8_full", 0.0)):
        lite = export.LiteRTRunner(export.tflite_bytes(model, mode, representative))
        path = tmp_path / f"m.{mode}.onnx"
        content = export.tflite_bytes(model, mode, representative)
        figures = export.export_converted(FORMATS["onnx"], model, NAMES, SIZE, path, mode,
                                          content, images)
        meta = onnx_format.read_metadata(path.read_bytes(), str(path))
        assert meta["class_names"] == NAMES and meta["quantize"] == mode
        assert meta["parity"] == figures and figures["images"] == 6
        runner = export.converted_runner(FORMATS["onnx"], path.read_bytes(), meta)
        assert np.max(np.abs(runner(images) - lite(images))) <= tolerance + 1e-7
        assert figures["max_abs_diff"] <= export.TFLITE_PARITY[mode]["max_abs_diff"]
    session = onnx_format.session((tmp_path / "m.int8_full.onnx").read_bytes(), 1, "f")
    assert session.get_inputs()[0].type == "tensor(uint8)"  # as the TFLite file takes


def test_a_file_serving_other_weights_is_refused_and_nothing_written(tmp_path):
    model, images = _tiny_classifier(), _check_images()
    other = _other_weights(model)
    pixels = tf.cast(images, tf.float32)
    expected = float(np.max(np.abs(model(pixels).numpy() - other(pixels).numpy())))
    target = tmp_path / "m.onnx"
    with pytest.raises(TfkarpaError, match=r"ONNX export .*\(none\) failed its parity check") as err:
        export.export_converted(FORMATS["onnx"], model, NAMES, SIZE, target, "none",
                                export.tflite_bytes(other, "none"), images)
    assert _reported_max_diff(str(err.value)) == pytest.approx(expected, rel=6e-3)
    assert "nothing was written" in str(err.value) and list(tmp_path.iterdir()) == []


def test_an_op_without_an_onnx_form_is_named_and_nothing_written(tmp_path):
    """tf2onnx leaves TFLite's BUCKETIZE in the graph (it exits without error); the export
    names it, and onnxruntime, given such a graph anyway, refuses it too."""
    inputs = tf.keras.Input((SIZE, SIZE, 3), batch_size=1)
    bucket = tf.keras.layers.Lambda(
        lambda x: tf.cast(tf.raw_ops.Bucketize(input=x, boundaries=[127.5]), tf.float32))(inputs)
    content = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, bucket)).convert()
    with pytest.raises(TfkarpaError, match=r"'.*b\.onnx': 1 op\(s\) have no ONNX form: "
                                           r"TFL_BUCKETIZE; nothing was written"):
        onnx_format.from_tflite(content, str(tmp_path / "b.onnx"))
    assert list(tmp_path.iterdir()) == []
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("TFL_BUCKETIZE", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert onnx_format.unsupported_ops(model) == ["TFL_BUCKETIZE"]
    with pytest.raises(TfkarpaError, match="'g.onnx' does not open in onnxruntime: .*TFL_BUCKETIZE"):
        onnx_format.session(model.SerializeToString(), 1, "g.onnx")
    assert onnx.defs.has("Conv")  # the check is against ONNX's own op list


def test_a_damaged_or_foreign_onnx_file_is_named(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(TfkarpaError, match="junk.onnx' is not a valid ONNX file"):
        load_predictor(junk)
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(helper.make_model(graph).SerializeToString())
    with pytest.raises(TfkarpaError, match="ONNX file '.*foreign.onnx' was not exported by "
                                           "tfkarpa"):
        load_predictor(foreign)


LOAD_WITH_ONNXRUNTIME_ONLY = r"""
import json, sys
sys.modules["tfkarpa"] = sys.modules["tensorflow"] = None  # any import of either now fails
import numpy as np, onnx, onnxruntime as ort
path, images = sys.argv[1], np.load(sys.argv[2])
meta = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["tfkarpa"])
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feed = {session.get_inputs()[0].name: images.astype(np.float32)}
print(json.dumps({"names": meta["class_names"], "probabilities": session.run(None, feed)[0].tolist()}))
"""


@pytest.mark.process
@pytest.mark.timeout(300)  # the shared run's training, four conversions, a fresh process
def test_a_run_exports_onnx_that_evaluates_like_it_and_runs_without_tensorflow(trained_run,
                                                                                tmp_path):
    from tfkarpa.core.benchmark import benchmark
    from tfkarpa.tasks import TASKS, evaluate, export_run

    out = export_run(trained_run["run_dir"], formats=["onnx"], quantize=["none", "int8"],
                     out_dir=tmp_path / "exports", representative=32, check=16)
    assert sorted(out["artifacts"]) == ["onnx_int8", "onnx_none"]
    assert out["metrics"]["onnx_none_max_abs_diff"] < 1e-4
    exports = json.loads((Path(trained_run["run_dir"]) / "exports.json").read_text())
    assert exports["onnx_none"]["path"] == out["artifacts"]["onnx_none"]
    keras = evaluate(load_predictor(trained_run["run_dir"]))
    as_onnx = evaluate(load_predictor(out["artifacts"]["onnx_none"]))
    assert as_onnx["artifact_kind"] == "onnx"
    assert as_onnx["confusion_matrix"] == keras["confusion_matrix"]
    int8 = evaluate(load_predictor(out["artifacts"]["onnx_int8"]))
    assert abs(int8["accuracy"] - keras["accuracy"]) <= 0.1
    # onnxruntime alone, in a process that cannot import TensorFlow or tfkarpa
    predictor = load_predictor(out["artifacts"]["onnx_none"])
    images = _check_images()[:3]
    images = np.stack([tf.image.resize(i, (predictor.image_size,) * 2).numpy() for i in images])
    np.save(tmp_path / "images.npy", images.astype(np.uint8))
    proc = run_process([sys.executable, "-c", LOAD_WITH_ONNXRUNTIME_ONLY,
                        out["artifacts"]["onnx_none"], str(tmp_path / "images.npy")], timeout=120, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    alone = json.loads(proc.stdout)
    assert alone["names"] == predictor.class_names
    np.testing.assert_allclose(alone["probabilities"], predictor.predict(images.astype(np.uint8)),
                               atol=1e-6)
    # predict and benchmark take the files like the others; ONNX rows timed at 1 and 2 threads
    from PIL import Image

    from tfkarpa.tasks.classify.predict import predict_files

    Image.fromarray(_check_images()[0]).save(tmp_path / "photo.png")
    by_run = predict_files(load_predictor(trained_run["run_dir"]), [str(tmp_path / "photo.png")])
    by_onnx = predict_files(predictor, [str(tmp_path / "photo.png")])
    assert [t["label"] for t in by_onnx[0]["top_k"]] == [t["label"] for t in by_run[0]["top_k"]]
    result = benchmark([str(tmp_path / "exports")], tmp_path / "bench", TASKS, runs=3)
    kinds = {row["artifact"]: row["kind"] for row in result["rows"]}
    assert set(kinds.values()) == {"onnx"} and len(kinds) == 2
    assert all(row["latency_1t"]["p50_ms"] > 0 and row["latency_2t"]["p50_ms"] > 0
               for row in result["rows"])


def test_tasks_without_onnx_say_so(tmp_path):
    from tfkarpa.core.export import export_run
    from tfkarpa.tasks import TASKS

    for name in ("classify", "multitask", "detect", "segment"):
        assert "onnx" in offered(TASKS[name].formats), name
    with pytest.raises(TfkarpaError, match=r"task=pretrain does not export to onnx \(its runs "
                                           r"are not exported\)"):
        export_run(tmp_path, TASKS["pretrain"], formats=["onnx"])

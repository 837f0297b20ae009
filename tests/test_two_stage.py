"""Faster and Cascade R-CNN through task=detect: a tiny train / evaluate / export round trip per
model kind (losses per part in the history, the SavedModel's final boxes against the Keras
model's), the backbone hand-over from a classification run, and a few steps that learn."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import paired_detections, tensorboard_tags
from tfkarpa import config, tasks
from tfkarpa.data import detection as dd
from tfkarpa.models import detectors
from tfkarpa.tasks.detect import predict
from tfkarpa.tasks.detect import task as detect_task

TINY = ["task=detect", "data.count=80", "data.image_size=32", "data.objects=1-2",
        "data.min_scale=0.3", "data.max_scale=0.6", "epochs=1", "batch_size=8",
        "optimizer.name=adam", "optimizer.lr=0.001", "optimizer.weight_decay=0",
        "detect.draw_images=2", "detect.proposals=50", "detect.roi_samples=32"]


def rcnn_config(tmp_path, model, *extra):
    return config.build(overrides=[*TINY, f"model.name={model}", f"runs_root={tmp_path / 'runs'}",
                                   f"export_dir={tmp_path / 'saved_models' / model}", *extra])


# Whichever test on a shared run comes first pays for its training and SavedModel export
# inside its own time bound: 85 s (Faster) and 77 s (Cascade) measured on 2 cores at load 3,
# several times that when other test runs share them; the TFLite export adds 37-66 s.
ON_RUN = pytest.mark.timeout(600)
ON_RUN_EXPORTING = pytest.mark.timeout(900)


# One tiny run per model kind, shared by every test that only reads it; each of those is slow.
@pytest.fixture(scope="module", params=["faster_rcnn_resnet18", "cascade_rcnn_resnet18"])
def rcnn_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = rcnn_config(tmp, request.param)
    return {"tmp": tmp, "cfg": cfg, "model": request.param, **tasks.run(cfg, verbose=0)}


@pytest.mark.slow
@ON_RUN
def test_run_logs_each_loss_and_exports_a_checked_saved_model(rcnn_run):
    run = Path(rcnn_run["run_dir"])
    m = rcnn_run["metrics"]
    for key in ("test_map", "test_map50", "test_map75", "best_val_map"):
        assert 0.0 <= m[key] <= 1.0
    header = set((run / "history.csv").read_text().splitlines()[0].split(","))
    stages = ["stage1_", "stage2_", "stage3_"] if rcnn_run["model"].startswith("cascade") else [""]
    wanted = {"rpn_objectness", "rpn_box", "val_map", "val_rpn_objectness"}
    wanted |= {f"{s}box_{part}" for s in stages for part in ("class", "delta")}
    assert wanted <= header
    assert "mAP@[.5:.95]" in (run / "eval" / "test" / "report.md").read_text()
    meta = json.loads((Path(rcnn_run["artifacts"]["saved_model"]) / "tfkarpa.json").read_text())
    assert meta["task"] == "detect" and meta["check"]["gap"]["map"] <= 0.01
    # TensorBoard: the RPN's and the heads' losses apart, and the proposals drawn.
    tags = tensorboard_tags(run / "logs" / "validation")
    assert {"epoch_rpn_objectness", "epoch_rpn_box", f"epoch_{stages[-1]}box_class",
            "proposals (top 10, green: truth)", "detections (green: truth)"} <= tags


@pytest.mark.slow
@ON_RUN
def test_saved_model_boxes_are_the_keras_models_in_input_pixels(rcnn_run):
    model = predict.load_run_detector(Path(rcnn_run["run_dir"]), rcnn_run["cfg"], 6)
    loaded = tf.saved_model.load(rcnn_run["artifacts"]["saved_model"])
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3)).astype(np.uint8)
    boxed, scale = dd.letterbox(tf.constant(image), 32)
    raw = model.predict(tf.cast(boxed[None], tf.float32), verbose=0)
    n = int(raw["num_detections"][0])
    want = np.clip(raw["boxes"][0, :n] / float(scale), 0.0, [80, 48, 80, 48])
    out = loaded.signatures["serving_default"](images=tf.constant(image[None]))
    assert int(out["num_detections"][0]) == n
    np.testing.assert_allclose(out["boxes"][0, :n].numpy(), want, atol=0.05)
    np.testing.assert_allclose(out["scores"][0, :n].numpy(), raw["confidence"][0, :n], atol=1e-4)
    np.testing.assert_array_equal(out["classes"][0, :n].numpy(), raw["classes"][0, :n])
    assert np.all(out["classes"][0, n:].numpy() == -1)


@pytest.mark.slow
@pytest.mark.timeout(300)  # 40 steps of Cascade R-CNN at 64 px: 69 s measured on 2 shared cores
def test_a_few_steps_on_a_few_images_lower_every_loss(tmp_path):
    """Gradients reach the RPN and every cascade stage: 40 steps on 8 scenes."""
    cfg = rcnn_config(tmp_path, "cascade_rcnn_resnet18", "data.image_size=64", "data.count=16")
    data = dd.load(cfg.data, 0)
    model = detectors.build_detector(cfg.model, cfg.detect, (64, 64, 3), 6)
    detectors.compile_detector(model, cfg.model.name, tf.keras.optimizers.Adam(1e-3), cfg.detect)
    batch = next(iter(dd.make_dataset(data.splits["train"], cfg, False, 3, batch_size=8)))
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(10), epochs=4,
                        verbose=0).history
    # Training-mode losses, the first 10 steps' mean against the last 10's. (The later stages'
    # deltas first rise: as stage 1 refines boxes, more RoIs pass their higher IoU thresholds.)
    for key in ("loss", "rpn_objectness", "rpn_box", "stage1_box_class", "stage1_box_delta",
                "stage3_box_class"):
        assert history[key][-1] < 0.8 * history[key][0], key


@pytest.mark.slow
def test_backbone_from_a_classification_run(tmp_path):
    classify = config.build(overrides=[
        "model.name=kcv_resnet18", "data.count=40", "data.image_size=32", "epochs=1",
        "batch_size=20", f"runs_root={tmp_path / 'runs'}", "export=false", "name=cls"])
    run = tasks.run(classify, verbose=0)["run_dir"]
    cfg = rcnn_config(tmp_path, "cascade_rcnn_resnet18")
    detector = detectors.build_detector(cfg.model, cfg.detect, (32, 32, 3), 6)
    detect_task.load_backbone(detector, run, "cascade_rcnn_resnet18", freeze=True)
    from tfkarpa.tasks.classify.predict import load_run_model

    source = load_run_model(Path(run), classify, 6)
    inner = [layer for layer in source.layers if isinstance(layer, tf.keras.Model)][0]
    for a, b in zip(detector.backbone.get_weights(), inner.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not detector.backbone.trainable


@pytest.mark.slow
@ON_RUN_EXPORTING
def test_tflite_float_carries_roi_align_and_nms(rcnn_run, tmp_path):
    """CropAndResize is not a TFLite builtin: the file is traced with RoI Align as gathers, and
    detects what the Keras model detects on the same letterboxed images: Faster R-CNN's one
    box stage and Cascade's three. Its ONNX file (the same graph in onnxruntime) is written
    only because it returned the TFLite file's detections on the validation images."""
    from tfkarpa.tasks import export_run, load_predictor

    result = export_run(rcnn_run["run_dir"], ["tflite", "onnx"], ["none"], tmp_path, 16)
    assert result["checks"]["tflite_none"]["gap"]["map"] <= 0.01
    same = result["checks"]["onnx_none"]["tflite_detections"]
    assert same["detections"] > 0 and same["unpaired"] <= 0.01 * same["detections"]
    assert result["checks"]["onnx_none"]["gap"]["map"] <= 0.01
    content = Path(result["artifacts"]["tflite_none"]).read_bytes()
    model = predict.load_run_detector(Path(rcnn_run["run_dir"]), rcnn_run["cfg"], 6)
    images, _ = dd.images_of(dd.load(rcnn_run["cfg"].data, 0).splits["val"], 32, 3)
    want = predict.keras_padded_fn(model)(images)
    got = predict.TFLiteDetector(content)(images)
    np.testing.assert_array_equal(got[3], want[3])
    assert want[3].sum() > 0  # detections to compare
    for i in range(len(images)):
        paired_detections(got, want, i)  # same classes, boxes to 0.05 px, scores to 1e-3
    onnx = load_predictor(result["artifacts"]["onnx_none"])
    assert onnx.kind == "onnx"
    from_onnx = onnx.padded_fn(images)
    np.testing.assert_array_equal(from_onnx[3], got[3])
    for i in range(len(images)):
        paired_detections(from_onnx, got, i, box_atol=1e-2, score_atol=1e-4)

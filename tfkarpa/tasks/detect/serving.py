"""A detector's exports: a SavedModel and TFLite files that return final boxes, each checked.

The SavedModel takes images of any size (or encoded files) and returns boxes in their pixels:
letterbox, network, decoder and NMS are inside it. TFLite files take letterboxed uint8 images and
return padded boxes at the letterboxed size, decoding and NMS included (keras-cv's NMS is built
of TFLite built-in ops). `export_converted` writes those TFLite graphs in the formats converted
from them (ONNX for onnxruntime, NMS inside: `core.formats`). Every file's validation mAP must
be within a point of the Keras model's (`metrics.check_close`) before it is written, and a
converted file must also return its TFLite graph's detections there (`metrics.check_same`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.core.export import artifact_metadata, write_converted, write_saved_model, write_tflite
from tfkarpa.core.formats import converted
from tfkarpa.data import detection as det_data
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import detectors
from tfkarpa.tasks.detect.metrics import check_close, check_same, coco_metrics
from tfkarpa.tasks.detect.predict import (BatchOneDetector, DetectionPredictor, TFLiteDetector,
                                          saved_model_image_fn)

log = logging.getLogger(__name__)

SAVED_MODEL_FORMAT = "tfkarpa-detector-saved-model/1"
TFLITE_FORMAT = "tfkarpa-detector-tflite/1"
TFLITE_MODES = ("none", "fp16", "dynamic", "int8")
# The modes whose TFLite graph a detector's converted formats (ONNX) are made from. Not int8:
# on the test suite's YOLOv8-xs, tf2onnx's int8 file returned 3 detections per image where
# LiteRT returned 100 (refused by the gate), and on a YOLOv8-xs trained 10 epochs on 2,500
# scenes (benchmarks/onnx_export.py, 2026-12-08) onnxruntime had not returned the first 16
# validation images of the int8 file after 50 minutes (the float file: seconds).
CONVERTED_MODES = ("none", "fp16", "dynamic")


class DetectServing(tf.Module):
    """The detector with its letterbox, decoder and NMS, in the input image's pixels."""

    def __init__(self, model: tf.keras.Model, class_names: list[str], image_size: int):
        super().__init__()
        # Tracked: the model's variables, not the Keras model. A tracked Keras model makes
        # tf.saved_model.save trace every layer's call functions for Keras' own reloading, which
        # the signatures never use (YOLOv8-xs: 51 s against 28 s to save, 16 s against 5 s to
        # load, measured on this CPU).
        object.__setattr__(self, "model", model)
        self.model_variables = list(model.variables)
        self.class_names = tf.constant(list(class_names))
        self.image_size = image_size

    def detect_letterboxed(self, boxed):
        """uint8 [B, S, S, 3] -> padded boxes (letterboxed pixels), scores, classes, counts,
        and box-relative mask probabilities [B, D, m, m] from models with a mask head."""
        x = tf.cast(boxed, tf.float32)
        out = self.model.decode_predictions(self.model(x, training=False), x)
        found = (out["boxes"], out["confidence"], out["classes"], out["num_detections"])
        return (*found, out["masks"]) if "masks" in out else found

    def _final(self, boxed, scales, heights, widths):
        found = self.detect_letterboxed(boxed)
        boxes, scores, classes, count = found[:4]
        valid = tf.sequence_mask(count, tf.shape(boxes)[1])
        size = tf.cast(tf.stack([widths, heights, widths, heights], -1), tf.float32)[:, None, :]
        unclipped = boxes / scales[:, None, None]
        boxes = tf.minimum(tf.maximum(unclipped, 0.0), size)
        classes = tf.where(valid, tf.cast(classes, tf.int32), -1)
        out = {
            "boxes": tf.where(valid[..., None], boxes, 0.0),  # xyxy, input image pixels
            "scores": tf.where(valid, scores, 0.0),
            "classes": classes,
            "class_names": tf.where(valid, tf.gather(self.class_names, tf.maximum(classes, 0)), ""),
            "num_detections": tf.cast(count, tf.int32),
        }
        if len(found) > 4:
            out["masks"] = _pasted(found[4], unclipped, valid, heights, widths)
        return out

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(self, images):
        boxed, scale = det_data.letterbox(images, self.image_size)
        shape = tf.shape(images)
        n = shape[0]
        return self._final(boxed, tf.fill([n], tf.cast(scale, tf.float32)), tf.fill([n], shape[1]),
                           tf.fill([n], shape[2]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        size = self.image_size

        def one(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
            boxed, scale = det_data.letterbox(image, size)
            shape = tf.shape(image)
            return tf.ensure_shape(boxed, (size, size, 3)), tf.cast(scale, tf.float32), shape[0], shape[1]

        boxed, scales, heights, widths = tf.map_fn(one, image_bytes, fn_output_signature=(
            tf.TensorSpec([size, size, 3], tf.uint8), tf.float32, tf.int32, tf.int32))
        return self._final(boxed, scales, heights, widths)


def check_figures(reference: dict, got: dict) -> dict:
    """The Keras model's and the export's validation mAP (and mask mAP where there are masks)."""
    keys = [k for k in ("map", "map50", "mask_map", "mask_map50") if k in reference]
    return {f"{side}_{k}": fig[k] for k in keys for side, fig in (("keras", reference),
                                                                    ("export", got))}


def _pasted(box_masks, boxes, valid, heights, widths):
    """Box-relative mask probabilities [B, D, m, m] -> uint8 [B, D, H, W] (1 inside) in each
    input image's pixels, H x W the batch's largest (images of `serve_bytes` may differ)."""
    from tfkarpa.models.rcnn.roi import paste_masks

    height, width = tf.reduce_max(heights), tf.reduce_max(widths)

    def one(args):
        maps, b, keep = args
        pasted = paste_masks(maps, b, height, width) >= 0.5
        return tf.cast(tf.logical_and(pasted, keep[:, None, None]), tf.uint8)

    return tf.map_fn(one, (box_masks, boxes, valid),
                     fn_output_signature=tf.TensorSpec([None, None, None], tf.uint8))


def export_saved_model(model: tf.keras.Model, class_names: list[str], image_size: int,
                       path: str | Path, check: det_data.DetectionSplit, reference: dict,
                       metadata: dict | None = None) -> dict:
    """Write a SavedModel whose signatures return final boxes, after checking that its mAP on
    `check` is within a point of `reference` (the Keras model's). Atomic."""
    path = Path(path)
    module = DetectServing(model, class_names, image_size)

    def gate(loaded, tmp):
        predictor = DetectionPredictor("saved_model", tmp, class_names, image_size, None,
                                       image_fn=saved_model_image_fn(
                                           loaded.signatures["serving_default"]))
        got = coco_metrics(check.truth, predictor.detect_split(check), class_names)
        gaps = check_close(reference, got, f"SavedModel export to '{path}'")
        return {"check": {"images": check.num_examples, **check_figures(reference, got),
                          "gap": gaps}}

    info = {"format": SAVED_MODEL_FORMAT, "task": "detect", "class_names": list(class_names),
            "image_size": image_size, "box_format": "xyxy (input image pixels)",
            **(metadata or {})}
    figures = write_saved_model(path, module, gate, info, list(class_names))["check"]
    log.info("exported detector SavedModel to %s (val mAP %.4f, Keras %.4f)", path,
             figures["export_map"], reference["map"])
    return figures


def tflite_bytes(model: tf.keras.Model, image_size: int, mode: str,
                 representative: np.ndarray | None = None, float_file: bytes | None = None) -> bytes:
    """A TFLite detector from uint8 [1, S, S, 3] letterboxed images to padded `boxes` (xyxy,
    letterboxed pixels), `scores`, `classes`, `num_detections`, decoding and NMS included
    (keras-cv's NMS is built of TFLite built-in ops). int8 quantizes the network, calibrated on
    `representative`; decoding and NMS stay float. `float_file`: this model's float conversion
    if already made (int8 reads its tensor names; a conversion takes a minute on 2 cores)."""
    if mode not in TFLITE_MODES:
        raise TfkarpaError(f"detectors export TFLite in {', '.join(TFLITE_MODES)}, not '{mode}'")
    module = DetectServing(model, ["-"], image_size)

    @tf.function(input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.uint8,
                                                name="images")])
    def detect(images):
        # Masks stay box-relative: pasting needs CropAndResize, not a TFLite builtin.
        found = module.detect_letterboxed(images)
        names = ("boxes", "scores", "classes", "num_detections", "masks")
        return {name: tf.cast(t, tf.float32) for name, t in zip(names, found)}

    def converter():
        with detectors.portable_ops():
            function = detect.get_concrete_function()
        return tf.lite.TFLiteConverter.from_concrete_functions([function], module)

    if mode in ("none", "fp16", "dynamic"):
        conv = converter()
        if mode != "none":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "fp16":
            conv.target_spec.supported_types = [tf.float16]
        return conv.convert()
    if representative is None or not len(representative):
        raise TfkarpaError("TFLite int8 needs representative images")

    def samples():
        for image in representative:
            yield [np.asarray(image, np.uint8)[None]]

    conv = converter()
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = samples
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                      tf.lite.OpsSet.TFLITE_BUILTINS]
    # Selective quantization (TFLite's documented QuantizationDebugger route): only the network
    # runs in int8. Kept float: everything after it (box decoding, and the NMS loop, whose
    # quantized DIV fails at run time on a zero divisor: "div.cc: data[i] != zero_point"), and
    # the head's merge of box logits with class probabilities, which one int8 scale cannot hold
    # together. Measured on a 6-epoch YOLOv8-xs (val mAP 0.404 in float): 0.006 with only the
    # NMS loop float, 0.220 with decoding float too, 0.271 with the head's merge float too.
    names = _tensor_names(float_file or converter().convert())
    network = f"{model.name}/"
    keep_float = [n for n in names if (not n.startswith(network) or detectors.INT8_FLOAT_TENSORS.search(n))
                  and not n.startswith("serving_default_")]
    # The NMS loop's body is a separate subgraph whose tensors the names above do not list:
    # its ops are kept float by type.
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float,
                                                            denylisted_ops=list(_LOOP_OPS))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=samples, debug_options=options)
    return debugger.get_nondebug_quantized_model()


# keras-cv's NMS loop and the division in it: kept float in int8 files, whatever the detector.
_LOOP_OPS = ("WHILE", "DIV")


def _tensor_names(content: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    return [t["name"] for t in Interpreter(model_content=content).get_tensor_details()]


_EDGE_INTERFACE = {
    "input": "uint8 [1, S, S, 3], letterboxed: scale = S / max(height, width), image at the top "
             "left, zero padding",
    "outputs": "boxes xyxy in letterboxed pixels (divide by scale), scores, classes, "
               "num_detections"}


def _edge_info(class_names: list[str], image_size: int, mode: str, metadata) -> dict:
    return {"task": "detect", "class_names": list(class_names), "image_size": image_size,
            "quantize": mode, **_EDGE_INTERFACE, **(metadata or {})}


def export_tflite(model: tf.keras.Model, class_names: list[str], image_size: int, path,
                  mode: str, representative: np.ndarray | None, check: det_data.DetectionSplit,
                  reference: dict, metadata: dict | None = None,
                  float_file: bytes | None = None) -> tuple[dict, bytes, list]:
    """Convert, check the file's mAP on `check` against `reference` with LiteRT, write atomically.
    Returns the check's figures, the file's content (without its metadata) and its detections
    on `check` (what files converted from it must return)."""
    path = Path(path)
    content = tflite_bytes(model, image_size, mode, representative, float_file)
    predictor = DetectionPredictor("tflite", path, class_names, image_size, None,
                                   TFLiteDetector(content), batch=16)
    found = predictor.detect_split(check)
    got = coco_metrics(check.truth, found, class_names)
    gaps = check_close(reference, got, f"TFLite export '{path}' ({mode})")
    figures = {"images": check.num_examples, **check_figures(reference, got), "gap": gaps,
               "bytes": len(content)}
    info = {"format": TFLITE_FORMAT, **_edge_info(class_names, image_size, mode, metadata),
            "check": figures}
    write_tflite(path, content, info)
    log.info("exported detector TFLite (%s) to %s, %d bytes (val mAP %.4f, Keras %.4f)", mode, path,
             len(content), got["map"], reference["map"])
    return figures, content, found


def export_converted(fmt, class_names: list[str], image_size: int, path, mode: str,
                     content: bytes, check: det_data.DetectionSplit, reference: dict,
                     metadata: dict | None = None, tflite_found: list | None = None) -> dict:
    """The TFLite graph `content` of `mode` (NMS inside) in format `fmt` (ONNX), written
    atomically when, on `check` in the format's runtime, its mAP is within a point of Keras'
    (as the TFLite file's) and it returns the TFLite graph's detections (`tflite_found`, when
    the TFLite file was just checked on `check`). Why both: tf2onnx converts the int8 YOLOv8
    graph without error and the converted file can return 3 detections per image where LiteRT
    returns 100 while the mAP of a barely trained model stays where it was."""
    path = Path(path)
    names = [t.name for t in check.truth]
    if tflite_found is None:
        tflite_found = DetectionPredictor("tflite", path, class_names, image_size, None,
                                          TFLiteDetector(content), batch=16).detect_split(check)

    def gate(runner, what: str) -> dict:
        found = DetectionPredictor(fmt.name, path, class_names, image_size, None,
                                   BatchOneDetector(runner), batch=16).detect_split(check)
        got = coco_metrics(check.truth, found, class_names)
        gaps = check_close(reference, got, what)
        same = check_same(tflite_found, found, names, what)
        log.info("%s: val mAP %.4f (Keras %.4f)", what, got["map"], reference["map"])
        return {"images": check.num_examples, **check_figures(reference, got), "gap": gaps,
                "tflite_detections": same}

    return write_converted(fmt, content, path, _edge_info(class_names, image_size, mode,
                                                          metadata), gate, figures_key="check")


def export_run(predictor: DetectionPredictor, formats, quantize, out: Path,
               representative: int) -> dict:
    """Export a detection run (its Keras predictor): SavedModel, TFLite and ONNX variants, each
    checked on the validation split's mAP against the Keras model (within 1 point) before it is
    written.
    Returns {"artifacts", "checks", "reference" (the Keras model's val metrics), "metrics"}."""
    others = converted(formats)  # e.g. ONNX: each made from the TFLite graph of a mode
    edge = "tflite" in formats or others
    bad = [q for q in quantize if q not in TFLITE_MODES]
    if edge and bad:
        raise TfkarpaError(f"detectors export TFLite in {', '.join(TFLITE_MODES)}, not '{bad[0]}'")
    refused = [q for q in quantize if q not in CONVERTED_MODES]
    if others and refused:
        raise TfkarpaError(
            f"detectors export {others[0].title} in {', '.join(CONVERTED_MODES)}, not "
            f"'{refused[0]}': its int8 graph does not convert faithfully (files that lose "
            "detections, or run for an hour on 16 images); export int8 with formats=tflite")
    cfg, model, name = predictor.config, predictor.model, predictor.path.resolve().name
    data = det_data.load(cfg.data, cfg.seed, detectors.has_masks(cfg.model.name))
    val = data.splits["val"]  # the whole split: mAP on a handful of images says little
    reference = coco_metrics(val.truth, predictor.detect_split(val), data.class_names)
    meta = artifact_metadata(predictor.path, cfg, sections=("detect",))
    artifacts, checks = {}, {}
    if "saved_model" in formats:
        checks["saved_model"] = export_saved_model(model, data.class_names, cfg.data.image_size,
                                                   out / name, val, reference, meta)
        artifacts["saved_model"] = str(out / name)
    calibration = None
    if edge and "int8" in quantize:
        calibration, _ = det_data.images_of(data.splits["train"], cfg.data.image_size,
                                            representative)
    float_file = None  # the float conversion, made once: int8 reads its tensor names
    for mode in sorted(quantize, key=lambda m: m != "none") if edge else ():  # float first
        used = {**meta, "representative_images": representative if mode == "int8" else 0}
        found = None  # the TFLite file's detections on val, where it was written
        if "tflite" in formats:
            path = out / f"{name}.{mode}.tflite"
            checks[f"tflite_{mode}"], content, found = export_tflite(
                model, data.class_names, cfg.data.image_size, path, mode, calibration, val,
                reference, used, float_file)
            artifacts[f"tflite_{mode}"] = str(path)
        else:
            content = tflite_bytes(model, cfg.data.image_size, mode, calibration, float_file)
        if mode == "none":
            float_file = content
        for fmt in others:
            path = fmt.file(out, name, mode)
            checks[f"{fmt.name}_{mode}"] = export_converted(
                fmt, data.class_names, cfg.data.image_size, path, mode, content, val, reference,
                used, found)
            artifacts[f"{fmt.name}_{mode}"] = str(path)
    metrics = {"keras_val_map": reference["map"],
               **{f"{key}_val_map": fig["export_map"] for key, fig in checks.items()}}
    return {"artifacts": artifacts, "checks": checks, "reference": reference, "metrics": metrics}

"""Export a trained classifier as a SavedModel or TFLite file that serves raw images, and check it.

The SavedModel needs TensorFlow only: the resize to the model's input size and the model's own
rescaling are inside it. Two signatures:
- `serving_default`: `images`, uint8 [batch, height, width, 3] of any size;
- `serve_bytes`: `image_bytes`, string [batch] of encoded JPEG/PNG/BMP/GIF files.
Both return `probabilities` [batch, classes], `class_id` [batch], `class_name` [batch] and
`score` [batch] (the top-1 probability). Beside the graph, `tfkarpa.json` records the class
names, input size and the data config it was trained on (so `evaluate` can find the test split),
and `labels.txt` lists the class names one per line for non-TensorFlow consumers.

Every export is checked before it is moved into place: the reloaded SavedModel and the Keras
model must agree on validation images (maximum absolute difference of probabilities and top-1
agreement are recorded in tfkarpa.json); otherwise the export fails and nothing is written.

TFLite files come from TensorFlow's converter in five modes (`QUANTIZE_MODES`): float, fp16
weights, dynamic-range int8 weights, full int8 with a float interface, and full int8 with a
uint8 interface. The same metadata (class names, input size, data config, parity) is stored in
the flatbuffer's metadata table, and each file is checked with the LiteRT interpreter against
the Keras model before it is written.

Formats converted from the TFLite graph (ONNX, by tf2onnx: `core.formats`) take each mode's
graph as it is: the same inputs (images at the model's side; uint8 for int8_full),
`probabilities` out, checked in their runtime against Keras with that mode's limits before they
are written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.core.export import (ResizedImageServing, artifact_metadata, parity_metrics,
                                 tflite_files, write_converted, write_saved_model, write_tflite)
from tfkarpa.core.formats import converted
from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

FORMAT = "tfkarpa-saved-model/1"
PARITY_MAX_ABS = 1e-4
PARITY_MIN_AGREEMENT = 1.0


class _Serving(ResizedImageServing):
    def __init__(self, model: tf.keras.Model, class_names: list[str], image_size: int):
        super().__init__(image_size)
        self.model = model
        self.class_names = tf.constant(class_names)

    def outputs(self, images):
        probabilities = self.model(tf.cast(images, tf.float32), training=False)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_id": class_id,
            "class_name": tf.gather(self.class_names, class_id),
            "score": tf.reduce_max(probabilities, axis=-1),
        }


CONFIDENT_MARGIN = 0.1


def compare(expected: np.ndarray, got: np.ndarray) -> dict:
    """Parity figures of two [N, classes] probability arrays.

    Top-1 agreement is gated only where the reference is decided (top-1 ahead of the runner-up
    by CONFIDENT_MARGIN): on a near-tie any rounding flips the label without meaning anything.
    """
    top2 = np.sort(expected, axis=-1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) >= CONFIDENT_MARGIN
    same = expected.argmax(-1) == got.argmax(-1)
    return {
        "images": int(len(expected)),
        "max_abs_diff": float(np.max(np.abs(expected - got))) if len(expected) else 0.0,
        "top1_agreement": float(np.mean(same)) if len(same) else 1.0,
        "confident_images": int(confident.sum()),
        "top1_agreement_confident": float(np.mean(same[confident])) if confident.any() else 1.0,
    }


def parity(model: tf.keras.Model, serving_fn, images: np.ndarray) -> dict:
    """Compare the Keras model with an exported signature on the same uint8 images."""
    expected = model(tf.cast(images, tf.float32), training=False).numpy()
    got = serving_fn(images=tf.constant(images))["probabilities"].numpy()
    return compare(expected, got)


def export_saved_model(model: tf.keras.Model, class_names: list[str], image_size: int,
                       path: str | Path, check_images: np.ndarray, metadata: dict | None = None) -> dict:
    """Write a checked SavedModel to `path` (atomically); returns the parity figures."""
    path = Path(path)
    module = _Serving(model, list(class_names), image_size)

    def check(loaded, _):
        figures = parity(model, loaded.signatures["serving_default"], check_images)
        if (figures["max_abs_diff"] > PARITY_MAX_ABS
                or figures["top1_agreement_confident"] < PARITY_MIN_AGREEMENT):
            raise TfkarpaError(
                f"export to '{path}' failed its parity check against the Keras model on "
                f"{figures['images']} images: max |diff| {figures['max_abs_diff']:.2e} "
                f"(limit {PARITY_MAX_ABS:.0e}), top-1 agreement on confident images "
                f"{figures['top1_agreement_confident']:.3f}; "
                "nothing was written"
            )
        return {"parity": figures}

    info = {"format": FORMAT, "task": "classify", "class_names": list(class_names),
            "image_size": image_size, **(metadata or {})}
    figures = write_saved_model(path, module, check, info, list(class_names))["parity"]
    log.info("exported SavedModel to %s (parity: max |diff| %.1e, top-1 agreement %.3f)", path,
             figures["max_abs_diff"], figures["top1_agreement"])
    return figures


# ---------------------------------------------------------------------------------------------
# TFLite

QUANTIZE_MODES = ("none", "fp16", "dynamic", "int8", "int8_full")
# How far each TFLite variant may drift from the Keras model on validation images before the
# export is refused: float is exact up to kernel order, fp16 and int8 round by design.
TFLITE_PARITY = {
    "none": {"max_abs_diff": 1e-4, "min_agreement": 1.0},
    "fp16": {"max_abs_diff": 2e-2, "min_agreement": 0.98},
    "dynamic": {"max_abs_diff": 0.15, "min_agreement": 0.95},
    "int8": {"max_abs_diff": 0.25, "min_agreement": 0.95},
    "int8_full": {"max_abs_diff": 0.25, "min_agreement": 0.95},
}


def tflite_bytes(model: tf.keras.Model, mode: str, representative: np.ndarray | None = None,
                 per_channel: bool = True) -> bytes:
    """Convert with TensorFlow's converter. int8 modes calibrate on `representative` images."""
    if mode not in QUANTIZE_MODES:
        raise TfkarpaError(f"unknown quantize mode '{mode}' (choose {', '.join(QUANTIZE_MODES)})")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    return quantized(converter, mode, representative, per_channel).convert()


def quantized(converter, mode: str, representative: np.ndarray | None = None,
              per_channel: bool = True):
    """`converter` set up for a quantize mode (QUANTIZE_MODES); int8 modes calibrate on
    `representative` images (float [N, S, S, 3] or uint8), one at a time.

    `per_channel=False` quantizes each weight tensor with one scale instead of one per output
    channel: less accurate in general, but each channel's scale and 64-bit zero point cost 12
    bytes, which is 6% of a ResNet-20 int8 file (measured in benchmarks/compression.py).
    """
    if mode != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "int8_full"):
        if representative is None or not len(representative):
            raise TfkarpaError(f"quantize mode '{mode}' needs representative images")
        images = np.asarray(representative, np.float32)

        def samples():
            for image in images:
                yield [image[None]]

        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # The converter's only switch for this is a private attribute (TF 2.21).
        converter._experimental_disable_per_channel = not per_channel
        if mode == "int8_full":
            # Raw pixels in, quantized outputs: the model rescales its own input, so uint8
            # [0, 255] is exactly the calibrated input range.
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
    return converter


class LiteRTRunner:
    """Run a .tflite classifier with the LiteRT interpreter, one image at a time.

    Takes uint8 images at the model's size and returns float probabilities, quantizing the
    input and dequantizing the output where the file's interface is integer.
    """

    def __init__(self, content: bytes, num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def invoke(self, image: np.ndarray) -> np.ndarray:
        x = image[None].astype(np.float32)
        dtype = self.input["dtype"]
        if dtype != np.float32:
            scale, zero = self.input["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] != np.float32:
            scale, zero = self.output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y

    def __call__(self, images) -> np.ndarray:
        images = np.asarray(images)
        return np.stack([self.invoke(image) for image in images])


def _gate(figures: dict, mode: str, what: str) -> None:
    """Refuse a TFLite or ONNX file of `mode` that drifts past that mode's limits."""
    limits = TFLITE_PARITY[mode]
    if (figures["max_abs_diff"] > limits["max_abs_diff"]
            or figures["top1_agreement_confident"] < limits["min_agreement"]):
        raise TfkarpaError(
            f"{what} ({mode}) failed its parity check against the Keras model on "
            f"{figures['images']} images: max |diff| {figures['max_abs_diff']:.3g} (limit "
            f"{limits['max_abs_diff']}), top-1 agreement on confident images "
            f"{figures['top1_agreement_confident']:.3f} (limit "
            f"{limits['min_agreement']}); nothing was written"
        )


def export_tflite(model: tf.keras.Model, class_names: list[str], image_size: int, path: str | Path,
                  mode: str, representative: np.ndarray | None, check_images: np.ndarray,
                  metadata: dict | None = None, per_channel: bool = True,
                  content: bytes | None = None) -> dict:
    """Convert (unless `content`, this mode's conversion, is given), check against Keras with
    LiteRT, then write atomically. Returns the figures."""
    path = Path(path)
    content = content or tflite_bytes(model, mode, representative, per_channel)
    info = {"format": "tfkarpa-tflite/1", **_edge_info(class_names, image_size, mode,
                                                      per_channel, metadata)}
    expected = model(tf.cast(check_images, tf.float32), training=False).numpy()
    figures = compare(expected, LiteRTRunner(content)(check_images))
    _gate(figures, mode, f"TFLite export '{path}'")
    info["parity"] = figures
    write_tflite(path, content, info)
    log.info("exported TFLite (%s) to %s, %d bytes (parity: max |diff| %.3g, top-1 agreement %.3f)",
             mode, path, path.stat().st_size, figures["max_abs_diff"], figures["top1_agreement"])
    return figures


def _edge_info(class_names, image_size: int, mode: str, per_channel: bool, metadata) -> dict:
    return {"task": "classify", "class_names": list(class_names), "image_size": image_size,
            "quantize": mode, "per_channel": per_channel, **(metadata or {})}


# ---------------------------------------------------------------------------------------------
# Formats converted from the TFLite graph of a mode (ONNX: core.formats), through the same gate


def converted_runner(fmt, content: bytes, meta: dict, num_threads: int | None = 2,
                     where: str = "file"):
    """A classifier's file of a converted format (`fmt`, e.g. ONNX) in its runtime: images in,
    probabilities out, fed and read as its TFLite file was (what `meta` keeps of it)."""
    runner = fmt.runner(content, meta, num_threads, where)
    return lambda images: next(iter(runner(images).values()))


def export_converted(fmt, model: tf.keras.Model, class_names: list[str], image_size: int,
                     path: str | Path, mode: str, tflite: bytes, check_images: np.ndarray,
                     metadata: dict | None = None, per_channel: bool = True) -> dict:
    """`tflite`, the TFLite graph of `mode`, in format `fmt`, checked against Keras in the
    format's runtime with the TFLite file's own limits (it is the same graph), then written
    atomically (`core.export.write_converted`)."""
    expected = model(tf.cast(check_images, tf.float32), training=False).numpy()

    def check(runner, what):
        figures = compare(expected, next(iter(runner(check_images).values())))
        _gate(figures, mode, what)
        return figures

    return write_converted(fmt, tflite, path, _edge_info(class_names, image_size, mode,
                                                         per_channel, metadata), check)


# ---------------------------------------------------------------------------------------------
# Exporting a run


def sample_images(split, cfg, num_classes: int, count: int, seed: int, labels: bool = False):
    """`count` uint8 images drawn evenly from a split (seeded), at the model's input size;
    with `labels`, (images, their one-hot labels)."""
    ds = pipeline.make_dataset(split, cfg, num_classes, training=False, batch_size=count)
    ds = ds.unbatch().shuffle(max(count, min(10 * count, 10000)), seed=seed).batch(count)
    images, one_hot = next(iter(ds))
    images = tf.cast(images, tf.uint8).numpy()
    return (images, one_hot.numpy()) if labels else images


def export_run(predictor, formats, quantize, out: Path, representative: int = 256,
               check: int = 64, per_channel: bool = True) -> dict:
    """Export a finished run (its Keras predictor) in each format and quantize mode; every file
    checks itself first.

    SavedModel goes to `<out>/<run name>/`, TFLite to `<out>/<run name>.<mode>.tflite`
    (`<mode>-per-tensor` for int8 modes with `per_channel=False`). Returns {"artifacts",
    "checks", "metrics"}. The task checks `quantize` before the model loads; `tflite_bytes`
    refuses an unknown mode too.
    """
    cfg, model, name = predictor.config, predictor.model, predictor.path.resolve().name
    data = sources.load(cfg.data, cfg.seed)
    check_images = sample_images(data.splits["val"], cfg, data.num_classes, check, cfg.seed)
    calibration = None
    if any(q in ("int8", "int8_full") for q in quantize) and ("tflite" in formats
                                                               or converted(formats)):
        calibration = sample_images(data.splits["train"], cfg, data.num_classes, representative, cfg.seed)
    meta = artifact_metadata(predictor.path, cfg)
    artifacts, checks = {}, {}
    if "saved_model" in formats:
        path = out / name
        checks["saved_model"] = export_saved_model(
            model, predictor.class_names, predictor.image_size, path, check_images, meta)
        artifacts["saved_model"] = str(path)
    others = converted(formats)  # e.g. ONNX: each made from the TFLite graph of a mode
    edge = "tflite" in formats or others
    for mode, tag, path, used in (tflite_files(out, name, quantize, per_channel, representative)
                                  if edge else ()):
        content = tflite_bytes(model, mode, calibration, per_channel)  # once per mode
        info = {**meta, "representative_images": used}
        if "tflite" in formats:
            checks[f"tflite_{tag}"] = export_tflite(
                model, predictor.class_names, predictor.image_size, path, mode, calibration,
                check_images, info, per_channel, content)
            artifacts[f"tflite_{tag}"] = str(path)
        for fmt in others:
            where = fmt.file(out, name, tag)
            checks[f"{fmt.name}_{tag}"] = export_converted(
                fmt, model, predictor.class_names, predictor.image_size, where, mode, content,
                check_images, info, per_channel)
            artifacts[f"{fmt.name}_{tag}"] = str(where)
    return {"artifacts": artifacts, "checks": checks, "metrics": parity_metrics(checks)}

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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.data.pipeline import resize_uint8
from tfkarpa.errors import TfkarpaError
from tfkarpa.runs import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "tfkarpa-saved-model/1"
PARITY_MAX_ABS = 1e-4
PARITY_MIN_AGREEMENT = 1.0


class _Serving(tf.Module):
    def __init__(self, model: tf.keras.Model, class_names: list[str], image_size: int):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(class_names)
        self.image_size = image_size

    def _outputs(self, images):
        probabilities = self.model(tf.cast(resize_uint8(images, self.image_size), tf.float32),
                                   training=False)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_id": class_id,
            "class_name": tf.gather(self.class_names, class_id),
            "score": tf.reduce_max(probabilities, axis=-1),
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(self, images):
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
            return resize_uint8(image, self.image_size)

        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
            [self.image_size, self.image_size, 3], tf.uint8))
        return self._outputs(images)


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
    with atomic_dir(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={
            "serving_default": module.serve_images,
            "serve_bytes": module.serve_bytes,
        })
        loaded = tf.saved_model.load(str(tmp))
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
        info = {"format": FORMAT, "task": "classify", "class_names": list(class_names),
                "image_size": image_size, "parity": figures, **(metadata or {})}
        (tmp / "tfkarpa.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "labels.txt").write_text("\n".join(class_names) + "\n")
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
METADATA_NAME = "tfkarpa"


def tflite_bytes(model: tf.keras.Model, mode: str, representative: np.ndarray | None = None,
                 per_channel: bool = True) -> bytes:
    """Convert with TensorFlow's converter. int8 modes calibrate on `representative` images.

    `per_channel=False` quantizes each weight tensor with one scale instead of one per output
    channel: less accurate in general, but each channel's scale and 64-bit zero point cost 12
    bytes, which is 6% of a ResNet-20 int8 file (measured in benchmarks/compression.py).
    """
    if mode not in QUANTIZE_MODES:
        raise TfkarpaError(f"unknown quantize mode '{mode}' (choose {', '.join(QUANTIZE_MODES)})")
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
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
            # Raw pixels in, quantized probabilities out: the model rescales its own input, so
            # uint8 [0, 255] is exactly the calibrated input range.
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
    return converter.convert()


def embed_metadata(content: bytes, info: dict) -> bytes:
    """Store `info` as JSON in the flatbuffer's metadata table, where class names travel."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(info).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_metadata(content: bytes) -> dict:
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(content), 0)
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(meta.Buffer()).DataAsNumpy().tobytes())
    return {}


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


def export_tflite(model: tf.keras.Model, class_names: list[str], image_size: int, path: str | Path,
                  mode: str, representative: np.ndarray | None, check_images: np.ndarray,
                  metadata: dict | None = None, per_channel: bool = True) -> dict:
    """Convert, check against Keras with LiteRT, then write atomically. Returns the figures."""
    path = Path(path)
    content = tflite_bytes(model, mode, representative, per_channel)
    info = {"format": "tfkarpa-tflite/1", "task": "classify", "class_names": list(class_names),
            "image_size": image_size, "quantize": mode, "per_channel": per_channel,
            **(metadata or {})}
    expected = model(tf.cast(check_images, tf.float32), training=False).numpy()
    figures = compare(expected, LiteRTRunner(content)(check_images))
    limits = TFLITE_PARITY[mode]
    if (figures["max_abs_diff"] > limits["max_abs_diff"]
            or figures["top1_agreement_confident"] < limits["min_agreement"]):
        raise TfkarpaError(
            f"TFLite export '{path}' ({mode}) failed its parity check against the Keras model on "
            f"{figures['images']} images: max |diff| {figures['max_abs_diff']:.3g} (limit "
            f"{limits['max_abs_diff']}), top-1 agreement on confident images "
            f"{figures['top1_agreement_confident']:.3f} (limit "
            f"{limits['min_agreement']}); nothing was written"
        )
    info["parity"] = figures
    from tfkarpa.runs import atomic_write_bytes

    atomic_write_bytes(path, embed_metadata(content, info))
    log.info("exported TFLite (%s) to %s, %d bytes (parity: max |diff| %.3g, top-1 agreement %.3f)",
             mode, path, path.stat().st_size, figures["max_abs_diff"], figures["top1_agreement"])
    return figures


# ---------------------------------------------------------------------------------------------
# Exporting a run

FORMATS = ("saved_model", "tflite")


def artifact_metadata(run_dir, cfg) -> dict:
    """What every exported file records about its run, so it can be evaluated on its own."""
    from tfkarpa import config as config_lib

    as_dict = config_lib.to_dict(cfg)
    return {"run_dir": str(run_dir), "data": as_dict["data"], "seed": cfg.seed,
            "model": as_dict["model"], "stages": list(cfg.stages), "detect": as_dict["detect"]}


def sample_images(split, cfg, num_classes: int, count: int, seed: int) -> np.ndarray:
    """`count` uint8 images drawn evenly from a split (seeded), at the model's input size."""
    from tfkarpa.data import pipeline

    ds = pipeline.make_dataset(split, cfg, num_classes, training=False, batch_size=count, one_hot=False)
    ds = ds.unbatch().shuffle(max(count, min(10 * count, 10000)), seed=seed).batch(count)
    images, _ = next(iter(ds))
    return tf.cast(images, tf.uint8).numpy()


def run_task(run_dir) -> str | None:
    import yaml

    try:
        stored = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None  # not a run: load_predictor says what it is
    return stored.get("task") if isinstance(stored, dict) else None


def export_run(run_dir: str | Path, formats=("saved_model",), quantize=("none",),
               out_dir: str | Path | None = None, representative: int = 256, check: int = 64,
               per_channel: bool = True) -> dict:
    """Export a finished run in each format and quantize mode; every file checks itself first.

    SavedModel goes to `<out_dir>/<run name>/`, TFLite to `<out_dir>/<run name>.<mode>.tflite`
    (`<mode>-per-tensor` for int8 modes with `per_channel=False`); `out_dir` defaults to
    `saved_models`. Returns {"artifacts": {...}, "parity": {...}}.
    """
    from tfkarpa.data import sources
    from tfkarpa.infer import load_predictor

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise TfkarpaError(f"unknown export format '{unknown[0]}' (choose {', '.join(FORMATS)})")
    bad_modes = [q for q in quantize if q not in QUANTIZE_MODES]
    if bad_modes:
        raise TfkarpaError(f"unknown quantize mode '{bad_modes[0]}' (choose {', '.join(QUANTIZE_MODES)})")
    if representative < 1 or check < 1:
        raise TfkarpaError("representative and check must be at least 1 image")
    if run_task(run_dir) == "detect":
        from tfkarpa import detection

        result = detection.export_run(run_dir, formats, quantize, out_dir, representative)
        record_exports(run_dir, result["artifacts"], result["checks"])
        return result
    predictor = load_predictor(run_dir)
    if predictor.kind != "keras":
        raise TfkarpaError(f"'{run_dir}' is not a run directory: export needs the trained run")
    out = Path(out_dir or "saved_models")
    from tfkarpa.runs import ensure_writable

    ensure_writable(out, "export out")
    cfg, model, name = predictor.config, predictor.model, Path(run_dir).resolve().name
    data = sources.load(cfg.data, cfg.seed)
    check_images = sample_images(data.splits["val"], cfg, data.num_classes, check, cfg.seed)
    calibration = None
    if any(q in ("int8", "int8_full") for q in quantize) and "tflite" in formats:
        calibration = sample_images(data.splits["train"], cfg, data.num_classes, representative, cfg.seed)
    meta = artifact_metadata(run_dir, cfg)
    artifacts, parity_figures = {}, {}
    if "saved_model" in formats:
        path = out / name
        parity_figures["saved_model"] = export_saved_model(
            model, predictor.class_names, predictor.image_size, path, check_images, meta)
        artifacts["saved_model"] = str(path)
    if "tflite" in formats:
        for mode in quantize:
            tag = mode if per_channel or mode not in ("int8", "int8_full") else f"{mode}-per-tensor"
            path = out / f"{name}.{tag}.tflite"
            used = representative if mode in ("int8", "int8_full") else 0
            parity_figures[f"tflite_{tag}"] = export_tflite(
                model, predictor.class_names, predictor.image_size, path, mode, calibration,
                check_images, {**meta, "representative_images": used}, per_channel)
            artifacts[f"tflite_{tag}"] = str(path)
    record_exports(run_dir, artifacts, parity_figures)
    return {"artifacts": artifacts, "parity": parity_figures}


def record_exports(run_dir: str | Path, artifacts: dict, checks: dict) -> None:
    """Add each written file and its check figures to the run's `exports.json` (newest export
    of a name wins), so reports and listings know every artifact a run has produced."""
    from tfkarpa.benchmark import artifact_size
    from tfkarpa.runs import atomic_write_json

    record = Path(run_dir) / "exports.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    for name, path in artifacts.items():
        known[name] = {"path": str(path), "size_bytes": artifact_size(Path(path)),
                       "check": checks.get(name, {})}
    atomic_write_json(record, known)

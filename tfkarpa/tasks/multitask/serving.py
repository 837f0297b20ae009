"""Multi-task exports (SavedModel, TFLite, ONNX) that carry every head, their checks, predictors.

SavedModel signatures as the classifier's (`serving_default` on uint8 `images` of any size,
`serve_bytes` on encoded files), returning per classification head `<head>_probabilities`,
`<head>_class_id`, `<head>_class_name`, `<head>_score`, and per regression head `<head>` (the
value in the data's units). TFLite files have one signature whose outputs are the heads by name
(probabilities or [1, 1] values); the LiteRT signature runner reads them by name, so nothing
depends on the converter's output order. `tfkarpa.json` / the flatbuffer's metadata list the
heads (`multitask_heads`: kinds, class names, the value heads' mean and standard deviation).
Formats converted from the TFLite graphs (ONNX: `core.formats`) are read by head name.

Every file is checked against the Keras model before it is written: probabilities by their
largest absolute difference and top-1 agreement on confident images (as the classifier's), and
values by their largest difference in units of the head's standard deviation, under the same
limits per mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.core.artifacts import Artifact
from tfkarpa.core.export import (ResizedImageServing, artifact_metadata, parity_metrics,
                                 tflite_files, write_converted, write_saved_model, write_tflite)
from tfkarpa.core.formats import converted, converted_format, per_image
from tfkarpa.core.task import Predictor as BasePredictor
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify.serving import (PARITY_MAX_ABS, PARITY_MIN_AGREEMENT, QUANTIZE_MODES,
                                            TFLITE_PARITY, compare, quantized)
from tfkarpa.tasks.multitask.data import Head

log = logging.getLogger(__name__)

FORMAT = "tfkarpa-saved-model/1"


HEADS_KEY = "multitask_heads"  # in exports' metadata ("heads" is the config key's text)


def heads_of(meta: dict, where) -> list[Head]:
    """The heads recorded in a run's manifest data section or an export's metadata."""
    found = meta.get(HEADS_KEY) or meta.get("heads")
    if not isinstance(found, list) or not found:
        raise TfkarpaError(f"'{where}' records no heads: it is not a multi-task artifact")
    return [Head.from_dict(h) for h in found]


class Predictor(BasePredictor):
    """{head: [batch, classes] probabilities or [batch] values} for uint8 images."""

    task = "multitask"

    def __init__(self, kind, path, heads: list[Head], image_size, config, fn, model=None,
                 content: bytes | None = None):
        class_names = next((h.classes for h in heads if h.kind == "class"), [])
        super().__init__(kind, path, class_names, image_size, config, model)
        self.heads, self._fn, self.content, self.meta = heads, fn, content, {}

    def predict(self, images_uint8) -> dict[str, np.ndarray]:
        out = self._fn(np.asarray(images_uint8, np.uint8))
        return {h.name: np.asarray(out[h.name], np.float32).reshape(
            (len(images_uint8), -1) if h.kind == "class" else (-1,)) for h in self.heads}

    def timed(self, threads: int | None):
        if self.kind == "tflite" and threads:
            return LiteRTRunner(self.content, num_threads=threads)
        fmt = converted_format(self.kind)  # ONNX
        if fmt and threads:
            return converted_runner(fmt, self.content, self.meta, threads, str(self.path))
        return self.predict


def keras_fn(model: tf.keras.Model):
    fn = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False),
                     reduce_retracing=True)
    return lambda x: {k: v.numpy() for k, v in fn(tf.constant(x)).items()}


class _Serving(ResizedImageServing):
    def __init__(self, model: tf.keras.Model, heads: list[Head], image_size: int):
        super().__init__(image_size)
        self.model, self.heads = model, heads
        self.names = {h.name: tf.constant(h.classes) for h in heads if h.kind == "class"}

    def outputs(self, images):
        out = self.model(tf.cast(images, tf.float32), training=False)
        result = {}
        for head in self.heads:
            y = out[head.name]
            if head.kind == "value":
                result[head.name] = y[:, 0]
                continue
            class_id = tf.argmax(y, axis=-1, output_type=tf.int32)
            result.update({f"{head.name}_probabilities": y, f"{head.name}_class_id": class_id,
                           f"{head.name}_class_name": tf.gather(self.names[head.name], class_id),
                           f"{head.name}_score": tf.reduce_max(y, axis=-1)})
        return result


def saved_model_fn(signature, heads: list[Head]):
    def fn(x):
        out = signature(images=tf.constant(x))
        return {h.name: out[f"{h.name}_probabilities" if h.kind == "class" else h.name].numpy()
                for h in heads}
    return fn


def parity(expected: dict, got: dict, heads: list[Head]) -> dict:
    """Per head: classification heads as `classify.serving.compare`; value heads' largest
    difference in standard deviations. Plus the worst of each over the heads."""
    figures = {}
    for h in heads:
        if h.kind == "class":
            figures[h.name] = compare(expected[h.name], got[h.name])
        else:
            diff = np.abs(np.ravel(expected[h.name]) - np.ravel(got[h.name])) / h.std
            figures[h.name] = {"images": int(diff.size), "max_abs_diff": float(diff.max())}
    return {"heads": figures, "images": next(iter(figures.values()))["images"],
            "max_abs_diff": max(f["max_abs_diff"] for f in figures.values()),
            "top1_agreement": min(f.get("top1_agreement", 1.0) for f in figures.values()),
            "top1_agreement_confident": min(f.get("top1_agreement_confident", 1.0)
                                            for f in figures.values())}


def _gate(figures: dict, max_abs: float, min_agreement: float, what: str) -> None:
    if figures["max_abs_diff"] > max_abs or figures["top1_agreement_confident"] < min_agreement:
        worst = max(figures["heads"], key=lambda h: figures["heads"][h]["max_abs_diff"])
        raise TfkarpaError(
            f"{what} failed its parity check against the Keras model on {figures['images']} "
            f"images: max |diff| {figures['max_abs_diff']:.3g} (head '{worst}'; limit "
            f"{max_abs:.3g}), top-1 agreement on confident images "
            f"{figures['top1_agreement_confident']:.3f} (limit {min_agreement}); "
            "nothing was written")


def export_saved_model(model: tf.keras.Model, heads: list[Head], image_size: int, path: Path,
                       check_images: np.ndarray, metadata: dict) -> dict:
    """Write a checked SavedModel with every head to `path` (atomically); the parity figures."""
    module = _Serving(model, heads, image_size)
    expected = keras_fn(model)(check_images)

    def check(loaded, _):
        got = saved_model_fn(loaded.signatures["serving_default"], heads)(check_images)
        figures = parity(expected, got, heads)
        _gate(figures, PARITY_MAX_ABS, PARITY_MIN_AGREEMENT, f"export to '{path}'")
        return {"parity": figures}

    info = {"format": FORMAT, "task": "multitask", HEADS_KEY: [h.as_dict() for h in heads],
            "class_names": next((h.classes for h in heads if h.kind == "class"), []),
            "image_size": image_size, **metadata}
    figures = write_saved_model(path, module, check, info, [h.name for h in heads])["parity"]
    log.info("exported SavedModel to %s (parity: max |diff| %.1e)", path, figures["max_abs_diff"])
    return figures


def tflite_bytes(model: tf.keras.Model, heads: list[Head], image_size: int, mode: str,
                 representative: np.ndarray | None, per_channel: bool = True) -> bytes:
    """Convert one signature (float image [1, S, S, 3] -> the heads by name)."""
    @tf.function(input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.float32,
                                                name="image")])
    def serve(image):
        out = model(image, training=False)
        return {h.name: out[h.name] for h in heads}

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], model)
    return quantized(converter, mode, representative, per_channel).convert()


class LiteRTRunner:
    """A multi-task .tflite file in the LiteRT interpreter: uint8 images in, {head: output}
    out, (de)quantizing where the file's interface is integer."""

    def __init__(self, content: bytes, num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.runner = interpreter.get_signature_runner()
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()
        self.input_name = next(iter(self.inputs))

    def invoke(self, image: np.ndarray) -> dict:
        x = image[None].astype(np.float32)
        detail = self.inputs[self.input_name]
        if detail["dtype"] != np.float32:
            scale, zero = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max)
        out = self.runner(**{self.input_name: x.astype(detail["dtype"])})
        result = {}
        for name, y in out.items():
            detail = self.outputs[name]
            if detail["dtype"] != np.float32:
                scale, zero = detail["quantization"]
                y = (y.astype(np.float32) - zero) * scale
            result[name] = y[0]
        return result

    def __call__(self, images) -> dict:
        rows = [self.invoke(image) for image in np.asarray(images)]
        return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def _edge_info(heads: list[Head], image_size: int, mode: str, per_channel: bool,
               metadata: dict) -> dict:
    return {"task": "multitask", HEADS_KEY: [h.as_dict() for h in heads],
            "class_names": next((h.classes for h in heads if h.kind == "class"), []),
            "image_size": image_size, "quantize": mode, "per_channel": per_channel, **metadata}


def export_tflite(model, heads: list[Head], image_size: int, path: Path, mode: str,
                  representative, check_images: np.ndarray, metadata: dict,
                  per_channel: bool = True, content: bytes | None = None) -> dict:
    """Convert (unless `content`, this mode's conversion, is given), check every head against
    Keras in LiteRT, then write atomically."""
    content = content or tflite_bytes(model, heads, image_size, mode, representative, per_channel)
    figures = parity(keras_fn(model)(check_images), LiteRTRunner(content)(check_images), heads)
    limits = TFLITE_PARITY[mode]
    _gate(figures, limits["max_abs_diff"], limits["min_agreement"],
          f"TFLite export '{path}' ({mode})")
    info = {"format": "tfkarpa-tflite/1",
            **_edge_info(heads, image_size, mode, per_channel, metadata), "parity": figures}
    write_tflite(path, content, info)
    log.info("exported TFLite (%s) to %s, %d bytes (parity: max |diff| %.3g)", mode, path,
             path.stat().st_size, figures["max_abs_diff"])
    return figures


def converted_runner(fmt, content: bytes, meta: dict, num_threads: int | None = 2,
                     where: str = "file"):
    """A multi-task file of a format converted from its TFLite graph (ONNX) in the format's
    runtime, one image at a time (the graph's batch is 1, as the TFLite file's): uint8 images
    in, {head: output} out."""
    run = fmt.runner(content, meta, num_threads, where)
    return lambda images: per_image(run, images)


def export_converted(fmt, model, heads: list[Head], image_size: int, path: Path, mode: str,
                     content: bytes, check_images: np.ndarray, metadata: dict,
                     per_channel: bool = True) -> dict:
    """The TFLite graph `content` of `mode` in format `fmt` (ONNX), every head checked against
    Keras in the format's runtime with that mode's limits, then written atomically."""
    expected = keras_fn(model)(check_images)

    def check(run, what):
        figures = parity(expected, per_image(run, check_images), heads)
        limits = TFLITE_PARITY[mode]
        _gate(figures, limits["max_abs_diff"], limits["min_agreement"], what)
        return figures

    return write_converted(fmt, content, path,
                           _edge_info(heads, image_size, mode, per_channel, metadata), check)


def load_predictor(artifact: Artifact, load_model) -> Predictor:
    """The predictor of an opened run (`load_model(run_dir, cfg, heads)` builds its model),
    SavedModel or TFLite file."""
    a = artifact
    if a.kind == "keras":
        from tfkarpa import runs

        heads = heads_of(runs.read_json(a.path / "manifest.json").get("data", {}), a.path)
        model = load_model(a.path, a.config, heads)
        return Predictor("keras", a.path, heads, a.image_size, a.config, keras_fn(model), model)
    heads = heads_of(a.meta, a.path)
    if a.kind == "saved_model":
        fn = saved_model_fn(a.loaded.signatures["serving_default"], heads)
        predictor = Predictor("saved_model", a.path, heads, a.image_size, a.config, fn)
    elif converted_format(a.kind):  # converted from the TFLite graph (ONNX)
        runner = converted_runner(converted_format(a.kind), a.content, a.meta, where=str(a.path))
        predictor = Predictor(a.kind, a.path, heads, a.image_size, a.config, runner,
                              content=a.content)
    else:
        try:
            runner = LiteRTRunner(a.content)
        except Exception as err:  # the interpreter raises many types on garbage
            raise TfkarpaError(f"'{a.path}' is not a valid TFLite model: {err}") from None
        predictor = Predictor("tflite", a.path, heads, a.image_size, a.config, runner,
                              content=a.content)
    predictor.meta = dict(a.meta)
    return predictor


def export_run(predictor: Predictor, data, formats, quantize, out: Path, representative: int,
               check: int, sample, per_channel: bool = True) -> dict:
    """Export a finished run in each format and mode (names as `classify.serving.export_run`);
    `sample(split, count)` draws uint8 images at the model's size."""
    cfg, model, name = predictor.config, predictor.model, predictor.path.resolve().name
    check_images = sample(data.splits["val"], check)
    others = converted(formats)  # e.g. ONNX: each made from the TFLite graph of a mode
    edge = "tflite" in formats or others
    calibration = None
    if edge and any(q in ("int8", "int8_full") for q in quantize):
        calibration = sample(data.splits["train"], representative)
    meta = artifact_metadata(predictor.path, cfg, sections=("heads", "head_weighting"))
    artifacts, checks = {}, {}
    if "saved_model" in formats:
        path = out / name
        checks["saved_model"] = export_saved_model(model, predictor.heads, predictor.image_size,
                                                   path, check_images, meta)
        artifacts["saved_model"] = str(path)
    for mode, tag, path, used in (tflite_files(out, name, quantize, per_channel, representative)
                                  if edge else ()):
        content = tflite_bytes(model, predictor.heads, predictor.image_size, mode, calibration,
                               per_channel)  # once per mode
        info = {**meta, "representative_images": used}
        if "tflite" in formats:
            checks[f"tflite_{tag}"] = export_tflite(
                model, predictor.heads, predictor.image_size, path, mode, calibration,
                check_images, info, per_channel, content)
            artifacts[f"tflite_{tag}"] = str(path)
        for fmt in others:
            where = fmt.file(out, name, tag)
            checks[f"{fmt.name}_{tag}"] = export_converted(
                fmt, model, predictor.heads, predictor.image_size, where, mode, content,
                check_images, info, per_channel)
            artifacts[f"{fmt.name}_{tag}"] = str(where)
    return {"artifacts": artifacts, "checks": checks, "metrics": parity_metrics(checks)}

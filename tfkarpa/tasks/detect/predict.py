"""Detector predictors for each artifact kind, and detections for image files.

Every predictor returns `Detections` in the original image's pixels. Keras, TFLite and ONNX see
letterboxed images (`padded_fn`: uint8 [B, S, S, 3] -> padded boxes, scores, classes, counts at
the letterboxed size), undone here; the SavedModel takes the original image through its own
serving signature (`image_fn`), exactly as its users do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import runs
from tfkarpa.core.artifacts import Artifact, decode_file, image_files
from tfkarpa.core.formats import converted_format, per_image
from tfkarpa.core.task import Predictor
from tfkarpa.data import detection as det_data
from tfkarpa.data import masks
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import detectors, load_weights
from tfkarpa.tasks.detect.draw import draw
from tfkarpa.tasks.detect.metrics import Detections, coco_results

log = logging.getLogger(__name__)

class DetectionPredictor(Predictor):
    """Detections from a run (Keras), a SavedModel or a TFLite file, in original pixels."""

    task = "detect"

    def __init__(self, kind: str, path, class_names: list[str], image_size: int, config,
                 padded_fn=None, image_fn=None, model=None, batch: int = 32, threaded=None):
        super().__init__(kind, path, class_names, image_size, config, model)
        self.padded_fn, self.image_fn, self.batch = padded_fn, image_fn, batch
        self._threaded = threaded  # threads -> a padded fn (TFLite and ONNX files)

    def timed(self, threads: int | None):
        """Batch-1 detection of uint8 [1, S, S, 3] (an S-sided image letterboxes to itself),
        NMS included: the file's runtime with `threads` where it takes a count."""
        if self._threaded is not None and threads:
            return self._threaded(threads)
        if self.image_fn is not None:
            return lambda images: self.image_fn(images[0])
        return self.padded_fn

    def detect_image(self, image: np.ndarray) -> Detections:
        height, width = image.shape[:2]
        if self.image_fn is not None:
            return self.image_fn(image)
        boxed, scale = det_data.letterbox(tf.constant(image, tf.uint8), self.image_size)
        out = self.padded_fn(boxed.numpy()[None])
        return Detections.from_padded(*(o[0] for o in out[:4]), float(scale), height, width,
                                      out[4][0] if len(out) > 4 else None)

    def detect_split(self, split: det_data.DetectionSplit,
                     progress: bool = True) -> list[Detections]:
        """Every image of a split, in order (with `progress`, counts in the log on long ones)."""
        out, truth = [], iter(split.truth)
        total = split.num_examples if progress else -1
        if self.image_fn is not None:
            for image, _, _ in split.make():
                out.append(self.image_fn(image.numpy()))
                _progress(len(out), total)
            return out
        ds = split.make().map(lambda x, b, c: det_data.letterbox(x, self.image_size),
                              num_parallel_calls=tf.data.AUTOTUNE).batch(self.batch)
        for images, scales in ds:
            found = self.padded_fn(images.numpy())  # boxes, scores, classes, counts[, masks]
            for i, scale in enumerate(np.atleast_1d(scales.numpy())):
                t = next(truth)
                out.append(Detections.from_padded(*(o[i] for o in found[:4]), float(scale),
                                                  t.height, t.width,
                                                  found[4][i] if len(found) > 4 else None))
                _progress(len(out), total)
        return out


def _progress(done: int, total: int, every: int = 500) -> None:
    if total >= 0 and (done % every == 0 or (done == total and total >= every)):
        log.info("detected %d / %d images", done, total)


def local_padded_fn(model: tf.keras.Model):
    """The detector and its NMS decoder called directly, batch by batch: what a worker of a
    multi-worker group uses, where `model.predict` would be a distributed call."""
    @tf.function(reduce_retracing=True)
    def detect(x):
        return _padded(model.decode_predictions(model(x, training=False), x))

    def predict(images: np.ndarray):
        return tuple(t.numpy() for t in detect(tf.cast(images, tf.float32)))

    return predict


def _padded(out: dict) -> tuple:
    """A detector's output dict as boxes, scores, classes, counts (and box-relative masks, from
    models with a mask head)."""
    found = (out["boxes"], out["confidence"], out["classes"], out["num_detections"])
    return (*found, out["masks"]) if "masks" in out else found


def keras_padded_fn(model: tf.keras.Model, batch_size: int = 32):
    """A keras-cv detector's `predict` (raw outputs, then its NMS decoder) as a padded fn."""

    def predict(images: np.ndarray):
        return _padded(model.predict(tf.cast(images, tf.float32), batch_size=batch_size,
                                     verbose=0))

    return predict


class BatchOneDetector:
    """A batch-1 detector graph with named outputs (`run`: uint8 [1, S, S, 3] -> {"boxes",
    "scores", "classes", "num_detections"[, "masks"]}), one image at a time, as padded outputs."""

    def __init__(self, run):
        self.run = run

    def __call__(self, images: np.ndarray):
        out = per_image(self.run, np.asarray(images, np.uint8))
        found = (out["boxes"], out["scores"], out["classes"].astype(np.int32),
                 out["num_detections"].astype(np.int32))
        return (*found, out["masks"]) if "masks" in out else found


class TFLiteDetector(BatchOneDetector):
    """Run a detector .tflite with the LiteRT interpreter, one image at a time."""

    def __init__(self, content: bytes, num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=content, num_threads=num_threads)
        signature = interpreter.get_signature_runner()
        super().__init__(lambda image: signature(images=image))


def converted_detector(fmt, content: bytes, meta: dict, num_threads: int | None = 2,
                       where: str = "file") -> BatchOneDetector:
    """A detector's file of a format converted from its TFLite graph (ONNX: NMS inside), in the
    format's runtime, with TFLiteDetector's outputs; `meta` keeps its TFLite interface."""
    return BatchOneDetector(fmt.runner(content, meta, num_threads, where))


def load_run_detector(run_dir: Path, cfg, num_classes: int) -> tf.keras.Model:
    """A detection run's model with its final (else best, else last) weights."""
    weights = runs.weights_file(run_dir)
    size = cfg.data.image_size
    # The run's weights replace whatever it started from: no ImageNet or start file is read.
    start_free = dataclasses.replace(cfg.model, weights="")
    model = detectors.build_detector(start_free, cfg.detect, (size, size, 3), num_classes)
    load_weights(model, weights, about=f"run '{run_dir}'")
    return model


def saved_model_image_fn(signature):
    """One image through a detector SavedModel's serving signature, as `Detections`."""
    def detect(image: np.ndarray) -> Detections:
        out = signature(images=tf.constant(image[None], tf.uint8))
        n = int(out["num_detections"][0])
        # Masks come pasted into the image's pixels: [1, D, H, W] uint8, 1 inside.
        rles = masks.encode(out["masks"][0, :n].numpy()) if "masks" in out else None
        return Detections(out["boxes"][0, :n].numpy(), out["scores"][0, :n].numpy(),
                          out["classes"][0, :n].numpy().astype(np.int32), rles)

    return detect


def load_predictor(artifact: Artifact) -> DetectionPredictor:
    """The predictor of an opened run, SavedModel, TFLite or ONNX file."""
    a = artifact
    if a.kind == "keras":
        model = load_run_detector(a.path, a.config, len(a.class_names))
        return DetectionPredictor("keras", a.path, a.class_names, a.image_size, a.config,
                                  keras_padded_fn(model, a.config.batch_size), model=model)
    if a.kind == "saved_model":
        return DetectionPredictor("saved_model", a.path, a.class_names, a.image_size, a.config,
                                  image_fn=saved_model_image_fn(a.loaded.signatures["serving_default"]))
    fmt = converted_format(a.kind)  # ONNX
    if fmt is not None:
        runner = converted_detector(fmt, a.content, a.meta, where=str(a.path))
        return DetectionPredictor(
            a.kind, a.path, a.class_names, a.image_size, a.config, runner, batch=16,
            threaded=lambda n: converted_detector(fmt, a.content, a.meta, n, str(a.path)))
    try:
        runner = TFLiteDetector(a.content)
    except Exception as err:  # the interpreter raises many types on garbage
        raise TfkarpaError(f"'{a.path}' is not a valid TFLite model: {err}") from None
    return DetectionPredictor("tflite", a.path, a.class_names, a.image_size, a.config, runner,
                              batch=16, threaded=lambda n: TFLiteDetector(a.content, n))


def predict_files(predictor: DetectionPredictor, inputs: list[str], out_dir: Path,
                  min_score: float, coco_file: str = "") -> list[dict]:
    """Detections for image files: `detections.json` (COCO results format, with file names) and
    one annotated PNG per image in `out_dir`, written atomically. Returns one entry per image.
    With `coco_file` the results carry that annotation file's image and category ids (images
    matched by path, then by file name), so pycocotools scores them against it directly."""
    from PIL import Image

    from tfkarpa.data.annotations import coco_ids

    files = image_files(inputs)
    ids, categories = list(range(1, len(files) + 1)), None
    if coco_file:
        ids, categories = coco_ids(coco_file, files, predictor.class_names)
    results, coco = [], []
    with runs.atomic_dir(out_dir, "predictions", "predict out") as tmp:
        for i, file in enumerate(files):
            image = decode_file(file)
            found = predictor.detect_image(image)
            found = found.keep(found.scores >= min_score)
            picture = draw(image, found, predictor.class_names, None, min_score,
                           max(1, 256 // max(image.shape[:2])))
            name = f"{i:04d}-{file.stem}.png"
            Image.fromarray(picture).save(tmp / name)
            for row in coco_results([found], [ids[i]], categories):
                coco.append({**row, "file_name": str(file)})
            results.append({"image": str(file), "height": int(image.shape[0]),
                            "width": int(image.shape[1]), "annotated": str(out_dir / name),
                            "detections": found.to_json(predictor.class_names)})
        (tmp / "detections.json").write_text(json.dumps(coco))
    return results


def predict_command(predictor: DetectionPredictor, inputs: list[str], options: dict) -> dict:
    """`predict` for a detector: annotated images and detections.json in `options["out"]`
    (default predictions/<artifact name>), detections under `options["min_score"]` left out."""
    try:
        min_score = float(options.get("min_score", "0.3"))
    except ValueError:
        min_score = -1.0
    if not 0.0 <= min_score <= 1.0:
        raise TfkarpaError(f"predict option 'min_score' must be in [0, 1], got "
                           f"'{options.get('min_score')}'")
    out = Path(options.get("out") or Path("predictions") / predictor.path.name)
    runs.ensure_writable(out.parent, "predict out")
    results = predict_files(predictor, inputs, out, min_score, options.get("coco", ""))
    lines = [""]
    for r in results:
        found = ", ".join(f"{d['class_name']} {d['score']:.2f}" for d in r["detections"][:6])
        more = f" (+{len(r['detections']) - 6})" if len(r["detections"]) > 6 else ""
        lines.append(f"{r['image']}  {len(r['detections'])} object(s): {found}{more}")
    return {"artifacts": {"detections": str(out / "detections.json"), "annotated_images": str(out)},
            "metrics": {"images": len(results),
                        "detections": sum(len(r["detections"]) for r in results)},
            "predictions": results, "lines": lines}

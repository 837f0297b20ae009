"""Object detection on the shared fit loop: the task, COCO evaluation, pictures, export.

`DetectTask` trains a keras-cv detector (`models.detectors`) on a detection source
(`data.detection`). Every `detect.eval_every` epochs `CocoEvaluation` runs the model over the
validation split, scores it with pycocotools (the field's reference implementation of COCO
mAP) and puts `val_map`, `val_map50`, `val_map75` into the epoch logs, where the checkpoint
callback (best = highest `val_map`), the CSV history and TensorBoard see them; it also draws
validation images with ground truth (green) and predictions (coloured by class) for TensorBoard.

Evaluation always happens in the original image's pixels: detections from the letterboxed
model input are divided by the letterbox scale and clipped to the image. `Detections` is one
image's result; `coco_metrics` turns a split's truth and detections into mAP@[.5:.95], mAP@0.5,
mAP@0.75, small/medium/large, recall and per-class AP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import runs, train
from tfkarpa.data import detection as det_data
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

# COCOeval.stats, in order.
STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large",
         "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


@dataclass
class Detections:
    """One image's detections in its own pixels: xyxy boxes [n, 4], scores [n], classes [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def from_padded(cls, boxes, scores, classes, count, scale: float, height: int, width: int):
        """From a model's padded outputs at the letterboxed size: unscale and clip."""
        n = int(count)
        b = np.asarray(boxes[:n], np.float32) / scale
        b = np.clip(b, 0, [width, height, width, height]).astype(np.float32)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # wholly in the letterbox padding
        return cls(b[keep], np.asarray(scores[:n], np.float32)[keep],
                   np.asarray(classes[:n]).astype(np.int32)[keep])

    def to_json(self, class_names: list[str]) -> list[dict]:
        return [{"bbox": [round(float(v), 2) for v in b], "score": round(float(s), 5),
                 "class_id": int(c), "class_name": class_names[int(c)]}
                for b, s, c in zip(self.boxes, self.scores, self.classes)]


# ------------------------------------------------------------------------------ COCO metrics

def coco_ground_truth(truth: list[det_data.GroundTruth], class_names: list[str]) -> dict:
    """A COCO-format ground-truth document (category ids are class indices + 1)."""
    images, anns = [], []
    for i, t in enumerate(truth):
        images.append({"id": i + 1, "file_name": t.name, "height": t.height, "width": t.width})
        for box, cls in zip(t.boxes, t.classes):
            x0, y0, x1, y1 = (float(v) for v in box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "iscrowd": 0})
    return {"images": images, "annotations": anns,
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]}


def coco_results(detections: list[Detections], image_ids: list[int] | None = None) -> list[dict]:
    """Detections in the COCO results format ([x, y, w, h] boxes)."""
    out = []
    for i, d in enumerate(detections):
        image_id = image_ids[i] if image_ids else i + 1
        for box, score, cls in zip(d.boxes, d.scores, d.classes):
            x0, y0, x1, y1 = (float(v) for v in box)
            out.append({"image_id": image_id, "category_id": int(cls) + 1,
                        "bbox": [round(x0, 3), round(y0, 3), round(x1 - x0, 3), round(y1 - y0, 3)],
                        "score": round(float(score), 6)})
    return out


def coco_metrics(truth: list[det_data.GroundTruth], detections: list[Detections],
                 class_names: list[str]) -> dict:
    """pycocotools' COCOeval (bbox): the 12 standard numbers and AP per class.

    Values COCO cannot define (no object of that size, no class instance) are None.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(detections):
        raise ValueError(f"{len(truth)} images but {len(detections)} detection lists")
    results = coco_results(detections)
    gt = COCO()
    gt.dataset = coco_ground_truth(truth, class_names)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
        if not results:  # loadRes refuses an empty list; nothing detected scores 0
            return {**{k: 0.0 for k in STATS}, "per_class_ap": {n: 0.0 for n in class_names},
                    "images": len(truth), "detections": 0}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: (None if v < 0 else round(float(v), 5)) for k, v in zip(STATS, ev.stats)}
    # precision: [IoU thresholds, recall points, classes, area ranges, max dets]
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, name in enumerate(class_names):
        p = precision[:, :, k]
        per_class[name] = None if not np.any(p > -1) else round(float(np.mean(p[p > -1])), 5)
    return {**stats, "per_class_ap": per_class, "images": len(truth), "detections": len(results)}


def metrics_markdown(metrics: dict, title: str) -> str:
    show = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [f"# {title}", "", "| metric | value |", "|---|---|"]
    names = {"map": "mAP@[.5:.95]", "map50": "mAP@0.5", "map75": "mAP@0.75",
             "map_small": "mAP small", "map_medium": "mAP medium", "map_large": "mAP large",
             "ar100": "AR@100"}
    rows += [f"| {label} | {show(metrics.get(key))} |" for key, label in names.items()]
    rows += ["", f"{metrics['images']} images, {metrics['detections']} detections "
             "(pycocotools COCOeval, bbox)", "", "| class | AP@[.5:.95] |", "|---|---|"]
    rows += [f"| {name} | {show(ap)} |" for name, ap in metrics["per_class_ap"].items()]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------ prediction

class DetectionPredictor:
    """Detections from a run (Keras), a SavedModel or a TFLite file, in original pixels.

    Keras and TFLite models see letterboxed images (`padded_fn`: uint8 [B, S, S, 3] -> padded
    boxes, scores, classes, counts at the letterboxed size), undone here; the SavedModel takes
    the original image through its own serving signature (`image_fn`), exactly as its users do.
    """

    task = "detect"

    def __init__(self, kind: str, path, class_names: list[str], image_size: int, config,
                 padded_fn=None, image_fn=None, model=None, batch: int = 32):
        self.kind, self.path, self.class_names = kind, Path(path), list(class_names)
        self.image_size, self.config, self.model = image_size, config, model
        self.padded_fn, self.image_fn, self.batch = padded_fn, image_fn, batch

    def detect_image(self, image: np.ndarray) -> Detections:
        height, width = image.shape[:2]
        if self.image_fn is not None:
            return self.image_fn(image)
        boxed, scale = det_data.letterbox(tf.constant(image, tf.uint8), self.image_size)
        boxes, scores, classes, counts = self.padded_fn(boxed.numpy()[None])
        return Detections.from_padded(boxes[0], scores[0], classes[0], counts[0], float(scale),
                                      height, width)

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
            boxes, scores, classes, counts = self.padded_fn(images.numpy())
            for i, scale in enumerate(np.atleast_1d(scales.numpy())):
                t = next(truth)
                out.append(Detections.from_padded(boxes[i], scores[i], classes[i], counts[i],
                                                  float(scale), t.height, t.width))
                _progress(len(out), total)
        return out


def _progress(done: int, total: int, every: int = 500) -> None:
    if total >= 0 and (done % every == 0 or (done == total and total >= every)):
        log.info("detected %d / %d images", done, total)


def keras_padded_fn(model: tf.keras.Model, batch_size: int = 32):
    """A keras-cv detector's `predict` (raw outputs, then its NMS decoder) as a padded fn."""

    def predict(images: np.ndarray):
        out = model.predict(tf.cast(images, tf.float32), batch_size=batch_size, verbose=0)
        return out["boxes"], out["confidence"], out["classes"], out["num_detections"]

    return predict


# -------------------------------------------------------------------------------- pictures

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def draw(image: np.ndarray, detections: Detections | None, class_names: list[str],
         truth: det_data.GroundTruth | None = None, min_score: float = 0.3,
         upscale: int = 1) -> np.ndarray:
    """The image with ground truth (thin green) and detections (class colour, name and score)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(np.asarray(image, np.uint8))
    if upscale > 1:  # small images are unreadable at 1:1 with text on them
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    pen = ImageDraw.Draw(img)
    if truth is not None:
        for box in truth.boxes:
            pen.rectangle([float(v) * upscale for v in box], outline=(0, 255, 0), width=1)
    if detections is not None:
        for box, score, cls in zip(detections.boxes, detections.scores, detections.classes):
            if score < min_score:
                continue
            colour = _PALETTE[int(cls) % len(_PALETTE)]
            xy = [float(v) * upscale for v in box]
            pen.rectangle(xy, outline=colour, width=2)
            label = f"{class_names[int(cls)]} {score:.2f}"
            pen.text((xy[0] + 2, max(0, xy[1] - 11)), label, fill=colour)
    return np.asarray(img)


# ----------------------------------------------------------------------------- training

class CocoEvaluation(tf.keras.callbacks.Callback):
    """COCO mAP on the validation split in the epoch logs; drawn validation images.

    Runs on epochs `every`, 2*`every`, ..., and always on the first epoch of a session and on
    the last; other epochs log nothing for these keys (the CSV writes NA). Writes to
    TensorBoard's `validation` run.
    """

    def __init__(self, split: det_data.DetectionSplit, class_names: list[str], size: int,
                 epochs: int, every: int, log_dir: Path, draw_count: int, draw_score: float,
                 batch_size: int):
        super().__init__()
        self.split, self.class_names, self.size = split, class_names, size
        self.epochs, self.every = epochs, every
        self.log_dir, self.draw_count, self.draw_score = log_dir, draw_count, draw_score
        self.batch_size = batch_size
        self.writer = None
        self.first_of_session = True

    def on_epoch_end(self, epoch, logs=None):
        # Always on the first epoch of a session (a resumed one too): CSVLogger fixes its
        # columns then, and a key missing from them never reaches history.csv.
        due = self.first_of_session or epoch + 1 == self.epochs or (
            self.every and (epoch + 1) % self.every == 0)
        self.first_of_session = False
        if not due:
            return
        predictor = DetectionPredictor("keras", "", self.class_names, self.size, None,
                                       keras_padded_fn(self.model, self.batch_size))
        detections = predictor.detect_split(self.split, progress=False)
        metrics = coco_metrics(self.split.truth, detections, self.class_names)
        for key in ("map", "map50", "map75"):
            if logs is not None:
                logs[f"val_{key}"] = metrics[key] or 0.0
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(self.log_dir / "validation"))
        with self.writer.as_default():
            for name, ap in metrics["per_class_ap"].items():
                if ap is not None:
                    tf.summary.scalar(f"class_ap/{name}", ap, step=epoch)
            if self.draw_count:
                pictures = self._pictures(detections)
                tf.summary.image("detections (green: truth)", pictures, step=epoch,
                                 max_outputs=len(pictures))
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _pictures(self, detections: list[Detections]) -> np.ndarray:
        count = min(self.draw_count, self.split.num_examples)
        images, scales = det_data.images_of(self.split, self.size, count)
        upscale = max(1, 256 // self.size)
        out = []
        for image, scale, truth, found in zip(images, scales, self.split.truth, detections):
            # Draw on the letterboxed image: boxes back at its scale.
            at_input = Detections(found.boxes * scale, found.scores, found.classes)
            truth_at_input = det_data.GroundTruth(truth.name, self.size, self.size,
                                                  truth.boxes * scale, truth.classes)
            out.append(draw(image, at_input, self.class_names, truth_at_input, self.draw_score,
                            upscale))
        return np.stack(out)


def write_eval(metrics: dict, detections: list[Detections], truth: list[det_data.GroundTruth],
               class_names: list[str], out_dir: Path, title: str, skipped: list[str] = ()) -> dict:
    """metrics.json, report.md and detections.json (COCO results) into `out_dir`, atomically.
    `skipped`: annotations left out at load (data.skip_bad), counted and listed in the report."""
    report = metrics_markdown(metrics, title)
    if skipped:
        report += (f"\n{len(skipped)} bad annotation(s) were left out of the data "
                   "(data.skip_bad=true):\n\n" + "".join(f"- {s}\n" for s in skipped[:50]))
        if len(skipped) > 50:
            report += f"- ... and {len(skipped) - 50} more (manifest.json lists them all)\n"
    with runs.atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({**metrics, "skipped_annotations":
                                                      len(skipped)}, indent=2))
        (tmp / "report.md").write_text(report)
        doc = coco_results(detections)
        names = {i + 1: t.name for i, t in enumerate(truth)}
        for row in doc:
            row["file_name"] = names[row["image_id"]]
        (tmp / "detections.json").write_text(json.dumps(doc))
    return {"metrics": str(out_dir / "metrics.json"), "report": str(out_dir / "report.md"),
            "detections": str(out_dir / "detections.json")}


def check_close(expected: dict, got: dict, what: str, tolerance: float = 0.01) -> dict:
    """Refuse an export whose mAP falls more than `tolerance` below the Keras model's."""
    gaps = {k: round((expected[k] or 0.0) - (got[k] or 0.0), 5) for k in ("map", "map50")}
    if max(gaps.values()) > tolerance:
        raise TfkarpaError(f"{what}: validation mAP drops by {gaps} against the Keras model "
                           f"(allowed {tolerance}); the export was not written")
    return gaps


def empty_like(n: int) -> list[Detections]:
    return [Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                       np.zeros(0, np.int32)) for _ in range(n)]


# -------------------------------------------------------------------------------- export

SAVED_MODEL_FORMAT = "tfkarpa-detector-saved-model/1"
TFLITE_FORMAT = "tfkarpa-detector-tflite/1"
TFLITE_MODES = ("none", "fp16", "dynamic", "int8")


class DetectServing(tf.Module):
    """The detector with its letterbox, decoder and NMS, in the input image's pixels."""

    def __init__(self, model: tf.keras.Model, class_names: list[str], image_size: int):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(list(class_names))
        self.image_size = image_size

    def detect_letterboxed(self, boxed):
        """uint8 [B, S, S, 3] -> padded boxes (letterboxed pixels), scores, classes, counts."""
        x = tf.cast(boxed, tf.float32)
        out = self.model.decode_predictions(self.model(x, training=False), x)
        return out["boxes"], out["confidence"], out["classes"], out["num_detections"]

    def _final(self, boxed, scales, heights, widths):
        boxes, scores, classes, count = self.detect_letterboxed(boxed)
        valid = tf.sequence_mask(count, tf.shape(boxes)[1])
        size = tf.cast(tf.stack([widths, heights, widths, heights], -1), tf.float32)[:, None, :]
        boxes = tf.minimum(tf.maximum(boxes / scales[:, None, None], 0.0), size)
        classes = tf.where(valid, tf.cast(classes, tf.int32), -1)
        return {
            "boxes": tf.where(valid[..., None], boxes, 0.0),  # xyxy, input image pixels
            "scores": tf.where(valid, scores, 0.0),
            "classes": classes,
            "class_names": tf.where(valid, tf.gather(self.class_names, tf.maximum(classes, 0)), ""),
            "num_detections": tf.cast(count, tf.int32),
        }

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


def _saved_model_image_fn(signature):
    def detect(image: np.ndarray) -> Detections:
        out = signature(images=tf.constant(image[None], tf.uint8))
        n = int(out["num_detections"][0])
        return Detections(out["boxes"][0, :n].numpy(), out["scores"][0, :n].numpy(),
                          out["classes"][0, :n].numpy().astype(np.int32))

    return detect


def export_saved_model(model: tf.keras.Model, class_names: list[str], image_size: int,
                       path: str | Path, check: det_data.DetectionSplit, reference: dict,
                       metadata: dict | None = None) -> dict:
    """Write a SavedModel whose signatures return final boxes, after checking that its mAP on
    `check` is within a point of `reference` (the Keras model's). Atomic."""
    path = Path(path)
    module = DetectServing(model, class_names, image_size)
    with runs.atomic_dir(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={
            "serving_default": module.serve_images, "serve_bytes": module.serve_bytes})
        loaded = tf.saved_model.load(str(tmp))
        predictor = DetectionPredictor("saved_model", tmp, class_names, image_size, None,
                                       image_fn=_saved_model_image_fn(
                                           loaded.signatures["serving_default"]))
        got = coco_metrics(check.truth, predictor.detect_split(check), class_names)
        gaps = check_close(reference, got, f"SavedModel export to '{path}'")
        info = {"format": SAVED_MODEL_FORMAT, "task": "detect", "class_names": list(class_names),
                "image_size": image_size, "box_format": "xyxy (input image pixels)",
                "check": {"images": check.num_examples, "keras_map": reference["map"],
                          "export_map": got["map"], "keras_map50": reference["map50"],
                          "export_map50": got["map50"], "gap": gaps},
                **(metadata or {})}
        (tmp / "tfkarpa.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "labels.txt").write_text("\n".join(class_names) + "\n")
    log.info("exported detector SavedModel to %s (val mAP %.4f, Keras %.4f)", path, got["map"],
             reference["map"])
    return info["check"]


def tflite_bytes(model: tf.keras.Model, image_size: int, mode: str,
                 representative: np.ndarray | None = None) -> bytes:
    """A TFLite detector from uint8 [1, S, S, 3] letterboxed images to padded `boxes` (xyxy,
    letterboxed pixels), `scores`, `classes`, `num_detections`, decoding and NMS included
    (keras-cv's NMS is built of TFLite built-in ops). int8 quantizes the network, calibrated on
    `representative`; decoding and NMS stay float."""
    if mode not in TFLITE_MODES:
        raise TfkarpaError(f"detectors export TFLite in {', '.join(TFLITE_MODES)}, not '{mode}'")
    module = DetectServing(model, ["-"], image_size)

    @tf.function(input_signature=[tf.TensorSpec([1, image_size, image_size, 3], tf.uint8,
                                                name="images")])
    def detect(images):
        boxes, scores, classes, count = module.detect_letterboxed(images)
        return {"boxes": boxes, "scores": scores, "classes": tf.cast(classes, tf.float32),
                "num_detections": tf.cast(count, tf.float32)}

    def converter():
        return tf.lite.TFLiteConverter.from_concrete_functions(
            [detect.get_concrete_function()], module)

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
    names = _tensor_names(converter().convert())
    network = f"{model.name}/"
    keep_float = [n for n in names if (not n.startswith(network) or _MERGES.search(n))
                  and not n.startswith("serving_default_")]
    # The NMS loop's body is a separate subgraph whose tensors the names above do not list:
    # its ops are kept float by type.
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float,
                                                            denylisted_ops=list(_LOOP_OPS))
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=samples, debug_options=options)
    return debugger.get_nondebug_quantized_model()


_LOOP_OPS = ("WHILE", "DIV")
# Head tensors that join box regression logits and class probabilities (YOLOv8's per-level
# concat, reshape and slices) or produce them: kept float in int8 files.
_MERGES = re.compile(r"concat|reshape|getitem|classifier|head_\d_(box|class)_3_conv", re.I)


def _tensor_names(content: bytes) -> list[str]:
    from ai_edge_litert.interpreter import Interpreter

    return [t["name"] for t in Interpreter(model_content=content).get_tensor_details()]


class TFLiteDetector:
    """Run a detector .tflite with the LiteRT interpreter, one image at a time."""

    def __init__(self, content: bytes, num_threads: int = 2):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner()

    def __call__(self, images: np.ndarray):
        outs = [self.runner(images=np.asarray(image, np.uint8)[None]) for image in images]
        stack = lambda key: np.concatenate([o[key] for o in outs])  # noqa: E731
        return (stack("boxes"), stack("scores"), stack("classes").astype(np.int32),
                stack("num_detections").astype(np.int32))


def export_tflite(model: tf.keras.Model, class_names: list[str], image_size: int, path,
                  mode: str, representative: np.ndarray | None, check: det_data.DetectionSplit,
                  reference: dict, metadata: dict | None = None) -> dict:
    """Convert, check the file's mAP on `check` against `reference` with LiteRT, write atomically."""
    from tfkarpa.export import embed_metadata

    path = Path(path)
    content = tflite_bytes(model, image_size, mode, representative)
    runner = TFLiteDetector(content)
    predictor = DetectionPredictor("tflite", path, class_names, image_size, None, runner, batch=16)
    got = coco_metrics(check.truth, predictor.detect_split(check), class_names)
    gaps = check_close(reference, got, f"TFLite export '{path}' ({mode})")
    figures = {"images": check.num_examples, "keras_map": reference["map"], "export_map": got["map"],
               "keras_map50": reference["map50"], "export_map50": got["map50"], "gap": gaps,
               "bytes": len(content)}
    info = {"format": TFLITE_FORMAT, "task": "detect", "class_names": list(class_names),
            "image_size": image_size, "quantize": mode, "check": figures,
            "input": "uint8 [1, S, S, 3], letterboxed: scale = S / max(height, width), image at "
                     "the top left, zero padding",
            "outputs": "boxes xyxy in letterboxed pixels (divide by scale), scores, classes, "
                       "num_detections", **(metadata or {})}
    runs.atomic_write_bytes(path, embed_metadata(content, info))
    log.info("exported detector TFLite (%s) to %s, %d bytes (val mAP %.4f, Keras %.4f)", mode, path,
             len(content), got["map"], reference["map"])
    return figures


# ---------------------------------------------------------------------------------- the task

def load_backbone(detector: tf.keras.Model, run_dir: str | Path, detector_name: str,
                  freeze: bool) -> None:
    """Start a detector's backbone from a classification or SimCLR run of the same backbone."""
    import yaml

    from tfkarpa import config as config_lib
    from tfkarpa import contrastive, infer
    from tfkarpa.models import build_classifier, detectors

    path = Path(run_dir)
    try:
        stored = yaml.safe_load((path / "config.yaml").read_text())
    except FileNotFoundError:
        raise TfkarpaError(f"backbone '{path}' is not a run directory (no config.yaml)") from None
    run_cfg = config_lib.build(base=stored)
    wanted = detectors.backbone_of(detector_name)
    if run_cfg.task not in ("classify", "pretrain") or run_cfg.model.name != wanted:
        raise TfkarpaError(f"backbone '{path}' is a {run_cfg.task} run of {run_cfg.model.name}; "
                           f"{detector_name} starts from a classify or pretrain run of {wanted}")
    if not (path / "checkpoints" / "final.weights.h5").exists():
        raise TfkarpaError(f"backbone run '{path}' has not finished (no final.weights.h5)")
    shape = (run_cfg.data.image_size, run_cfg.data.image_size, 3)
    if run_cfg.task == "pretrain":
        classifier = build_classifier(dataclasses.replace(run_cfg.model, weights=""), shape, 2)
        contrastive.load_encoder_into(classifier, path, freeze=False)
    else:
        classes = json.loads((path / "manifest.json").read_text())["data"]["classes"]
        classifier = infer.load_run_model(path, run_cfg, len(classes))
    inner = [layer for layer in classifier.layers if isinstance(layer, tf.keras.Model)]
    backbone = detector.backbone
    try:
        backbone.set_weights(inner[0].get_weights())
    except (IndexError, ValueError) as err:
        raise TfkarpaError(f"cannot put the backbone of '{path}' into {detector_name}: {err}") from None
    if freeze:
        backbone.trainable = False
    log.info("detector backbone from %s%s", path, " (frozen)" if freeze else "")


class DetectTask(train.Task):
    """Train a keras-cv detector; deliver test-split COCO metrics and a checked SavedModel."""

    def check_model(self, cfg) -> None:
        from tfkarpa.models import detectors

        detectors.check_name(cfg.model.name)
        detectors.check_input(cfg.model.name, (cfg.data.image_size,) * 2)

    def load_data(self, cfg) -> det_data.DetectionData:
        if cfg.data.labels != "100%":
            raise TfkarpaError("data.labels (label budgets) applies to classification, not "
                               "task=detect")
        return det_data.load(cfg.data, cfg.seed)

    def check(self, cfg, data) -> None:
        if cfg.stages or cfg.qat or cfg.distill.teacher:
            raise TfkarpaError("task=detect does not take compression stages, qat or "
                               "distill.teacher (compress classifiers; export detectors to int8 "
                               "TFLite with `export quantize=int8`)")
        if cfg.strategy in ("multi_worker", "tpu"):
            raise TfkarpaError(f"task=detect runs on one machine (strategy default, one_device or "
                               f"mirrored), not {cfg.strategy}: keras-cv's detectors pad boxes "
                               "per batch and their label encoder is not checked across workers")
        if cfg.freeze_backbone and not cfg.backbone:
            raise TfkarpaError("freeze_backbone=true needs backbone=RUN")
        for name in ("val", "test"):
            if data.splits[name].num_examples == 0:
                raise TfkarpaError(f"{data.source}: the {name} split is empty; raise "
                                   f"data.{name}_fraction or add images")

    def build(self, cfg, data, placement, run_, steps):
        from tfkarpa.models import detectors

        boxes = det_data.max_boxes(data, cfg)
        size = cfg.data.image_size
        train_ds = det_data.make_dataset(data.splits["train"], cfg, True, boxes,
                                         workers=placement.workers)
        val_ds = det_data.make_dataset(data.splits["val"], cfg, False, boxes,
                                       workers=placement.workers)
        model = detectors.build_detector(cfg.model, cfg.detect, (size, size, 3), data.num_classes)
        if cfg.backbone:
            load_backbone(model, cfg.backbone, cfg.model.name, cfg.freeze_backbone)
        optimizer = train.make_optimizer(cfg.optimizer, cfg.epochs, steps, cfg.batch_size)
        if cfg.model.name.startswith("yolov8"):
            model.compile(optimizer=optimizer, box_loss=cfg.detect.box_loss,
                          classification_loss="binary_crossentropy", jit_compile=cfg.xla)
        else:
            model.compile(optimizer=optimizer, box_loss="smoothl1", classification_loss="focal",
                          jit_compile=cfg.xla)
        images, targets = next(iter(det_data.make_dataset(data.splits["train"], cfg, True, boxes,
                                                          batch_size=16).take(1)))
        sample = np.stack([
            draw(np.clip(image, 0, 255).astype(np.uint8), None, data.class_names,
                 det_data.GroundTruth("", size, size, b[c >= 0], c[c >= 0].astype(np.int32)),
                 upscale=max(1, 128 // size))
            for image, b, c in zip(images.numpy(), targets["boxes"].numpy(),
                                   targets["classes"].numpy())])
        evaluation = CocoEvaluation(data.splits["val"], data.class_names, size, cfg.epochs,
                                    cfg.detect.eval_every, run_.logs, cfg.detect.draw_images,
                                    cfg.detect.draw_score, cfg.batch_size)
        return train.FitParts(model, model, train_ds, val_ds, sample, monitor="val_map",
                              callbacks=[evaluation], extra={"boxes": boxes})

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        from tfkarpa import export as export_lib

        model = parts.net
        final = train.save_final(model, run_)
        size = cfg.data.image_size
        predictor = DetectionPredictor("keras", run_.dir, data.class_names, size, cfg,
                                       keras_padded_fn(model, cfg.batch_size))
        test_split = data.splits["test"]
        found = predictor.detect_split(test_split)
        test = coco_metrics(test_split.truth, found, data.class_names)
        out = run_.dir / "eval" / "test"
        files = write_eval(test, found, test_split.truth, data.class_names, out,
                           f"{run_.name}: test split", data.skipped)
        pictures = write_pictures(test_split, found, data.class_names, out / "images",
                                  cfg.detect.draw_images, cfg.detect.draw_score)
        metrics = {"test_map": test["map"], "test_map50": test["map50"],
                   "test_map75": test["map75"], "test_map_small": test["map_small"],
                   "test_map_medium": test["map_medium"], "test_map_large": test["map_large"],
                   "best_val_map": max(hist.get("val_map", [float("nan")])),
                   "params": int(model.count_params())}
        artifacts = {"final_weights": str(final), "test_report": files["report"],
                     "test_detections": files["detections"], "test_images": pictures}
        if cfg.export:
            val = data.splits["val"]
            reference = coco_metrics(val.truth, predictor.detect_split(val), data.class_names)
            check = export_saved_model(model, data.class_names, size, export_dir, val, reference,
                                       export_lib.artifact_metadata(run_.dir, cfg))
            metrics.update({"val_map_keras": check["keras_map"],
                            "val_map_saved_model": check["export_map"]})
            artifacts["saved_model"] = str(export_dir)
        return metrics, artifacts


def write_pictures(split: det_data.DetectionSplit, found: list[Detections],
                   class_names: list[str], out_dir: Path, count: int, min_score: float) -> str:
    """PNGs of the first `count` images with truth and detections drawn, written atomically."""
    from PIL import Image

    with runs.atomic_dir(out_dir) as tmp:
        for i, (item, truth, detections) in enumerate(zip(split.make().take(count), split.truth,
                                                            found)):
            image = item[0].numpy()
            upscale = max(1, 256 // max(image.shape[:2]))
            picture = draw(image, detections, class_names, truth, min_score, upscale)
            Image.fromarray(picture).save(tmp / f"{i:03d}.png")
    return str(out_dir)


# ------------------------------------------------------------------- artifacts: load, use

def load_run_detector(run_dir: Path, cfg, num_classes: int) -> tf.keras.Model:
    """A detection run's model with its final (else best, else last) weights."""
    from tfkarpa.models import detectors

    checkpoints = Path(run_dir) / "checkpoints"
    for name in ("final.weights.h5", "best.weights.h5", "last.weights.h5"):
        if (checkpoints / name).exists():
            break
    else:
        raise TfkarpaError(f"run '{run_dir}' has no checkpoint yet (checkpoints/*.weights.h5); "
                           "train it first")
    size = cfg.data.image_size
    model = detectors.build_detector(cfg.model, cfg.detect, (size, size, 3), num_classes)
    model.load_weights(str(checkpoints / name))
    return model


def run_predictor(run_dir: Path, cfg, class_names: list[str]) -> DetectionPredictor:
    model = load_run_detector(run_dir, cfg, len(class_names))
    return DetectionPredictor("keras", run_dir, class_names, cfg.data.image_size, cfg,
                              keras_padded_fn(model, cfg.batch_size), model=model)


def saved_model_predictor(path: Path, loaded, meta: dict, cfg) -> DetectionPredictor:
    return DetectionPredictor("saved_model", path, meta["class_names"], int(meta["image_size"]),
                              cfg, image_fn=_saved_model_image_fn(loaded.signatures["serving_default"]))


def tflite_predictor(path: Path, content: bytes, meta: dict, cfg) -> DetectionPredictor:
    return DetectionPredictor("tflite", path, meta["class_names"], int(meta["image_size"]), cfg,
                              TFLiteDetector(content), batch=16)


def evaluate_artifact(predictor: DetectionPredictor, split_name: str, out_dir: Path | None,
                      data: det_data.DetectionData | None = None,
                      tensorboard_dir: Path | None = None) -> dict:
    """COCO metrics of a run, SavedModel or TFLite file on a split of the data it was trained
    on; reports, COCO-format detections and pictures into `out_dir`."""
    cfg = predictor.config
    if split_name not in ("train", "val", "test"):
        raise TfkarpaError(f"split '{split_name}' is not one of train, val, test")
    data = data or det_data.load(cfg.data, cfg.seed)
    if list(data.class_names) != list(predictor.class_names):
        raise TfkarpaError(f"{data.source} names its classes {', '.join(data.class_names[:5])} "
                           f"but the model at '{predictor.path}' predicts "
                           f"{', '.join(predictor.class_names[:5])}; evaluate it on its own data")
    split = data.splits[split_name]
    log.info("evaluating %s (%s) on %d %s images of %s", predictor.path, predictor.kind,
             split.num_examples, split_name, data.source)
    found = predictor.detect_split(split)
    metrics = coco_metrics(split.truth, found, data.class_names)
    metrics.update({"split": split_name, "source": data.source, "artifact": str(predictor.path),
                    "artifact_kind": predictor.kind})
    if out_dir is not None:
        title = f"{predictor.path.name} ({predictor.kind}) on {data.source} / {split_name}"
        write_eval(metrics, found, split.truth, data.class_names, Path(out_dir), title,
                   data.skipped)
        write_pictures(split, found, data.class_names, Path(out_dir) / "images",
                       cfg.detect.draw_images, cfg.detect.draw_score)
    if tensorboard_dir is not None:
        writer = tf.summary.create_file_writer(str(tensorboard_dir))
        with writer.as_default():
            for key in ("map", "map50", "map75"):
                tf.summary.scalar(f"{split_name}/{key}", metrics[key] or 0.0, step=0)
        writer.close()
    return metrics


def predict_files(predictor: DetectionPredictor, inputs: list[str], out_dir: Path,
                  min_score: float) -> list[dict]:
    """Detections for image files: `detections.json` (COCO results format, with file names) and
    one annotated PNG per image in `out_dir`, written atomically. Returns one entry per image."""
    from PIL import Image

    from tfkarpa.infer import decode_file, image_files

    files = image_files(inputs)
    results, coco = [], []
    with runs.atomic_dir(out_dir) as tmp:
        for i, file in enumerate(files):
            image = decode_file(file)
            found = predictor.detect_image(image)
            keep = found.scores >= min_score
            found = Detections(found.boxes[keep], found.scores[keep], found.classes[keep])
            picture = draw(image, found, predictor.class_names, None, min_score,
                           max(1, 256 // max(image.shape[:2])))
            name = f"{i:04d}-{file.stem}.png"
            Image.fromarray(picture).save(tmp / name)
            for row in coco_results([found], [i + 1]):
                coco.append({**row, "file_name": str(file)})
            results.append({"image": str(file), "height": int(image.shape[0]),
                            "width": int(image.shape[1]), "annotated": str(out_dir / name),
                            "detections": found.to_json(predictor.class_names)})
        (tmp / "detections.json").write_text(json.dumps(coco))
    return results


def export_run(run_dir: str | Path, formats, quantize, out_dir, representative: int) -> dict:
    """Export a detection run: SavedModel and TFLite variants, each checked on the validation
    split's mAP against the Keras model (within 1 point) before it is written."""
    from tfkarpa import export as export_lib
    from tfkarpa.infer import load_predictor

    bad = [q for q in quantize if q not in TFLITE_MODES]
    if "tflite" in formats and bad:
        raise TfkarpaError(f"detectors export TFLite in {', '.join(TFLITE_MODES)}, not '{bad[0]}'")
    predictor = load_predictor(run_dir)
    cfg, model = predictor.config, predictor.model
    name = Path(run_dir).resolve().name
    out = Path(out_dir or "saved_models")
    runs.ensure_writable(out, "export out")
    data = det_data.load(cfg.data, cfg.seed)
    val = data.splits["val"]  # the whole split: mAP on a handful of images says little
    reference = coco_metrics(val.truth, predictor.detect_split(val), data.class_names)
    meta = export_lib.artifact_metadata(run_dir, cfg)
    artifacts, checks = {}, {}
    if "saved_model" in formats:
        checks["saved_model"] = export_saved_model(model, data.class_names, cfg.data.image_size,
                                                   out / name, val, reference, meta)
        artifacts["saved_model"] = str(out / name)
    if "tflite" in formats:
        calibration = None
        if "int8" in quantize:
            calibration, _ = det_data.images_of(data.splits["train"], cfg.data.image_size,
                                                representative)
        for mode in quantize:
            path = out / f"{name}.{mode}.tflite"
            checks[f"tflite_{mode}"] = export_tflite(
                model, data.class_names, cfg.data.image_size, path, mode, calibration, val,
                reference, {**meta, "representative_images": representative if mode == "int8" else 0})
            artifacts[f"tflite_{mode}"] = str(path)
    return {"artifacts": artifacts, "checks": checks, "reference": reference}

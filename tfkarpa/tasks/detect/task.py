"""Object detection on the core: the task object the fit loop and the artifact commands call.

`DetectTask` trains a detector (`models.detectors`: keras-cv's YOLOv8 and RetinaNet, our Faster
and Cascade R-CNN) on a detection source (`data.detection`). Every `detect.eval_every` epochs
`CocoEvaluation` runs the model over the validation split, scores it with pycocotools
(`metrics`) and puts `val_map`, `val_map50`, `val_map75` into the epoch logs, where the
checkpoint callback (best = highest `val_map`), the CSV history and TensorBoard see them; it
also draws validation images with ground truth (green) and predictions (coloured by class), and
a two-stage model's proposals, for TensorBoard. Evaluation always happens in the original
image's pixels: detections from the letterboxed model input are divided by the letterbox scale
and clipped to the image. Predictors are in `predict`, exports in `serving`. Models with a mask
head (task=segment, a subclass) add mask mAP (`val_mask_map`, ...) everywhere boxes are scored.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import runs
from tfkarpa.core.artifacts import open_artifact
from tfkarpa.core.auto import AutoRules, Transfer
from tfkarpa.core.export import artifact_metadata
from tfkarpa.core.fit import save_final
from tfkarpa.core.optim import make_optimizer
from tfkarpa.core.task import FitParts, Task
from tfkarpa.data import detection as det_data
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import build_classifier, detectors
from tfkarpa.tasks.classify.predict import load_run_model
from tfkarpa.tasks.detect import report
from tfkarpa.tasks.detect.draw import draw, write_pictures
from tfkarpa.tasks.detect.metrics import Detections, coco_metrics, write_eval
from tfkarpa.tasks.detect.predict import (DetectionPredictor, keras_padded_fn, load_predictor,
                                          load_run_detector, local_padded_fn, predict_command)
from tfkarpa.tasks.detect.serving import export_run, export_saved_model
from tfkarpa.tasks.pretrain.task import load_encoder_into

log = logging.getLogger(__name__)

# The test split's numbers a run records: boxes, and masks from models with a mask head.
TEST_KEYS = tuple(f"{kind}{key}" for kind in ("", "mask_")
                  for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large"))


class CocoEvaluation(tf.keras.callbacks.Callback):
    """COCO mAP on the validation split in the epoch logs; drawn validation images.

    Runs on epochs `every`, 2*`every`, ..., and always on the first epoch of a session and on
    the last; other epochs log nothing for these keys (the CSV writes NA). Writes to
    TensorBoard's `validation` run.
    """

    def __init__(self, split: det_data.DetectionSplit, class_names: list[str], size: int,
                 epochs: int, every: int, log_dir: Path, draw_count: int, draw_score: float,
                 batch_size: int, local: bool = False):
        super().__init__()
        self.split, self.class_names, self.size = split, class_names, size
        self.epochs, self.every = epochs, every
        self.log_dir, self.draw_count, self.draw_score = log_dir, draw_count, draw_score
        self.batch_size = batch_size
        # Under multi-worker strategies `model.predict` is a distributed call whose outputs stay
        # on each worker: every worker scores the whole split with plain local calls instead.
        self.local = local
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
        padded_fn = (local_padded_fn(self.model) if self.local
                     else keras_padded_fn(self.model, self.batch_size))
        predictor = DetectionPredictor("keras", "", self.class_names, self.size, None, padded_fn)
        detections = predictor.detect_split(self.split, progress=False)
        metrics = coco_metrics(self.split.truth, detections, self.class_names)
        for key in ("map", "map50", "map75", "mask_map", "mask_map50", "mask_map75"):
            if logs is not None and key in metrics:  # mask_*: models with a mask head
                logs[f"val_{key}"] = metrics[key] or 0.0
        if self.writer is None:
            self.writer = tf.summary.create_file_writer(str(self.log_dir / "validation"))
        with self.writer.as_default():
            for name, ap in metrics["per_class_ap"].items():
                if ap is not None:
                    tf.summary.scalar(f"class_ap/{name}", ap, step=epoch)
            for name, ap in metrics.get("mask_per_class_ap", {}).items():
                if ap is not None:
                    tf.summary.scalar(f"class_mask_ap/{name}", ap, step=epoch)
            if self.draw_count:
                pictures = self._pictures(detections)
                tf.summary.image("detections (green: truth)", pictures, step=epoch,
                                 max_outputs=len(pictures))
                if hasattr(self.model, "proposal_boxes"):  # a two-stage model: its RPN too
                    pictures = self._proposals()
                    tf.summary.image("proposals (top 10, green: truth)", pictures, step=epoch,
                                     max_outputs=len(pictures))
        self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _proposals(self) -> np.ndarray:
        """The region proposal network's 10 best boxes on the first validation images."""
        count = min(self.draw_count, self.split.num_examples)
        images, scales = det_data.images_of(self.split, self.size, count)
        boxes, objectness = (t.numpy() for t in self.model.proposal_boxes(
            tf.cast(images, tf.float32)))
        upscale = max(1, 256 // self.size)
        return np.stack([
            draw(image, Detections(b, s, np.zeros(len(s), np.int32)), ["proposal"],
                 det_data.GroundTruth(truth.name, self.size, self.size, truth.boxes * scale,
                                      truth.classes), 0.0, upscale)
            for image, scale, truth, b, s in zip(images, scales, self.split.truth, boxes,
                                                 objectness)])

    def _pictures(self, detections: list[Detections]) -> np.ndarray:
        count = min(self.draw_count, self.split.num_examples)
        images, scales = det_data.images_of(self.split, self.size, count)
        upscale = max(1, 256 // self.size)
        out = []
        for image, scale, truth, found in zip(images, scales, self.split.truth, detections):
            # Draw on the letterboxed image: boxes back at its scale.
            # Masks are in the image's pixels: drawn where the letterbox did not rescale it.
            at_input = Detections(found.boxes * scale, found.scores, found.classes,
                                  found.masks if abs(scale - 1.0) < 1e-6 else None)
            truth_at_input = det_data.GroundTruth(truth.name, self.size, self.size,
                                                  truth.boxes * scale, truth.classes)
            out.append(draw(image, at_input, self.class_names, truth_at_input, self.draw_score,
                            upscale))
        return np.stack(out)


def load_backbone(detector: tf.keras.Model, run_dir: str | Path, detector_name: str,
                  freeze: bool) -> None:
    """Start a detector's backbone from a classification or SimCLR run of the same backbone."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise TfkarpaError(f"backbone '{path}' is not a run directory (no config.yaml)")
    run_cfg = runs.read_config(path)
    wanted = detectors.backbone_of(detector_name)
    if run_cfg.task not in ("classify", "pretrain") or run_cfg.model.name != wanted:
        raise TfkarpaError(f"backbone '{path}' is a {run_cfg.task} run of {run_cfg.model.name}; "
                           f"{detector_name} starts from a classify or pretrain run of {wanted}")
    if not (path / "checkpoints" / "final.weights.h5").exists():
        raise TfkarpaError(f"backbone run '{path}' has not finished (no final.weights.h5)")
    shape = (run_cfg.data.image_size, run_cfg.data.image_size, 3)
    if run_cfg.task == "pretrain":
        classifier = build_classifier(dataclasses.replace(run_cfg.model, weights=""), shape, 2)
        load_encoder_into(classifier, path, freeze=False)
    else:
        classifier = load_run_model(path, run_cfg, len(runs.class_names(path)))
    inner = [layer for layer in classifier.layers if isinstance(layer, tf.keras.Model)]
    backbone = detector.backbone
    try:
        backbone.set_weights(inner[0].get_weights())
    except (IndexError, ValueError) as err:
        raise TfkarpaError(f"cannot put the backbone of '{path}' into {detector_name}: {err}") from None
    if freeze:
        backbone.trainable = False
    log.info("detector backbone from %s%s", path, " (frozen)" if freeze else "")


class DetectTask(Task):
    """Train a detector; deliver test-split COCO metrics and a checked SavedModel."""

    name = "detect"
    key_metric = "test_map"
    val_metric = "val_map"
    default_recipe = "shapes_yolov8"  # the classification defaults do not fit a detector
    data_recipe = "detect"  # any other source: sizes chosen from the data
    # Inputs are letterboxed to a multiple of the coarsest stride (32). 48,000 images seen: 150
    # epochs of a 320-image set, which reached val mAP@0.5 0.91 by epoch 110 at 96 px; light
    # augmentation for small sets, as mosaic (strong) learnt several times slower there (0.24
    # against 0.65 after 80 epochs at 64 px); none for large ones, as shapes_yolov8 measured.
    # Measured in benchmarks/user_data.py.
    # model=auto (the recipe for your own data): under 2,000 training images YOLOv8 on
    # EfficientNet-Lite0 from its ImageNet weights, about 9,600 images seen (600 steps of 16),
    # at least 5 epochs; from 2,000 images YOLOv8-xxs from scratch as above. On 200 scenes of
    # real photographs (benchmarks/detection_transfer.py, 600 steps each, 2 seeds) it reached
    # test mAP@0.5 0.81 where scratch reached 0.40, the whole command taking 1.6-1.8 times as
    # long. Input side at most 192: the largest of 256/192/160 whose 600 steps fit 15 minutes
    # on a 2-core CPU (rule fixed before timing; 13 steps and validation took 30 s at 256
    # and 18 s at 192: 600 steps about 23 and 14 minutes).
    auto = AutoRules(min_size=64, max_size=256, stride=32, samples=48_000, min_epochs=20,
                     max_epochs=300, small_data=2000, small_augment="light",
                     large_augment="off",
                     transfer=Transfer(model="yolov8_lite0", scratch="yolov8_xxs", below=2000,
                                       min_size=64, max_size=192, samples=9_600, lr=0.002,
                                       scratch_lr=0.002, min_epochs=5))
    # ONNX files are the TFLite graphs converted (NMS inside) and written only when they
    # return the TFLite file's detections (`metrics.check_same`): mAP alone passed an int8
    # YOLOv8 file returning 3 detections per image where the TFLite file returns 100.
    formats = ("saved_model", "tflite")  # and every format converted from TFLite (ONNX)
    default_quantize = ("none", "dynamic")  # full int8 costs a detector more than the 1-point check allows

    # ---- training
    def check_model(self, cfg) -> None:
        if cfg.data.mix != "off" or cfg.model.drop_path or cfg.adversarial.method != "off":
            raise TfkarpaError("data.mix, model.drop_path and adversarial training are for "
                               "classifiers, not task=detect")
        if cfg.model.name == "auto":  # chosen from the data, then checked again
            return
        detectors.check_name(cfg.model.name)
        if detectors.has_masks(cfg.model.name):
            raise TfkarpaError(f"config key 'model.name': {cfg.model.name} segments instances; "
                               "train it with task=segment (its data needs masks)")
        detectors.check_input(cfg.model.name, (cfg.data.image_size,) * 2)

    def load_data(self, cfg) -> det_data.DetectionData:
        if cfg.data.labels != "100%":
            raise TfkarpaError("data.labels (label budgets) applies to classification, not "
                               "task=detect")
        return det_data.load(cfg.data, cfg.seed)

    def check(self, cfg, data) -> None:
        if cfg.stages or cfg.qat or cfg.distill.teacher:
            raise TfkarpaError(f"task={self.name} does not take compression stages, qat or "
                               "distill.teacher (compress classifiers; export detectors to int8 "
                               "TFLite with `export quantize=int8`)")
        if cfg.strategy == "tpu":
            raise TfkarpaError(f"task={self.name} does not run on TPUs: keras-cv's detectors "
                               "pad boxes per batch (ragged shapes); use one_device, mirrored or "
                               "multi_worker")
        if cfg.freeze_backbone and not cfg.backbone:
            raise TfkarpaError("freeze_backbone=true needs backbone=RUN")
        for name in ("val", "test"):
            if data.splits[name].num_examples == 0:
                raise TfkarpaError(f"{data.source}: the {name} split is empty; raise "
                                   f"data.{name}_fraction or add images")
        tiny = det_data.tiny_boxes(data, cfg.data.image_size)
        if sum(tiny["count"].values()):
            data.tiny_boxes = tiny  # into manifest.json with the data summary
            log.warning("%s: %d box(es) are under %g px at data.image_size=%d once letterboxed "
                        "and are left out of training (first: %s); manifest.json lists them",
                        data.source, sum(tiny["count"].values()), det_data.MIN_BOX_SIDE,
                        cfg.data.image_size, tiny["examples"][0])

    def build(self, cfg, data, placement, run_, steps):
        boxes = det_data.max_boxes(data, cfg)
        size = cfg.data.image_size
        several = placement.name == "multi_worker"
        train_ds = self.dataset(data.splits["train"], cfg, True, boxes, workers=placement.workers)
        # Several workers must run the same number of validation steps: full batches.
        val_ds = self.dataset(data.splits["val"], cfg, False, boxes, workers=placement.workers,
                              padded=several)
        model = detectors.build_detector(cfg.model, cfg.detect, (size, size, 3), data.num_classes)
        if cfg.backbone:
            load_backbone(model, cfg.backbone, cfg.model.name, cfg.freeze_backbone)
        optimizer = make_optimizer(cfg.optimizer, cfg.epochs, steps, cfg.batch_size)
        detectors.compile_detector(model, cfg.model.name, optimizer, cfg.detect, cfg.xla)
        evaluation = CocoEvaluation(data.splits["val"], data.class_names, size, cfg.epochs,
                                    cfg.detect.eval_every, run_.logs, cfg.detect.draw_images,
                                    cfg.detect.draw_score, cfg.batch_size, local=several)
        return FitParts(model, model, train_ds, val_ds, self._sample(data, cfg, boxes),
                        monitor=self.val_metric, callbacks=[evaluation], extra={"boxes": boxes})

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        model = parts.net
        final = save_final(model, run_)
        if placement.name == "multi_worker":  # a plain local copy: no collective op
            model = load_run_detector(run_.dir, cfg, data.num_classes)
        size = cfg.data.image_size
        predictor = DetectionPredictor("keras", run_.dir, data.class_names, size, cfg,
                                       keras_padded_fn(model, cfg.batch_size))
        test = self.evaluate(predictor, "test", run_.dir / "eval" / "test", data,
                             title=f"{run_.name}: test split")
        out = run_.dir / "eval" / "test"
        metrics = {f"test_{key}": test[key] for key in TEST_KEYS if key in test}
        metrics.update({f"best_{self.val_metric}": max(hist.get(self.val_metric, [float("nan")])),
                        "params": int(model.count_params())})
        artifacts = {"final_weights": str(final), "test_report": str(out / "report.md"),
                     "test_detections": str(out / "detections.json"),
                     "test_images": str(out / "images")}
        if cfg.export:
            val = data.splits["val"]
            reference = coco_metrics(val.truth, predictor.detect_split(val), data.class_names)
            check = export_saved_model(model, data.class_names, size, export_dir, val, reference,
                                       artifact_metadata(run_.dir, cfg, sections=("detect",)))
            metrics.update({"val_map_keras": check["keras_map"],
                            "val_map_saved_model": check["export_map"]})
            if "keras_mask_map" in check:
                metrics.update({"val_mask_map_keras": check["keras_mask_map"],
                                "val_mask_map_saved_model": check["export_mask_map"]})
            artifacts["saved_model"] = str(export_dir)
        return metrics, artifacts

    def dataset(self, split, cfg, training: bool, boxes: int, **options) -> tf.data.Dataset:
        """Batches of (images, {"boxes", "classes"}) for the model."""
        return det_data.make_dataset(split, cfg, training, boxes, **options)

    def _sample(self, data, cfg, boxes: int) -> np.ndarray:
        """A batch of augmented training images with their boxes drawn, for TensorBoard."""
        size = cfg.data.image_size
        images, targets = next(iter(self.dataset(data.splits["train"], cfg, True, boxes,
                                                 batch_size=16).take(1)))
        return np.stack([
            draw(np.clip(image, 0, 255).astype(np.uint8), None, data.class_names,
                 det_data.GroundTruth("", size, size, b[c >= 0], c[c >= 0].astype(np.int32)),
                 upscale=max(1, 128 // size))
            for image, b, c in zip(images.numpy(), targets["boxes"].numpy(),
                                   targets["classes"].numpy())])

    # ---- artifacts
    def load_predictor(self, artifact):
        return load_predictor(artifact)

    def evaluate(self, predictor, split="test", out_dir=None, data=None, tensorboard_dir=None,
                 options=None, title: str = ""):
        if options:
            raise TfkarpaError(f"evaluate option(s) {', '.join(sorted(options))} are for "
                               f"classifiers; '{predictor.path}' is a detector")
        return evaluate_artifact(predictor, split, out_dir, data, tensorboard_dir, title)

    def evaluation_summary(self, metrics, out_dir):
        keys = [k for k in (*TEST_KEYS, "ar100", "mask_ar100") if k in metrics]
        return ({"images": metrics["images"], **{k: metrics[k] for k in keys}},
                {"report": str(out_dir / "report.md"), "metrics": str(out_dir / "metrics.json"),
                 "detections": str(out_dir / "detections.json"),
                 "images": str(out_dir / "images")})

    benchmark_figure = "test mAP (COCO, IoU 0.50:0.95)"

    def benchmark_metric(self, metrics):
        return metrics["map"]

    def export(self, run_dir, formats, quantize, out_dir, representative, check, per_channel):
        return export_run(load_predictor(open_artifact(run_dir)), formats, quantize, out_dir,
                          representative)

    def predict(self, predictor, inputs, options):
        return predict_command(predictor, inputs, options)

    def report_blocks(self, run_dir, slug):
        return report.blocks(run_dir, slug)


def evaluate_artifact(predictor: DetectionPredictor, split_name: str, out_dir: Path | None,
                      data: det_data.DetectionData | None = None,
                      tensorboard_dir: Path | None = None, title: str = "") -> dict:
    """COCO metrics of a run, SavedModel or TFLite file on a split of the data it was trained
    on; reports, COCO-format detections and pictures into `out_dir`."""
    cfg = predictor.config
    if split_name not in ("train", "val", "test", "all"):
        raise TfkarpaError(f"split '{split_name}' is not one of train, val, test, all")
    data = data or det_data.load(cfg.data, cfg.seed, detectors.has_masks(cfg.model.name))
    if list(data.class_names) != list(predictor.class_names):
        raise TfkarpaError(f"{data.source} names its classes {', '.join(data.class_names[:5])} "
                           f"but the model at '{predictor.path}' predicts "
                           f"{', '.join(predictor.class_names[:5])}; evaluate it on its own data")
    split = data.split(split_name)
    log.info("evaluating %s (%s) on %d %s images of %s", predictor.path, predictor.kind,
             split.num_examples, split_name, data.source)
    found = predictor.detect_split(split)
    metrics = coco_metrics(split.truth, found, data.class_names, data.category_ids)
    metrics.update({"split": split_name, "source": data.source, "artifact": str(predictor.path),
                    "artifact_kind": predictor.kind})
    if out_dir is not None:
        title = title or f"{predictor.path.name} ({predictor.kind}) on {data.source} / {split_name}"
        write_eval(metrics, found, split.truth, data.class_names, Path(out_dir), title,
                   data.skipped, data.category_ids)
        write_pictures(split, found, data.class_names, Path(out_dir) / "images",
                       cfg.detect.draw_images, cfg.detect.draw_score)
    if tensorboard_dir is not None:
        writer = tf.summary.create_file_writer(str(tensorboard_dir))
        with writer.as_default():
            for key in ("map", "map50", "map75", "mask_map", "mask_map50", "mask_map75"):
                if key in metrics:
                    tf.summary.scalar(f"{split_name}/{key}", metrics[key] or 0.0, step=0)
        writer.close()
    return metrics


TASK = DetectTask()

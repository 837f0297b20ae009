"""Supervised image classification on the core: the task object the fit loop and the artifact
commands call, with compression stages (TF-MOT), distillation and pretrained backbones.

Training: a classifier from `tfkarpa.models` (its encoder from a SimCLR run with
`backbone=RUN`), cross-entropy with label smoothing, accuracy and top-k in the logs, the best
epoch by validation accuracy (for a pruning stage only epochs at the target sparsity count).
The run delivers the stripped final weights, the test split's report and, with `export=true`,
a checked SavedModel. Artifacts: predictors for runs, SavedModels and TFLite files
(`predict`), evaluation reports (`evaluate`), exports (`serving`) and report sections.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import models, optimize, runs
from tfkarpa.core.artifacts import open_artifact
from tfkarpa.core.auto import AutoRules, Transfer
from tfkarpa.core.export import artifact_metadata
from tfkarpa.core.fit import save_final
from tfkarpa.core.optim import make_optimizer
from tfkarpa.core.task import FitParts, Task
from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.optimize import distill
from tfkarpa.tasks.classify import adversarial
from tfkarpa.tasks.classify import evaluate as evaluate_lib
from tfkarpa.tasks.classify import predict as predict_lib
from tfkarpa.tasks.classify import probe
from tfkarpa.tasks.classify import report, serving
from tfkarpa.tasks.pretrain.task import load_encoder_into, read_pretrain_run

log = logging.getLogger(__name__)


class ClassifyTask(Task):
    """Supervised classification, with optional compression stages and distillation."""

    name = "classify"
    key_metric = "test_accuracy"
    data_recipe = "classify"  # your own data (not digits/shapes): model=auto
    formats = ("saved_model", "tflite")  # and every format converted from TFLite (ONNX)
    # model=auto: under 10,000 training images, EfficientNet-Lite0 fine-tuned from ImageNet at
    # 96-160 px (small images upsampled: ImageNet features need pixels), about 24,000 images
    # seen, SGD at 0.001; from 10,000 images small_cnn from scratch, which a 2-core CPU trains
    # on such sets in minutes. The rate, tried on 1,000 Fashion-MNIST images for 6 epochs with
    # the batch norms at ImageNet's statistics: 0.01 diverged (chance from the second epoch),
    # 0.003 wavered (val 0.24-0.78), 0.001 rose steadily (val 0.41 -> 0.81, test 0.78); with
    # the batch norms training, 0.01 fit the training images (0.83) but not validation (0.57).
    # Measured in benchmarks/transfer.py (on other subsets than these trials).
    auto = AutoRules(transfer=Transfer(
        model="efficientnet_lite0", scratch="small_cnn", below=10_000, min_size=96,
        max_size=160, samples=24_000, lr=0.001, scratch_lr=0.05))

    # ---- training
    def check_model(self, cfg):
        if cfg.ensemble.members:
            raise TfkarpaError("an ensemble is made from finished runs by `python -m pipelines "
                               "ensemble RUN RUN ...`, not trained (config key "
                               "'ensemble.members')")
        if cfg.adversarial.method != "off" and cfg.distill.teacher:
            raise TfkarpaError("adversarial training and distill.teacher each replace the "
                               "training step; choose one")
        if cfg.freeze_backbone and not cfg.backbone:
            raise TfkarpaError("freeze_backbone=true needs backbone=RUN (a pretraining run)")
        if cfg.backbone:  # before the run is named: the architecture is the backbone's
            _take_backbone_architecture(cfg)
        models.check(cfg.model)
        if cfg.distill.teacher and not cfg.data.image_size:  # auto: the teacher's input size
            teacher = Path(cfg.distill.teacher) / "config.yaml"
            if teacher.is_file():
                cfg.data.image_size = runs.read_config(teacher.parent).data.image_size

    def load_data(self, cfg):
        data = sources.load(cfg.data, cfg.seed)
        data = sources.with_label_budget(
            data, cfg.data.labels, cfg.data.seed if cfg.data.seed >= 0 else cfg.seed)
        sources.require_splits(data)
        return data

    def build(self, cfg, data, placement, run_, steps) -> FitParts:
        train_ds = pipeline.make_dataset(data.splits["train"], cfg, data.num_classes,
                                         training=True, workers=placement.workers,
                                         drop_remainder=placement.name == "tpu")
        # Several workers must run the same number of evaluation steps too: full batches.
        val_ds = pipeline.make_dataset(data.splits["val"], cfg, data.num_classes,
                                       training=False, workers=placement.workers,
                                       padded=placement.name in ("multi_worker", "tpu"))
        input_shape = (cfg.data.image_size, cfg.data.image_size, 3)
        stage = cfg.stages[-1] if cfg.stages else None
        model = build_model(cfg, input_shape, data.num_classes)
        head = None
        if probe.wanted(cfg) and not run_.resumed:  # a resumed run loads its checkpoint
            if placement.workers > 1:  # each worker would fit its own: keep Keras' init
                log.info("head: model.head_init=probe is done on one worker only; Keras' "
                         "initialiser is kept with %d workers", placement.workers)
            else:
                head = probe.probe_head(model, data.splits["train"], cfg, data.num_classes)
        wrapped = None
        if stage:
            wrapped = optimize.wrap(stage, model, cfg, cfg.epochs * steps, run_.logs / "train",
                                    earlier=cfg.stages[:-1])
            model = wrapped.model
        net = model  # what the run delivers; `model` is what fits (a Distiller around it)
        if cfg.distill.teacher:
            teacher = load_teacher(cfg.distill.teacher, data.class_names, input_shape)
            model = distill.Distiller(net, teacher, cfg.distill.temperature, cfg.distill.alpha)
        adv = cfg.adversarial
        callbacks, monitor = list(wrapped.callbacks if wrapped else []), "val_accuracy"
        if adv.method != "off":
            eps = config_lib.parse_eps(adv.eps, "adversarial.eps")
            model = adversarial.AdversarialTrainer(net, adv.method, eps, adv.steps, adv.beta)
            if adv.robust_images:  # robust overfitting (Rice et al. 2020): keep the most robust
                images, labels = serving.sample_images(data.splits["val"], cfg, data.num_classes,
                                                       adv.robust_images, cfg.seed, labels=True)
                callbacks.insert(0, adversarial.RobustAccuracy(net, images, labels, eps))
                monitor = "val_robust_accuracy"
        model.compile(
            optimizer=make_optimizer(cfg.optimizer, cfg.epochs, steps, cfg.batch_size),
            jit_compile=cfg.xla,
            loss=tf.keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
            metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy"),
                     tf.keras.metrics.TopKCategoricalAccuracy(
                         k=max(1, min(cfg.top_k, data.num_classes - 1)), name="top_k_accuracy")],
        )
        # A separate pipeline for the picture: iterating `train_ds` itself here would leave its
        # in-memory cache filled before the strategy shards it, and every worker would then read
        # every file (measured: 2x the examples per epoch with 2 workers).
        sample, _ = next(iter(pipeline.make_dataset(data.splits["train"], cfg, data.num_classes,
                                                    training=True).take(1)))
        return FitParts(model, net, train_ds, val_ds, sample.numpy(), monitor=monitor,
                        callbacks=callbacks,
                        first_eligible=_first_eligible_epoch(cfg),
                        extra={"stage": stage, "wrapped": wrapped, "head": head})

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        model, compression = _strip(cfg, run_, parts)
        final = save_final(model, run_)
        if placement.name in ("multi_worker", "tpu"):
            # Evaluate and export a plain local copy: no collective op (which would need every
            # worker in step) and no TPU-only placement after training.
            model = predict_lib.load_run_model(run_.dir, cfg, data.num_classes)
            predict = lambda x: model(tf.cast(x, tf.float32), training=False)  # noqa: E731
        elif placement.replicas > 1:  # spread the test split over the replicas
            predict = lambda x: model.predict(tf.cast(x, tf.float32), verbose=0,  # noqa: E731
                                              batch_size=cfg.batch_size)
        else:
            predict = lambda x: model(tf.cast(x, tf.float32), training=False)  # noqa: E731
        predictor = predict_lib.Predictor("keras", run_.dir, data.class_names,
                                          cfg.data.image_size, cfg, predict, model)
        test = evaluate_lib.evaluate(predictor, "test", out_dir=run_.dir / "eval" / "test",
                                     data=data, tensorboard_dir=run_.logs / "eval",
                                     step=cfg.epochs)
        artifacts = {
            "final_weights": str(final),
            "test_report": str(run_.dir / "eval" / "test" / "report.md"),
            "confusion_matrix": str(run_.dir / "eval" / "test" / "confusion_matrix.png"),
            "reliability_diagram": str(run_.dir / "eval" / "test" / "reliability.png"),
        }
        metrics = {
            "test_accuracy": test["accuracy"],
            "test_ece": test["ece"],
            **{f"test_{k}": v for k, v in test.items() if k.startswith("top")},
            "best_val_accuracy": max(hist.get("val_accuracy", [float("nan")])),
            "params": int(model.count_params()),
        }
        if cfg.export:
            check = serving.sample_images(data.splits["val"], cfg, data.num_classes, 64, cfg.seed)
            metrics["export_parity"] = serving.export_saved_model(
                model, data.class_names, cfg.data.image_size, export_dir, check,
                artifact_metadata(run_.dir, cfg))
            artifacts["saved_model"] = str(export_dir)
        if parts.extra.get("head"):
            metrics["head_probe_train_accuracy"] = parts.extra["head"]["train_accuracy"]
        if compression:
            metrics["sparsity"] = compression["overall_sparsity"]
            artifacts["compression_report"] = str(run_.dir / "compression.json")
        return metrics, artifacts

    # ---- artifacts
    def load_predictor(self, artifact):
        return predict_lib.load_predictor(artifact)

    def evaluate(self, predictor, split="test", out_dir=None, data=None, tensorboard_dir=None,
                 options=None):
        attack = adversarial.parse_attack(options or {})
        source = None
        if attack:
            source = attack_source(predictor, (options or {}).get("attack_from", ""))
        return evaluate_lib.evaluate(predictor, split, out_dir=out_dir, data=data,
                                     tensorboard_dir=tensorboard_dir, attack=attack,
                                     source=source)

    def evaluation_summary(self, metrics, out_dir):
        figures = {k: v for k, v in metrics.items()
                   if k in ("examples", "accuracy", "ece") or k.startswith("top")}
        figures["macro_f1"] = metrics["macro_avg"]["f1-score"]
        if "robust" in metrics:
            figures[f"robust_accuracy_{metrics['robust']['attack']}"] = metrics["robust"]["accuracy"]
        return figures, {"report": str(out_dir / "report.md"),
                         "report_json": str(out_dir / "report.json"),
                         "confusion_matrix": str(out_dir / "confusion_matrix.png"),
                         "reliability_diagram": str(out_dir / "reliability.png")}

    def export(self, run_dir, formats, quantize, out_dir, representative, check, per_channel):
        bad = [q for q in quantize if q not in serving.QUANTIZE_MODES]
        if bad:  # before the model loads: a typo costs nothing
            raise TfkarpaError(f"unknown quantize mode '{bad[0]}' (choose "
                               f"{', '.join(serving.QUANTIZE_MODES)})")
        return serving.export_run(predict_lib.load_predictor(open_artifact(run_dir)), formats, quantize,
                                  out_dir, representative, check, per_channel)

    def predict(self, predictor, inputs, options):
        if options.get("coco"):
            raise TfkarpaError("predict option 'coco' (a COCO file's ids for the results) is for "
                               "detectors; this is a classifier")
        if options.get("out"):  # a classifier writes nothing: say so rather than ignore it
            raise TfkarpaError("predict option 'out' (annotated pictures) is for detectors; a "
                               "classifier prints its predictions (--json for a script)")
        results = predict_lib.predict_files(predictor, inputs, int(options.get("top_k", 5)))
        lines = [""]
        for r in results:
            labels = "  ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])
            lines.append(f"{r['image']}  {labels}")
        return {"artifacts": {}, "metrics": {"images": len(results)}, "predictions": results,
                "lines": lines}

    def benchmark_metric(self, metrics):
        return metrics["accuracy"]

    def report_blocks(self, run_dir, slug):
        return report.blocks(run_dir, slug)


def attack_source(predictor, run_dir: str = "") -> tf.keras.Model:
    """The Keras model attacks are made on: a run's own, or for a SavedModel or TFLite file the
    run it was exported from (recorded in the file; `attack_from=RUN` names another)."""
    if predictor.kind == "keras" and not run_dir:
        return predictor.model
    run_dir = run_dir or predictor.meta.get("run_dir", "")
    if not run_dir or not (Path(run_dir) / "config.yaml").is_file():
        raise TfkarpaError(
            f"attacks on '{predictor.path}' are made on the Keras run it came from, and "
            f"{'its run ' + repr(run_dir) + ' is not there' if run_dir else 'it names no run'}; "
            "give one with attack_from=RUN")
    source = predict_lib.load_predictor(open_artifact(run_dir))
    if source.class_names != predictor.class_names or source.image_size != predictor.image_size:
        raise TfkarpaError(f"attack_from '{run_dir}' predicts other classes or takes another "
                           f"input size than '{predictor.path}'")
    return source.model


def _take_backbone_architecture(cfg: config_lib.Config) -> None:
    """`backbone=RUN`: the architecture is the pretraining run's (the head, dropout and
    head_norm stay the user's); its image size must be the run's."""
    pre = read_pretrain_run(cfg.backbone)
    if not cfg.data.image_size:  # auto: the size the encoder learned at
        cfg.data.image_size = pre.data.image_size
    if pre.data.image_size != cfg.data.image_size:
        raise TfkarpaError(
            f"backbone '{cfg.backbone}' was pretrained on {pre.data.image_size}-pixel images; "
            f"set data.image_size={pre.data.image_size}")
    arch = ("name", "depth", "version", "width")
    if any(getattr(cfg.model, k) != getattr(pre.model, k) for k in arch):
        log.info("model architecture comes from the backbone run %s: %s", cfg.backbone,
                 pre.model.name)
        cfg.model = dataclasses.replace(cfg.model, **{k: getattr(pre.model, k) for k in arch})


def _strip(cfg, run_, parts: FitParts):
    """A compression stage's model without its wrappers, and its report (compression.json)."""
    model, stage, wrapped = parts.net, parts.extra["stage"], parts.extra["wrapped"]
    if not stage:
        return model, None
    model = optimize.strip(stage, model)
    compression = {"stage": stage, "stages": cfg.stages, "wrapped": wrapped.wrapped,
                   "skipped": wrapped.skipped, **optimize.sparsity_report(model)}
    runs.atomic_write_json(run_.dir / "compression.json", compression)
    return model, compression


def _first_eligible_epoch(cfg) -> int:
    """The first epoch whose weights have the run's final structure (pruning: target reached)."""
    if cfg.stages and cfg.stages[-1] == "prune":
        return min(cfg.epochs - 1, math.ceil(cfg.prune.end * cfg.epochs) - 1)
    return 0


def build_model(cfg: config_lib.Config, input_shape: tuple, classes: int) -> tf.keras.Model:
    """The configured classifier (its backbone from a pretraining run when `backbone=RUN`)."""
    model = models.build_classifier(cfg.model, input_shape, classes)
    if cfg.backbone:
        load_encoder_into(model, cfg.backbone, cfg.freeze_backbone)
    return model


def load_teacher(run_dir: str, class_names: list[str], input_shape: tuple) -> tf.keras.Model:
    """The teacher run's model, frozen; its classes and input size must be the student's."""
    path = Path(run_dir)
    if not (path / "metrics.json").is_file() or not (path / "config.yaml").is_file():
        raise TfkarpaError(f"config key 'distill.teacher': '{run_dir}' is not a finished run")
    teacher_classes = runs.class_names(path)
    if teacher_classes != list(class_names):
        raise TfkarpaError(
            f"config key 'distill.teacher': the teacher predicts {len(teacher_classes)} classes "
            f"({', '.join(teacher_classes[:5])}...) but the student's data has "
            f"{len(class_names)} ({', '.join(class_names[:5])}...); they must match in order"
        )
    cfg = runs.read_config(path)
    if cfg.data.image_size != input_shape[0]:
        raise TfkarpaError(f"config key 'distill.teacher': the teacher takes {cfg.data.image_size}"
                           f"-pixel images, the student {input_shape[0]}; set data.image_size to match")
    teacher = predict_lib.load_run_model(path, cfg, len(class_names))
    teacher.trainable = False
    return teacher


TASK = ClassifyTask()

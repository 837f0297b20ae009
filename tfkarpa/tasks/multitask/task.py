"""Multi-task learning on the core: one backbone, several heads, one run (`task=multitask`).

`heads=class:1.0,colour:0.5,size:0.5` names the heads of the data (`multitask.data`) and their
loss weights; `head_weighting=uncertainty` learns the weights instead. The run logs every head's
loss and accuracy (or MAE and R^2) per epoch, keeps the epoch with the best mean score, reports
every head on the test split, and exports a SavedModel (and TFLite files, through `export`)
that serves every head. Predictors, `evaluate`, `predict`, `benchmark` and reports take these
runs and their exports like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import models, runs
from tfkarpa.core.artifacts import image_files, open_artifact, read_image
from tfkarpa.core.callbacks import load_checkpoint
from tfkarpa.core.export import artifact_metadata
from tfkarpa.core.fit import save_final
from tfkarpa.core.optim import make_optimizer
from tfkarpa.core.report import Figure, Heading, Table, Text
from tfkarpa.core.task import FitParts, Task
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.multitask import data as data_lib
from tfkarpa.tasks.multitask import evaluate as evaluate_lib
from tfkarpa.tasks.multitask import model as model_lib
from tfkarpa.tasks.multitask import serving

log = logging.getLogger(__name__)

# Settings of other tasks a multi-task run has no meaning for, and why.
_REFUSED = {
    "data.mix": "mixing two images mixes their colours and sizes too",
    "adversarial.method": "adversarial training attacks one classifier's loss",
    "distill.teacher": "distillation needs a teacher with the same heads",
    "stages": "compression stages are classifier runs (`compress`)",
    "qat": "quantization-aware training is a classifier's compression stage",
    "prune.sparsity": "pruning is a classifier's compression stage",
    "cluster.clusters": "clustering is a classifier's compression stage",
    "ensemble.members": "ensembles combine classifier runs",
    "data.labels": "label budgets pick images per class of one classifier",
    "data.skip_bad": "a table's bad rows are errors: fix or remove them",
}


def _set(cfg, key: str) -> bool:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return bool(value) and value not in ("off", "100%")


class MultiTaskTask(Task):
    """Several heads on one backbone, trained together."""

    name = "multitask"
    key_metric = "test_score"
    val_metric = "val_score"
    run_suffix = "-multitask"
    default_quantize = ("none", "int8")
    formats = ("saved_model", "tflite")  # and every format converted from TFLite (ONNX)

    # ---- training
    def check_model(self, cfg):
        for key, why in _REFUSED.items():
            if _set(cfg, key):
                raise TfkarpaError(f"config key '{key}' is not for task=multitask: {why}")
        if cfg.data.augment == "strong":
            raise TfkarpaError("config key 'data.augment': strong (RandAugment) changes colours "
                               "and shapes, which multi-task heads may predict; use light or off")
        if cfg.strategy in ("multi_worker", "tpu", "mirrored") or len(cfg.devices) > 1:
            raise TfkarpaError(f"config key 'strategy': task=multitask trains on one device "
                               f"(default or one_device), not {cfg.strategy} "
                               f"{','.join(cfg.devices)}".rstrip())
        model_lib.check_names([name for name, _ in config_lib.parse_heads(cfg.heads)],
                              "config key 'heads'")
        models.check(cfg.model)

    def load_data(self, cfg):
        data = data_lib.load(cfg, cfg.seed)
        model_lib.check_names([h.name for h in data.heads], data.source)
        return data

    def build(self, cfg, data, placement, run_, steps) -> FitParts:
        if placement.replicas > 1 or placement.workers > 1:  # strategy=auto chose several
            # Measured: under MirroredStrategy the per-head metrics' result() in the replica
            # step fails (sync-on-read variable read); one device until that is rebuilt.
            raise TfkarpaError(f"task=multitask trains on one device, but strategy=auto chose "
                               f"{placement.name} with {placement.replicas} replicas; set "
                               "strategy=one_device")
        train_ds = data_lib.make_dataset(data.splits["train"], cfg, data.heads, training=True)
        val_ds = data_lib.make_dataset(data.splits["val"], cfg, data.heads, training=False)
        size = cfg.data.image_size
        net = model_lib.build_model(cfg, (size, size, 3), data.heads)
        model = model_lib.MultiTaskTrainer(net, data.heads, cfg.head_weighting,
                                           cfg.label_smoothing)
        model(tf.zeros((1, size, size, 3)))  # built: BackupAndRestore restores only built models
        model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.epochs, steps, cfg.batch_size),
                      jit_compile=cfg.xla)
        sample, _ = next(iter(data_lib.make_dataset(data.splits["train"], cfg, data.heads,
                                                    training=True).take(1)))
        return FitParts(model, net, train_ds, val_ds, sample.numpy(), monitor="val_score")

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        net = parts.net
        final = save_final(net, run_)
        predictor = serving.Predictor("keras", run_.dir, data.heads, cfg.data.image_size, cfg,
                                      serving.keras_fn(net), net)
        out = run_.dir / "eval" / "test"
        test = evaluate_lib.evaluate(predictor, "test", out_dir=out, data=data,
                                     tensorboard_dir=run_.logs / "eval", step=cfg.epochs)
        metrics = {"test_score": test["score"],
                   "best_val_score": max(hist.get("val_score", [np.nan])),
                   "params": int(net.count_params())}
        for name, m in test["heads"].items():
            for key in ("accuracy", "ece", "r2", "mae"):
                if key in m:
                    metrics[f"test_{name}_{key}"] = m[key]
        artifacts = {"final_weights": str(final), "test_report": str(out / "report.md")}
        if cfg.export:
            check = self._sample(data.splits["val"], cfg, data.heads, 64)
            metrics["export_parity"] = serving.export_saved_model(
                net, data.heads, cfg.data.image_size, export_dir, check,
                artifact_metadata(run_.dir, cfg, sections=("heads", "head_weighting")))
            artifacts["saved_model"] = str(export_dir)
        return metrics, artifacts

    @staticmethod
    def _sample(split, cfg, heads, count: int) -> np.ndarray:
        """`count` uint8 validation or training images at the model's size (seeded)."""
        ds = data_lib.make_dataset(split, cfg, heads, training=False, batch_size=count)
        ds = ds.unbatch().shuffle(max(count, min(10 * count, 10000)), seed=cfg.seed).batch(count)
        images, _ = next(iter(ds))
        return tf.cast(images, tf.uint8).numpy()

    # ---- artifacts
    def load_predictor(self, artifact):
        return serving.load_predictor(artifact, load_run_model)

    def evaluate(self, predictor, split="test", out_dir=None, data=None, tensorboard_dir=None,
                 options=None):
        if options:
            raise TfkarpaError(f"evaluate option(s) {', '.join(options)} are for classifiers; "
                               "this is a multi-task model")
        return evaluate_lib.evaluate(predictor, split, out_dir=out_dir, data=data,
                                     tensorboard_dir=tensorboard_dir)

    def evaluation_summary(self, metrics, out_dir):
        figures = {"examples": metrics["examples"], "score": metrics["score"]}
        files = {"report": str(out_dir / "report.md"), "report_json": str(out_dir / "report.json")}
        for name, m in metrics["heads"].items():
            if m["kind"] == "class":
                figures[f"{name}_accuracy"] = m["accuracy"]
                files[f"confusion_{name}"] = str(out_dir / f"confusion_{name}.png")
            else:
                figures.update({f"{name}_r2": m["r2"], f"{name}_mae": m["mae"]})
                files[f"scatter_{name}"] = str(out_dir / f"scatter_{name}.png")
        return figures, files

    def export(self, run_dir, formats, quantize, out_dir, representative, check, per_channel):
        bad = [q for q in quantize if q not in serving.QUANTIZE_MODES]
        if bad:  # before the model loads: a typo costs nothing
            raise TfkarpaError(f"unknown quantize mode '{bad[0]}' (choose "
                               f"{', '.join(serving.QUANTIZE_MODES)})")
        predictor = self.load_predictor(open_artifact(run_dir))
        cfg = predictor.config
        data = data_lib.load(cfg, cfg.seed)
        evaluate_lib.check_heads(data.heads, predictor)
        return serving.export_run(
            predictor, data, formats, quantize, out_dir, representative, check,
            lambda split, count: self._sample(split, cfg, predictor.heads, count), per_channel)

    def predict(self, predictor, inputs, options):
        if options.get("coco"):
            raise TfkarpaError("predict option 'coco' is for detectors; this is a multi-task model")
        if options.get("out"):  # it writes nothing: say so rather than ignore it
            raise TfkarpaError("predict option 'out' (annotated pictures) is for detectors; a "
                               "multi-task model prints its predictions (--json for a script)")
        files = image_files(inputs)
        results, lines = [], [""]
        for start in range(0, len(files), 64):
            chunk = files[start:start + 64]
            out = predictor.predict(np.stack([read_image(f, predictor.image_size) for f in chunk]))
            for i, f in enumerate(chunk):
                result = {"image": str(f)}
                for h in predictor.heads:
                    if h.kind == "class":
                        p = out[h.name][i]
                        result[h.name] = {"label": h.classes[int(p.argmax())],
                                          "class_id": int(p.argmax()), "score": float(p.max())}
                    else:
                        result[h.name] = {"value": float(out[h.name][i])}
                results.append(result)
                lines.append(f"{f}  " + "  ".join(
                    f"{h.name}={result[h.name]['label']} {result[h.name]['score']:.3f}"
                    if h.kind == "class" else f"{h.name}={result[h.name]['value']:.4g}"
                    for h in predictor.heads))
        return {"artifacts": {}, "metrics": {"images": len(results)}, "predictions": results,
                "lines": lines}

    benchmark_figure = "test score (the mean over heads of accuracy or R^2)"

    def benchmark_metric(self, metrics):
        return metrics["score"]

    def report_blocks(self, run_dir, slug):
        report = runs.read_json(run_dir / "eval" / "test" / "report.json")
        if not report:
            return []
        rows = []
        for name, m in report["heads"].items():
            if m["kind"] == "class":
                rows.append([name, f"{len(m['class_names'])} classes", m["accuracy"],
                             m["macro_avg"]["f1-score"], m["ece"], None])
            else:
                rows.append([name, "value", m["r2"], m["mae"], m["rmse"], m["baseline_mae"]])
        out = [Heading(3, "Test results per head"),
               Text(f"{report['examples']} test images; score (mean of the heads' accuracy and "
                    f"R^2) {report['score']:.4f}."),
               Table(["head", "kind", "accuracy / R^2", "macro F1 / MAE", "ECE / RMSE",
                      "MAE of the mean"], rows)]
        for name, m in report["heads"].items():
            kind = "confusion" if m["kind"] == "class" else "scatter"
            path = run_dir / "eval" / "test" / f"{kind}_{name}.png"
            if path.is_file():
                caption = (f"head {name}: confusion matrix on the test split" if kind == "confusion"
                           else f"head {name}: predicted against true values on the test split")
                out.append(Figure(f"{slug}-{kind}-{name}.png", path.read_bytes(), caption))
        return out


def load_run_model(run_dir: Path, cfg: config_lib.Config, heads) -> tf.keras.Model:
    """Rebuild a multi-task run's network and load its final (else best or last) weights."""
    weights = runs.weights_file(run_dir)
    cfg = config_lib.build(base={**config_lib.to_dict(cfg), "backbone": ""},
                           overrides=["model.weights="])
    size = cfg.data.image_size
    net = model_lib.build_model(cfg, (size, size, 3), heads)
    if weights.name == "final.weights.h5":
        models.load_weights(net, weights, about=f"run '{run_dir}'")
    else:  # checkpoints hold the trainer (the network and the heads' log-variances)
        trainer = model_lib.MultiTaskTrainer(net, heads, cfg.head_weighting)
        trainer(tf.zeros((1, size, size, 3)))
        try:
            load_checkpoint(trainer, weights)  # the network's weights, not the metrics' state
        except (OSError, ValueError, KeyError, IndexError) as err:
            text = " ".join(str(err).split())[:200] or type(err).__name__
            raise TfkarpaError(f"run '{run_dir}': checkpoint '{weights}' does not load "
                               f"(damaged, or another model's: {text}); resume the run to "
                               "finish it, or train it again") from err
    return net


TASK = MultiTaskTask()

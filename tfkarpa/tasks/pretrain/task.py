"""SimCLR (Chen et al. 2020): contrastive pretraining on unlabelled images, then transfer.

`task=pretrain` runs through the core's fit loop with this package's `PretrainTask`:

- views (`views`): two augmentations of every image, made on whole batches inside tf.data with
  keras-cv layers (random resized crop, flip, colour jitter, grayscale, optional blur);
- model (`model`): the encoder of any classifier from `tfkarpa.models` (everything up to its
  global pooling layer, "pool") and an MLP projection head, trained with NT-Xent over the
  global batch;
- monitors each epoch (`monitor`): contrastive accuracy (is the other view the nearest?), kNN
  accuracy and linear-probe accuracy of the encoder's features on the labelled validation
  split, all in history.csv and TensorBoard; at the end the validation embeddings go to
  TensorBoard's projector with image sprites and labels.

The run delivers the encoder (`checkpoints/final.weights.h5`); `backbone=RUN` loads it into a
classifier of the same architecture for fine-tuning (`finetune`) or linear evaluation
(`linear-eval`, `freeze_backbone=true`), or into a detector's backbone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import models, runs
from tfkarpa.core.fit import save_final
from tfkarpa.core.optim import make_optimizer
from tfkarpa.core.report import Heading, Table
from tfkarpa.core.task import FitParts, Task
from tfkarpa.data import sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.pretrain.model import SimCLR, encoder_of, projection_head
from tfkarpa.tasks.pretrain.monitor import RepresentationMonitor, write_projector
from tfkarpa.tasks.pretrain.views import views_dataset

log = logging.getLogger(__name__)


def read_pretrain_run(run_dir: str | Path) -> config_lib.Config:
    """The config of a finished contrastive run, or an error saying what `run_dir` is."""
    path = Path(run_dir)
    cfg = runs.read_config(path)
    if cfg.task != "pretrain":
        raise TfkarpaError(f"'{path}' is a {cfg.task} run, not a contrastive one; pass "
                           "a run made with `python -m pipelines pretrain`")
    if not (path / "checkpoints" / "final.weights.h5").exists():
        raise TfkarpaError(f"contrastive run '{path}' has not finished (no "
                           "checkpoints/final.weights.h5); re-run its pretrain command")
    return cfg


def load_encoder_into(model: tf.keras.Model, run_dir: str | Path, freeze: bool) -> None:
    """Put a contrastive run's encoder weights into `model` (same architecture)."""
    encoder = encoder_of(model)
    weights = Path(run_dir) / "checkpoints" / "final.weights.h5"
    models.load_weights(encoder, weights, about=f"the encoder of contrastive run '{run_dir}'",
                        fix="pretrain with the same model settings, or train it again")
    if freeze:
        encoder.trainable = False  # frozen BatchNorm also runs in inference mode
    log.info("backbone from %s%s", run_dir, " (frozen)" if freeze else "")


class PretrainTask(Task):
    """SimCLR on the training images; delivers the encoder. Labels only feed its monitors."""

    name = "pretrain"
    key_metric = "test_knn_accuracy"
    val_metric = "knn_accuracy"  # on the validation split (monitor.py)
    run_suffix = "-simclr"
    default_recipe = "shapes_simclr"

    def check_model(self, cfg: config_lib.Config) -> None:
        if cfg.data.mix != "off" or cfg.adversarial.method != "off":
            raise TfkarpaError("data.mix and adversarial training need labels; contrastive "
                               "pretraining has none (use them in the fine-tuning run)")
        models.check(cfg.model)

    def load_data(self, cfg: config_lib.Config) -> sources.SourceData:
        data = sources.load(cfg.data, cfg.seed)
        sources.require_splits(data)
        return data

    def check(self, cfg: config_lib.Config, data: sources.SourceData) -> None:
        if cfg.stages or cfg.qat or cfg.distill.teacher or cfg.backbone:
            raise TfkarpaError("task=pretrain trains an encoder from scratch: compression stages, "
                               "qat, distill.teacher and backbone do not apply")
        if cfg.batch_size < 2:
            raise TfkarpaError("contrastive pretraining needs batch_size >= 2: each image's "
                               "negatives are the other images of the batch")
        n = data.splits["train"].num_examples
        if 0 <= n < cfg.batch_size:
            raise TfkarpaError(
                f"{data.source}: {n} training image(s) do not fill one batch of {cfg.batch_size} "
                "(pretraining uses full batches, 2 views each); lower batch_size or add images")

    def build(self, cfg, data, placement, run_, steps):
        shape = (cfg.data.image_size, cfg.data.image_size, 3)
        encoder = encoder_of(models.build_classifier(cfg.model, shape, data.num_classes))
        c = cfg.contrastive
        projector = projection_head(encoder.output_shape[-1], c.projection_hidden,
                                    c.projection_dim)
        model = SimCLR(encoder, projector, c.temperature)
        model.compile(optimizer=make_optimizer(cfg.optimizer, cfg.epochs, steps, cfg.batch_size),
                      jit_compile=cfg.xla)
        model(tf.zeros((1, *shape)))  # build, so checkpoints can be restored into it
        train_ds = views_dataset(data.splits["train"], cfg, True, placement.workers)
        val_ds = views_dataset(data.splits["val"], cfg, False, placement.workers)
        if placement.name in ("multi_worker", "tpu"):
            val_ds = val_ds.unbatch().batch(cfg.batch_size, drop_remainder=True)
        sample = next(iter(views_dataset(data.splits["train"], cfg, True).take(1)))[0].numpy()
        return FitParts(model, encoder, train_ds, val_ds, sample, monitor=self.val_metric,
                        callbacks=[RepresentationMonitor(encoder, data, cfg)], reload_best=False)

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        encoder = parts.net
        final = save_final(encoder, run_)
        if placement.name in ("multi_worker", "tpu"):  # measure a local copy (no collectives)
            shape = (cfg.data.image_size, cfg.data.image_size, 3)
            encoder = encoder_of(models.build_classifier(cfg.model, shape, data.num_classes))
            encoder.load_weights(str(final))
        monitor = RepresentationMonitor(encoder, data, cfg)
        test = monitor.measure("test")
        out = runs.claim_output_dir(run_.dir / "eval" / "test", "evaluation", "evaluate out")
        runs.atomic_write_json(out / "report.json", {"split": "test", "source": data.source,
                                                     **test})
        runs.atomic_write_text(out / "report.md", (
            f"# {run_.name}: SimCLR encoder on {data.source} / test\n\n"
            f"kNN accuracy (k={cfg.contrastive.knn_k}, bank = training split): "
            f"{test['knn_accuracy']:.4f}  \n"
            f"linear-probe accuracy (logistic regression on frozen features): "
            f"{test['linear_probe_accuracy']:.4f}  \n"))
        projector_dir = write_projector(encoder, data, cfg, run_.logs)
        metrics = {
            "test_knn_accuracy": test["knn_accuracy"],
            "test_linear_probe_accuracy": test["linear_probe_accuracy"],
            "final_contrastive_accuracy": (hist.get("contrastive_accuracy") or [float("nan")])[-1],
            "best_val_knn_accuracy": max(hist.get("knn_accuracy", [float("nan")])),
            "params": int(encoder.count_params()),
        }
        return metrics, {"encoder_weights": str(final), "test_report": str(out / "report.md"),
                         "projector": str(projector_dir)}

    def report_blocks(self, run_dir, slug):
        metrics = runs.read_json(run_dir / runs.DONE).get("metrics", {})
        rows = [[k, v] for k, v in metrics.items() if "knn" in k or "linear_probe" in k]
        return [Heading(3, "Representation quality"), Table(["figure", "value"], rows)] if rows else []


TASK = PretrainTask()

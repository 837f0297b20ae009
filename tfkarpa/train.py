"""The one fit loop: data, model and optimizer under a strategy, callbacks, resume, export.

`run(cfg)` is the whole `train` command as a library call. Everything that can be checked is
checked before the run directory is created (config, model name, data source, writable paths),
so a mistake leaves nothing behind. Then it claims a run directory (resuming an unfinished twin
through BackupAndRestore), fits, reloads the best checkpoint, evaluates on the test split and
exports a SavedModel. Checkpoints are written atomically; a non-finite loss stops the run at
once, before the epoch's state is saved, with a message naming the epoch and step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import distribute, export, models, optimize, runs
from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.evaluate import evaluate
from tfkarpa.optimize import distill
from tfkarpa.infer import Predictor

log = logging.getLogger(__name__)


class NonFiniteLoss(Exception):
    def __init__(self, epoch: int, step: int, loss: float):
        super().__init__(f"loss became {loss} at epoch {epoch + 1}, step {step + 1}")
        self.epoch, self.step, self.loss = epoch, step, loss


class StopOnNonFiniteLoss(tf.keras.callbacks.Callback):
    """Raise (rather than only stop) so that no callback saves the broken weights."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(getattr(self, "epoch", 0), batch, float(loss))


class AtomicCheckpoint(tf.keras.callbacks.Callback):
    """`last.weights.h5` every epoch and `best.weights.h5` on improvement, via rename.

    Epochs before `first_eligible` (0-based) never count as best: a pruning run's early epochs
    are denser than what it delivers.
    """

    def __init__(self, directory: Path, monitor: str = "val_accuracy", first_eligible: int = 0):
        super().__init__()
        self.directory, self.monitor = Path(directory), monitor
        self.first_eligible = first_eligible
        self.best = -math.inf
        state = self.directory / "best.json"
        if state.exists():  # resumed run: keep comparing against the earlier best
            self.best = json.loads(state.read_text()).get(monitor, -math.inf)

    def _save(self, name: str) -> None:
        final = self.directory / name
        tmp = self.directory / f".tmp-{os.getpid()}-{name}"  # same suffix, same format
        self.model.save_weights(str(tmp))
        os.replace(tmp, final)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save("last.weights.h5")
        value = logs.get(self.monitor)
        if value is not None and value > self.best and epoch >= self.first_eligible:
            self.best = float(value)
            self._save("best.weights.h5")
            runs.atomic_write_json(self.directory / "best.json",
                                   {"epoch": epoch + 1, self.monitor: self.best})


class LearningRateLogger(tf.keras.callbacks.Callback):
    """Put the current learning rate into the epoch logs, where TensorBoard and CSV see it."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        opt = self.model.optimizer
        lr = opt.learning_rate
        if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(opt.iterations)
        logs["learning_rate"] = float(tf.keras.backend.get_value(lr))


class ImageGrid(tf.keras.callbacks.Callback):
    """Write one grid of augmented training images to TensorBoard when training starts."""

    def __init__(self, log_dir: Path, images: np.ndarray):
        super().__init__()
        self.log_dir, self.images = log_dir, images

    def on_train_begin(self, logs=None):
        images = np.clip(self.images[:16], 0, 255).astype(np.uint8)
        side = int(math.ceil(math.sqrt(len(images))))
        pad = np.zeros((side * side - len(images), *images.shape[1:]), np.uint8)
        tiles = np.concatenate([images, pad]).reshape(side, side, *images.shape[1:])
        grid = np.concatenate(np.concatenate(tiles, axis=2), axis=0)  # rows of columns
        scale = max(1, 256 // grid.shape[1])  # small images are unreadable at 1:1 in TensorBoard
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
        writer = tf.summary.create_file_writer(str(self.log_dir / "train"))
        with writer.as_default():
            tf.summary.image("augmented_training_images", grid[None], step=0)
        writer.close()


def make_schedule(cfg: config_lib.OptimizerConfig, epochs: int, steps_per_epoch: int):
    """The learning rate: a schedule over optimizer steps, or a constant."""
    total = max(1, epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
        lr = tf.keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=cfg.lr / max(1, warmup) if warmup else cfg.lr,
            decay_steps=total - warmup, warmup_target=cfg.lr if warmup else None,
            warmup_steps=warmup)
    elif cfg.schedule == "step":
        bounds = [e * steps_per_epoch for e in sorted(cfg.step_epochs)]
        lr = (tf.keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [cfg.lr * cfg.step_factor**i for i in range(len(bounds) + 1)])
            if bounds else cfg.lr)
    else:
        lr = cfg.lr
    return lr


def make_optimizer(cfg: config_lib.OptimizerConfig, epochs: int, steps_per_epoch: int):
    common = {"learning_rate": make_schedule(cfg, epochs, steps_per_epoch), "weight_decay": cfg.weight_decay or None,
              "clipnorm": cfg.clipnorm or None}
    if cfg.name == "sgd":
        opt = tf.keras.optimizers.SGD(momentum=cfg.momentum, nesterov=cfg.momentum > 0, **common)
    elif cfg.name == "adam":
        opt = tf.keras.optimizers.Adam(**common)
    else:
        opt = tf.keras.optimizers.AdamW(**{**common, "weight_decay": cfg.weight_decay})
    if cfg.weight_decay:
        # Decaying BatchNorm scales and biases only hurts; the usual practice leaves them alone.
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return opt


def seed_everything(cfg: config_lib.Config) -> None:
    tf.keras.utils.set_random_seed(cfg.seed)
    # keras-cv's augmentation layers draw from TensorFlow's global generator; seeding it also
    # lets them run under op determinism, which refuses an unseeded one.
    tf.random.set_global_generator(tf.random.Generator.from_seed(cfg.seed))
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
        if cfg.data.augment == "strong":
            log.warning("deterministic=true: keras-cv's RandAugment (data.augment=strong) draws "
                        "unseeded choices, so runs differ slightly; use data.augment=light for "
                        "bit-identical runs")


def default_name(cfg: config_lib.Config) -> str:
    source = cfg.data.source.split(":", 1)
    tail = Path(source[1]).name if len(source) > 1 else ""
    data = "-".join(p for p in (source[0], tail.replace("/", "_")) if p)
    return cfg.name or f"{data}-{cfg.model.name}"


def run(cfg: config_lib.Config, verbose: int = 2, callbacks: list = ()) -> dict:
    """Train, evaluate on the test split, export. Returns {run_dir, artifacts, metrics}.

    `callbacks` are extra Keras callbacks (timers, custom loggers) added to the fit.
    """
    started = time.time()
    models.check_name(cfg.model.name)
    name = default_name(cfg)
    export_dir = Path(cfg.export_dir or Path("saved_models") / name)
    if cfg.export:
        runs.ensure_writable(export_dir.parent, "export_dir parent")
    data = sources.load(cfg.data, cfg.seed)
    sources.require_splits(data)
    log.info("data %s: %s examples, %d classes", data.source,
             {k: s.num_examples for k, s in data.splits.items()}, data.num_classes)

    cfg_dict = config_lib.to_dict(cfg)
    run_ = runs.claim(cfg.runs_root, name, cfg.run_dir, cfg_dict)
    if not cfg.export_dir:  # follow the claimed name: a numbered run must not replace another's
        export_dir = Path("saved_models") / run_.name
    try:
        return _fit_in_run(cfg, cfg_dict, data, run_, verbose, export_dir, started, callbacks)
    except BaseException:
        if not run_.resumed and not (run_.checkpoints / "last.weights.h5").exists():
            run_.discard()  # no epoch finished: nothing to resume, leave nothing behind
        raise
    finally:
        run_.release()


def _fit_in_run(cfg, cfg_dict, data, run_, verbose, export_dir, started, extra_callbacks) -> dict:
    seed_everything(cfg)
    policy_before = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg.mixed_precision)
    try:
        strategy = distribute.get_strategy(cfg.strategy)
        train_ds = pipeline.make_dataset(data.splits["train"], cfg, data.num_classes, training=True)
        val_ds = pipeline.make_dataset(data.splits["val"], cfg, data.num_classes, training=False)
        steps = data.splits["train"].num_examples
        steps = math.ceil(steps / cfg.batch_size) if steps > 0 else int(train_ds.cardinality())
        if steps <= 0:
            steps = sum(1 for _ in train_ds)
        input_shape = (cfg.data.image_size, cfg.data.image_size, 3)
        stage = cfg.stages[-1] if cfg.stages else None
        with strategy.scope():
            model = models.build_classifier(cfg.model, input_shape, data.num_classes)
            wrapped = None
            if stage:
                wrapped = optimize.wrap(stage, model, cfg, cfg.epochs * steps, run_.logs / "train",
                                        earlier=cfg.stages[:-1])
                model = wrapped.model
            net = model  # what the run delivers; `model` is what fits (a Distiller around it)
            if cfg.distill.teacher:
                teacher = distill.load_teacher(cfg.distill.teacher, data.class_names, input_shape)
                model = distill.Distiller(net, teacher, cfg.distill.temperature, cfg.distill.alpha)
            model.compile(
                optimizer=make_optimizer(cfg.optimizer, cfg.epochs, steps),
                loss=tf.keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy"),
                         tf.keras.metrics.TopKCategoricalAccuracy(
                             k=max(1, min(cfg.top_k, data.num_classes - 1)), name="top_k_accuracy")],
            )
        if not run_.resumed:
            config_lib.save(cfg, run_.dir / "config.yaml")
            runs.atomic_write_json(run_.dir / "manifest.json", runs.manifest(
                cfg_dict, data.summary(), {"model": {"name": net.name,
                                                      "params": int(net.count_params())}}))
        log.info("%s run %s: %s, %d parameters", "resuming" if run_.resumed else "starting",
                 run_.dir, net.name, net.count_params())
        sample, _ = next(iter(train_ds))
        stage_callbacks = wrapped.callbacks if wrapped else []
        callbacks = _callbacks(cfg, run_, sample.numpy(), [*stage_callbacks, *extra_callbacks])
        fit_started = time.time()
        try:
            history = model.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                                callbacks=callbacks, verbose=verbose)
        except NonFiniteLoss as err:
            kept = run_.checkpoints / "last.weights.h5"
            raise TfkarpaError(
                f"training stopped: {err}. The last good checkpoint is "
                f"{kept if kept.exists() else '(none: it failed in the first epoch)'}; "
                "lower optimizer.lr or check the data, then re-run to resume"
            ) from None
        fit_seconds = time.time() - fit_started
        if run_.backup.is_dir() and not any(run_.backup.iterdir()):
            run_.backup.rmdir()  # BackupAndRestore empties it once training completes
        hist = _full_history(run_.dir / "history.csv", history.history)
        epochs_run = len(hist.get("loss", []))
        best = run_.checkpoints / "best.weights.h5"
        if best.exists():  # for pruning, only epochs at the target sparsity were eligible
            model.load_weights(str(best))
        model = net
        compression = None
        if stage:
            model = optimize.strip(stage, model)
            compression = {"stage": stage, "stages": cfg.stages, "wrapped": wrapped.wrapped,
                           "skipped": wrapped.skipped, **optimize.sparsity_report(model)}
            runs.atomic_write_json(run_.dir / "compression.json", compression)
        final = run_.checkpoints / "final.weights.h5"
        tmp = run_.checkpoints / f".tmp-{os.getpid()}-final.weights.h5"
        model.save_weights(str(tmp))
        os.replace(tmp, final)

        predictor = Predictor("keras", run_.dir, data.class_names, cfg.data.image_size, cfg,
                              lambda x: model(tf.cast(x, tf.float32), training=False), model)
        test = evaluate(predictor, "test", out_dir=run_.dir / "eval" / "test", data=data,
                        tensorboard_dir=run_.logs / "eval", step=cfg.epochs)
        artifacts = {
            "run_dir": str(run_.dir),
            "config": str(run_.dir / "config.yaml"),
            "manifest": str(run_.dir / "manifest.json"),
            "final_weights": str(final),
            "tensorboard": str(run_.logs),
            "test_report": str(run_.dir / "eval" / "test" / "report.md"),
            "confusion_matrix": str(run_.dir / "eval" / "test" / "confusion_matrix.png"),
        }
        parity = None
        if cfg.export:
            check = export.sample_images(data.splits["val"], cfg, data.num_classes, 64, cfg.seed)
            parity = export.export_saved_model(
                model, data.class_names, cfg.data.image_size, export_dir, check,
                export.artifact_metadata(run_.dir, cfg))
            artifacts["saved_model"] = str(export_dir)
        metrics = {
            "test_accuracy": test["accuracy"],
            **{f"test_{k}": v for k, v in test.items() if k.startswith("top")},
            "best_val_accuracy": max(hist.get("val_accuracy", [float("nan")])),
            "final_train_loss": hist["loss"][-1] if hist.get("loss") else None,
            "epochs_run": epochs_run,
            "fit_seconds": round(fit_seconds, 2),
            "total_seconds": round(time.time() - started, 2),
            "params": int(model.count_params()),
        }
        if parity:
            metrics["export_parity"] = parity
        if compression:
            metrics["sparsity"] = compression["overall_sparsity"]
            artifacts["compression_report"] = str(run_.dir / "compression.json")
        runs.atomic_write_json(run_.dir / runs.DONE, {"metrics": metrics, "artifacts": artifacts,
                                                       "history": hist})
        return {"run_dir": str(run_.dir), "artifacts": artifacts, "metrics": metrics}
    finally:
        tf.keras.mixed_precision.set_global_policy(policy_before)


def _callbacks(cfg, run_: runs.Run, sample: np.ndarray, extra: list) -> list:
    callbacks = [
        StopOnNonFiniteLoss(),
        *extra,
        LearningRateLogger(),
        AtomicCheckpoint(run_.checkpoints, first_eligible=_first_eligible_epoch(cfg)),
        tf.keras.callbacks.CSVLogger(str(run_.dir / "history.csv"), append=True),
        ImageGrid(run_.logs, sample),
        tf.keras.callbacks.TensorBoard(str(run_.logs), write_graph=True, profile_batch=0),
    ]
    if cfg.early_stopping:
        callbacks.append(tf.keras.callbacks.EarlyStopping(
            monitor="val_accuracy", mode="max", patience=cfg.early_stopping))
    # Last, so an epoch is recorded as done only once everything else about it is written.
    callbacks.append(tf.keras.callbacks.BackupAndRestore(str(run_.backup)))
    return callbacks


def _full_history(csv_path: Path, this_session: dict) -> dict:
    """Per-epoch metrics of the whole run: CSVLogger's file spans resumes, Keras' History does
    not. Falls back to this session's history if the file is missing."""
    import csv

    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        rows = []
    if not rows:
        return {k: [float(v) for v in vals] for k, vals in this_session.items()}
    return {key: [float(r[key]) for r in rows if r.get(key) not in (None, "")]
            for key in rows[0] if key != "epoch"}


def _first_eligible_epoch(cfg) -> int:
    """The first epoch whose weights have the run's final structure (pruning: target reached)."""
    if cfg.stages and cfg.stages[-1] == "prune":
        return min(cfg.epochs - 1, math.ceil(cfg.prune.end * cfg.epochs) - 1)
    return 0

"""The fit loop's own Keras callbacks and checkpoint loading.

A non-finite loss raises (so no later callback saves broken weights); checkpoints are written
to a temporary name and renamed; the learning rate goes into the epoch logs; a grid of augmented
training images goes to TensorBoard and the run's `samples.png`; `EpochsCommitted` counts the
epochs whose backup was written, for the message after a lost multi-worker peer.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import runs
from tfkarpa.errors import TfkarpaError


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

    def __init__(self, directory: Path, monitor: str = "val_accuracy", first_eligible: int = 0,
                 state_dir: Path | None = None):
        super().__init__()
        self.directory, self.monitor = Path(directory), monitor
        self.first_eligible = first_eligible
        self.best = -math.inf
        # Workers of a group read the chief's state, so all decide to save at the same epochs
        # (saving reads synchronized variables: a collective every worker must join).
        runs.sweep_temporaries(self.directory)  # a killed run's half-written weights
        state = Path(state_dir or directory) / "best.json"
        if state.exists():  # resumed run: keep comparing against the earlier best
            self.best = json.loads(state.read_text()).get(monitor, -math.inf)

    def _save(self, name: str) -> None:
        final = self.directory / name
        tmp = self.directory / f"{runs.temporary_prefix(name)}{name}"  # same suffix, same format
        self.model.save_weights(str(tmp))
        os.replace(tmp, final)

    def on_epoch_end(self, epoch, logs=None):
        try:
            self._checkpoint(epoch, logs or {})
        except OSError as err:
            # The folder became unwritable or the disk filled up. Every save is a rename of a
            # whole file, so the previous epoch's checkpoint is intact: say so, and stop.
            text = " ".join(str(err).split())[:200]
            raise TfkarpaError(
                f"cannot write a checkpoint in '{self.directory}' after epoch {epoch + 1} "
                f"({text}). The run stays resumable from its last saved epoch: make the folder "
                "writable (or free space), then re-run the same command") from err

    def _checkpoint(self, epoch: int, logs: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._save("last.weights.h5")
        runs.atomic_write_json(self.directory / "last.json", {"epoch": epoch + 1})
        value = logs.get(self.monitor)
        if value is not None and value > self.best and epoch >= self.first_eligible:
            self.best = float(value)
            self._save("best.weights.h5")
            runs.atomic_write_json(self.directory / "best.json",
                                   {"epoch": epoch + 1, self.monitor: self.best})


def load_checkpoint(model: tf.keras.Model, path: Path) -> None:
    """`model.load_weights` that also works under multi-replica strategies.

    A `.weights.h5` file holds the compiled metrics' running totals too. Keras hands their
    h5py datasets straight to `assign`, which a sum-aggregated sync-on-read variable (what a
    metric total is under MirroredStrategy) cannot split over replicas. Metric state is reset
    every epoch, so it is skipped through the layer-level `load_own_variables` hook.
    """
    metrics = list(model.metrics)
    for metric in metrics:
        metric.load_own_variables = lambda store: None
    try:
        model.load_weights(str(path))
    finally:
        for metric in metrics:
            del metric.load_own_variables


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
    """Write one grid of augmented training images to TensorBoard when training starts, and
    keep it as `png` (the run's `samples.png`, shown by `python -m pipelines report`)."""

    def __init__(self, log_dir: Path, images: np.ndarray, png: Path | None = None):
        super().__init__()
        self.log_dir, self.images, self.png = log_dir, images, png

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
        if self.png is not None and grid.shape[-1] in (1, 3):
            runs.atomic_write_bytes(self.png, tf.io.encode_png(grid).numpy())


class EpochsCommitted(tf.keras.callbacks.Callback):
    """Counts epochs whose backup was written (it runs after BackupAndRestore)."""

    epochs = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs = max(self.epochs, epoch)  # a resumed fit starts at the restored epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epochs = epoch + 1

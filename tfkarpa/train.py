"""The one fit loop: data, model and optimizer under a strategy, callbacks, resume, export.

`run(cfg)` is the whole `train` command as a library call (and `pretrain`, `finetune`,
`linear-eval`, and every `compress` stage). Everything that can be checked is checked before the
run directory is created (strategy and TF_CONFIG, config, model name, data source, writable
paths), so a mistake leaves nothing behind. Then it claims a run directory (resuming an
unfinished twin through BackupAndRestore) and hands the task-specific parts to a `Task`:
`ClassifyTask` here, `contrastive.PretrainTask` for SimCLR. The task builds its model, optimizer
and data inside the strategy's scope; the loop fits with the shared callbacks, reloads the best
checkpoint, and the task finishes (evaluates, exports). Checkpoints are written atomically; a
non-finite loss stops the run at once, before the epoch's state is saved, with a message naming
the epoch and step; a lost multi-worker peer stops it with a message that says how to resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import board, distribute, export, models, optimize, runs
from tfkarpa.data import pipeline, sources
from tfkarpa.models import classifiers
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
        logs = logs or {}
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


def scaled_lr(cfg: config_lib.OptimizerConfig, global_batch: int) -> float:
    """The peak learning rate after the batch-size scaling rule (Goyal et al. 2017: linear;
    square root is the gentler rule often used with Adam)."""
    ratio = global_batch / cfg.base_batch
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def make_optimizer(cfg: config_lib.OptimizerConfig, epochs: int, steps_per_epoch: int,
                   global_batch: int | None = None):
    if global_batch is not None and cfg.lr_scaling != "none":
        cfg = dataclasses.replace(cfg, lr=scaled_lr(cfg, global_batch))
    common = {"learning_rate": make_schedule(cfg, epochs, steps_per_epoch),
              "weight_decay": cfg.weight_decay or None, "clipnorm": cfg.clipnorm or None,
              "global_clipnorm": cfg.global_clipnorm or None}
    if cfg.name == "lars":
        from tfkarpa.optimizers import LARS

        return LARS(common["learning_rate"], momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust=cfg.trust, clipnorm=common["clipnorm"],
                    global_clipnorm=common["global_clipnorm"])
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
    return cfg.name or f"{data}-{cfg.model.name}{'-simclr' if cfg.task == 'pretrain' else ''}"


def run(cfg: config_lib.Config, verbose: int = 2, callbacks: list = ()) -> dict:
    """Train, evaluate on the test split, export. Returns {run_dir, artifacts, metrics}.

    `callbacks` are extra Keras callbacks (timers, custom loggers) added to the fit.
    """
    started = time.time()
    # First: multi-worker collectives and logical devices must be set up before TF starts.
    placement = distribute.resolve(cfg.strategy, cfg.devices, cfg.tpu, cfg.worker_timeout)
    placement.per_replica_batch(cfg.batch_size)
    if cfg.xla and placement.replicas > 1 and all("CPU" in d.upper() for d in placement.devices):
        raise TfkarpaError("xla=true cannot compile one step over several CPU devices (XLA "
                           "places each replica's variables on its own device); use xla with "
                           "GPUs or TPUs, or a single device")
    if cfg.xla and cfg.deterministic:
        raise TfkarpaError("xla=true and deterministic=true do not go together: XLA has no "
                           "deterministic kernels for some gradients (MaxPool); choose one")
    task = _task(cfg.task)
    task.check_model(cfg)
    name = default_name(cfg)
    export_dir = Path(cfg.export_dir or Path("saved_models") / name)
    if cfg.export and placement.is_chief:
        runs.ensure_writable(export_dir.parent, "export_dir parent")
    data = task.load_data(cfg)
    task.check(cfg, data)
    log.info("data %s: %s examples, %d classes", data.source,
             {k: s.num_examples for k, s in data.splits.items()}, data.num_classes)

    cfg_dict = config_lib.to_dict(cfg)
    run_ = _claim(cfg, cfg_dict, name, placement)
    if not placement.is_chief:
        export_dir = run_.dir / "export"  # written like the chief's, then removed
    elif not cfg.export_dir:  # follow the claimed name: a numbered run must not replace another's
        export_dir = Path("saved_models") / run_.name
    try:
        result = _fit_in_run(cfg, cfg_dict, data, run_, verbose, export_dir, started, callbacks,
                             placement, task)
        lines = [f"  strategy   {placement.name}: {placement.replicas} replica(s) on "
                 f"{placement.workers} worker(s), {placement.per_replica_batch(cfg.batch_size)} "
                 "images per replica step"]
        if not placement.is_chief:
            lines.append(f"  this worker ({run_.name} task {placement.task['type']} "
                         f"{placement.task['index']}) kept nothing: the chief writes the run")
            result = {**result, "run_dir": None, "artifacts": {}}
        return {**result, "lines": lines}
    except BaseException:
        if not placement.is_chief or (
                not run_.resumed and not (run_.checkpoints / "last.weights.h5").exists()):
            run_.discard()  # no epoch finished: nothing to resume, leave nothing behind
        raise
    finally:
        run_.release()
        if not placement.is_chief:
            shutil.rmtree(run_.dir, ignore_errors=True)


def _claim(cfg, cfg_dict: dict, name: str, placement: distribute.Placement) -> runs.Run:
    """The run directory. Under multi_worker every worker must agree on it without talking, so
    it is exactly `run_dir` or `<runs_root>/<name>` (never numbered); the chief owns it and the
    other workers write into temporary directories that are removed at the end, restoring
    from the chief's backup when the group restarts."""
    if placement.name != "multi_worker":
        return runs.claim(cfg.runs_root, name, cfg.run_dir, cfg_dict)
    shared = Path(cfg.run_dir or Path(cfg.runs_root) / name)
    if placement.is_chief:
        return runs.claim(cfg.runs_root, name, str(shared), cfg_dict)
    # One fixed scratch place per (run, task): a restarted worker replaces what a killed one left.
    key = hashlib.sha1(str(shared.resolve()).encode()).hexdigest()[:10]
    task = f"{placement.task['type']}{placement.task['index']}"
    scratch = Path(tempfile.gettempdir()) / f"tfkarpa-{name}-{key}-{task}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    return runs.Run(scratch, name, resumed=False, shared=shared)


@dataclasses.dataclass
class FitParts:
    """What a task hands the fit loop. Built inside the strategy's scope by `Task.build`."""

    model: tf.keras.Model  # compiled: what `fit` trains (may wrap `net`)
    net: tf.keras.Model  # what the run delivers
    train_ds: tf.data.Dataset
    val_ds: tf.data.Dataset
    sample: np.ndarray  # a batch of training inputs for the TensorBoard grid
    monitor: str = "val_accuracy"  # what `best.weights.h5` maximises
    callbacks: list = dataclasses.field(default_factory=list)  # the task's own, run first
    reload_best: bool = True  # finish from the best checkpoint (else from the last epoch)
    extra: dict = dataclasses.field(default_factory=dict)  # task state for `finish`


class Task:
    """One kind of training (classify, pretrain, ...) on the shared fit loop.

    `check` runs before anything is created; `build` inside the strategy scope returns the
    compiled model and data; `finish` turns the fitted model into the run's deliverables and
    returns (metrics, artifacts). Everything else (run directory, resume, strategy, callbacks,
    checkpoints, errors) is the loop's.
    """

    def check_model(self, cfg: config_lib.Config) -> None:
        models.check_name(cfg.model.name)

    def load_data(self, cfg: config_lib.Config):
        data = sources.load(cfg.data, cfg.seed)
        sources.require_splits(data)
        return data

    def check(self, cfg: config_lib.Config, data: sources.SourceData) -> None:
        pass

    def build(self, cfg, data, placement, run_, steps: int) -> FitParts:
        raise NotImplementedError

    def finish(self, cfg, data, placement, run_, parts: FitParts, export_dir: Path,
               hist: dict) -> tuple[dict, dict]:
        raise NotImplementedError


def _task(name: str) -> Task:
    if name == "pretrain":
        from tfkarpa import contrastive

        return contrastive.PretrainTask()
    if name == "detect":
        from tfkarpa import detection

        return detection.DetectTask()
    return ClassifyTask()


def _fit_in_run(cfg, cfg_dict, data, run_, verbose, export_dir, started, extra_callbacks,
                placement: distribute.Placement, task: Task) -> dict:
    seed_everything(cfg)
    policy_before = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg.mixed_precision)
    try:
        steps = steps_per_epoch(data.splits["train"], cfg.batch_size)
        sync_bn = cfg.model.sync_bn and placement.replicas > 1
        with placement.strategy.scope(), classifiers.synchronized_batch_norm(sync_bn):
            parts = task.build(cfg, data, placement, run_, steps)
        net = parts.net
        if not run_.resumed:
            config_lib.save(cfg, run_.dir / "config.yaml")
            runs.atomic_write_json(run_.dir / "manifest.json", runs.manifest(
                cfg_dict, data.summary(), {
                    "model": {"name": net.name, "params": int(net.count_params())},
                    "distribute": {**placement.describe(cfg.batch_size),
                                   "lr": scaled_lr(cfg.optimizer, cfg.batch_size),
                                   "lr_scaling": cfg.optimizer.lr_scaling,
                                   "mixed_precision": cfg.mixed_precision, "xla": cfg.xla}}))
        log.info("%s run %s: %s, %d parameters", "resuming" if run_.resumed else "starting",
                 run_.dir, net.name, net.count_params())
        callbacks = _callbacks(cfg, run_, parts.sample, [*parts.callbacks, *extra_callbacks],
                               parts.monitor)
        committed = callbacks[-1]
        train_ds, fixed_steps = parts.train_ds, None
        if placement.name in ("multi_worker", "tpu"):
            # Every worker must run the same number of steps (each step's collectives pair up
            # across workers), but their shares of the data differ by a batch or, sharded by
            # file, by whole files. So the data repeats and an epoch is a fixed step count.
            train_ds, fixed_steps = train_ds.repeat(), steps
        start = 0
        if run_.resumed and placement.workers == 1 and fixed_steps is None:
            start = _resume_point(run_, parts.model, steps, cfg.epochs)
            if start < cfg.epochs:
                _advance_to_epoch(train_ds, start or _backed_up_epoch(run_), cfg.deterministic)
        fit_started = time.time()
        try:
            history = parts.model.fit(train_ds, validation_data=parts.val_ds, epochs=cfg.epochs,
                                      initial_epoch=start, steps_per_epoch=fixed_steps,
                                      callbacks=callbacks, verbose=verbose)
        except NonFiniteLoss as err:
            kept = run_.checkpoints / "last.weights.h5"
            raise TfkarpaError(
                f"training stopped: {err}. The last good checkpoint is "
                f"{kept if kept.exists() else '(none: it failed in the first epoch)'}; "
                "lower optimizer.lr or check the data, then re-run to resume"
            ) from None
        except _LOST_PEER_ERRORS as err:
            if placement.workers == 1:
                raise
            raise TfkarpaError(
                f"multi_worker training lost a worker after {committed.epochs} saved epoch(s) "
                f"({type(err).__name__}: {str(err).strip().splitlines()[0][:160]}...). The "
                f"backup in {run_.backup} holds them; start every worker again with the "
                "same command to resume from it") from None
        fit_seconds = time.time() - fit_started
        if placement.is_chief and run_.backup.is_dir() and not any(run_.backup.iterdir()):
            run_.backup.rmdir()  # BackupAndRestore empties it once training completes
        hist = _full_history(run_.dir / "history.csv", history.history)
        best = run_.chief_checkpoints / "best.weights.h5"
        if parts.reload_best and best.exists():  # pruning: only epochs at target sparsity count
            load_checkpoint(parts.model, best)
        metrics, artifacts = task.finish(cfg, data, placement, run_, parts, export_dir, hist)
        metrics.update({
            "final_train_loss": hist["loss"][-1] if hist.get("loss") else None,
            "epochs_run": len(hist.get("loss", [])),
            "fit_seconds": round(fit_seconds, 2),
            "total_seconds": round(time.time() - started, 2),
        })
        artifacts = {"run_dir": str(run_.dir), "config": str(run_.dir / "config.yaml"),
                     "manifest": str(run_.dir / "manifest.json"), "tensorboard": str(run_.logs),
                     **artifacts}
        if placement.is_chief:
            board.write_hparams(run_.logs, run_.name, cfg_dict, metrics)
        runs.atomic_write_json(run_.dir / runs.DONE, {"metrics": metrics, "artifacts": artifacts,
                                                       "history": hist})
        return {"run_dir": str(run_.dir), "artifacts": artifacts, "metrics": metrics}
    finally:
        tf.keras.mixed_precision.set_global_policy(policy_before)


def _resume_point(run_: runs.Run, model: tf.keras.Model, steps: int, epochs: int) -> int:
    """Where a resumed run starts. Returns the epoch; 0 lets BackupAndRestore decide.

    - Training had finished (the backup is gone, `last.json` says every epoch is done): the
      process died in evaluation or export, so the last weights are loaded and nothing is
      trained again.
    - The BackupAndRestore state is checked tensor by tensor (each carries a checksum). If it
      is corrupt it is moved aside and the run resumes from the previous save,
      `last.weights.h5` at the epoch in `last.json`, with a warning: the optimizer's moments
      restart there (its step count, and so the learning-rate schedule, does not).
    """
    last, record = run_.checkpoints / "last.weights.h5", run_.checkpoints / "last.json"
    latest = _backup_checkpoints(run_)
    if not latest:
        if runs.read_json(record).get("epoch") == epochs and last.is_file():
            load_checkpoint(model, last)
            log.info("run %s finished training before it stopped; going on from %s", run_.dir,
                     last)
            return epochs
        return 0
    try:
        for path in latest:
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
        return 0
    except (tf.errors.OpError, ValueError) as err:
        problem = str(err).strip().splitlines()[0][:200]
    aside = run_.dir / f"backup.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(run_.backup, aside)
    epoch = runs.read_json(record).get("epoch", 0)
    if not last.is_file() or not epoch:
        raise TfkarpaError(
            f"run '{run_.dir}': its training backup is corrupt ({problem}; moved to {aside}) "
            f"and there is no earlier save to fall back to; start the run again elsewhere")
    try:
        load_checkpoint(model, last)
    except (OSError, ValueError) as err:
        raise TfkarpaError(f"run '{run_.dir}': its training backup is corrupt ({problem}) and "
                           f"{last} does not load either ({err})") from None
    model.optimizer.iterations.assign(epoch * steps)
    log.warning("run %s: the training backup is corrupt (%s); moved it to %s and resuming "
                "from %s after epoch %d (optimizer moments restart)", run_.dir, problem, aside,
                last, epoch)
    return epoch


def _backup_checkpoints(run_: runs.Run) -> list[str]:
    """The latest checkpoint of each BackupAndRestore state directory (one per worker)."""
    if not run_.backup.is_dir():
        return []
    states = sorted({p.parent for p in run_.backup.rglob("checkpoint")})
    return [c for c in (tf.train.latest_checkpoint(str(d)) for d in states) if c]


def _backed_up_epoch(run_: runs.Run) -> int:
    """The number of epochs BackupAndRestore's backup holds (0 without one)."""
    for path in _backup_checkpoints(run_):
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            if name.startswith("ckpt_saved_epoch"):
                return int(reader.get_tensor(name)) + 1
    return 0


def _advance_to_epoch(train_ds: tf.data.Dataset, epoch: int, replay: bool) -> None:
    """Put the training data's random state where an uninterrupted run would have it at `epoch`.

    Keras opens a new iterator over the training set every epoch; with a fixed seed the shuffle
    draws each iterator's order from one seed generator, in sequence, and keras-cv's
    augmentation layers draw from generators of their own as images pass. A resumed process
    starts all of them again, so its next epoch would repeat epoch 1's order and augmentations.
    Opening one iterator per finished epoch moves the shuffle on (cheap); with `replay`
    (deterministic=true) every finished epoch's data is also read once, without training,
    which moves the augmentation generators too, so the resumed run ends with exactly the
    numbers of an uninterrupted one (tested)."""
    if epoch:
        log.info("moving the training data on to epoch %d%s", epoch + 1,
                 " (reading the finished epochs' data once: deterministic=true)" if replay else "")
    for _ in range(epoch):
        iterator = iter(train_ds)
        if replay:
            for _ in iterator:
                pass


def steps_per_epoch(split: sources.Split, batch_size: int) -> int:
    count = split.num_examples
    if count < 0:  # a source that does not know its size (TFDS mocks): count once
        count = sum(1 for _ in split.make())
    return max(1, math.ceil(count / batch_size))


def save_final(model: tf.keras.Model, run_: runs.Run, name: str = "final.weights.h5") -> Path:
    """Write weights atomically into the run's checkpoints (every worker: reading synchronized
    variables is a collective)."""
    final = run_.checkpoints / name
    tmp = run_.checkpoints / f"{runs.temporary_prefix(name)}{name}"
    model.save_weights(str(tmp))
    os.replace(tmp, final)
    return final


class ClassifyTask(Task):
    """Supervised classification, with optional compression stages and distillation."""

    def load_data(self, cfg):
        data = sources.load(cfg.data, cfg.seed)
        data = sources.with_label_budget(
            data, cfg.data.labels, cfg.data.seed if cfg.data.seed >= 0 else cfg.seed)
        sources.require_splits(data)
        return data

    def check(self, cfg, data):
        if cfg.freeze_backbone and not cfg.backbone:
            raise TfkarpaError("freeze_backbone=true needs backbone=RUN (a pretraining run)")
        if not cfg.backbone:
            return
        from tfkarpa import contrastive

        pre = contrastive.read_pretrain_run(cfg.backbone)
        if pre.data.image_size != cfg.data.image_size:
            raise TfkarpaError(
                f"backbone '{cfg.backbone}' was pretrained on {pre.data.image_size}-pixel images; "
                f"set data.image_size={pre.data.image_size}")
        # The architecture is the backbone's; the head (dropout, head_norm) stays the user's.
        arch = ("name", "depth", "version", "width")
        if any(getattr(cfg.model, k) != getattr(pre.model, k) for k in arch):
            log.info("model architecture comes from the backbone run %s: %s", cfg.backbone,
                     pre.model.name)
            cfg.model = dataclasses.replace(cfg.model, **{k: getattr(pre.model, k) for k in arch})

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
        return FitParts(model, net, train_ds, val_ds, sample.numpy(),
                        callbacks=wrapped.callbacks if wrapped else [],
                        extra={"stage": stage, "wrapped": wrapped})

    def finish(self, cfg, data, placement, run_, parts, export_dir, hist):
        model, stage, wrapped = parts.net, parts.extra["stage"], parts.extra["wrapped"]
        compression = None
        if stage:
            model = optimize.strip(stage, model)
            compression = {"stage": stage, "stages": cfg.stages, "wrapped": wrapped.wrapped,
                           "skipped": wrapped.skipped, **optimize.sparsity_report(model)}
            runs.atomic_write_json(run_.dir / "compression.json", compression)
        final = save_final(model, run_)
        if placement.name in ("multi_worker", "tpu"):
            # Evaluate and export a plain local copy: no collective op (which would need every
            # worker in step) and no TPU-only placement after training.
            from tfkarpa.infer import load_run_model
            model = load_run_model(run_.dir, cfg, data.num_classes)
            predict = lambda x: model(tf.cast(x, tf.float32), training=False)  # noqa: E731
        elif placement.replicas > 1:  # spread the test split over the replicas
            predict = lambda x: model.predict(tf.cast(x, tf.float32), verbose=0,  # noqa: E731
                                              batch_size=cfg.batch_size)
        else:
            predict = lambda x: model(tf.cast(x, tf.float32), training=False)  # noqa: E731
        predictor = Predictor("keras", run_.dir, data.class_names, cfg.data.image_size, cfg,
                              predict, model)
        test = evaluate(predictor, "test", out_dir=run_.dir / "eval" / "test", data=data,
                        tensorboard_dir=run_.logs / "eval", step=cfg.epochs)
        artifacts = {
            "final_weights": str(final),
            "test_report": str(run_.dir / "eval" / "test" / "report.md"),
            "confusion_matrix": str(run_.dir / "eval" / "test" / "confusion_matrix.png"),
        }
        metrics = {
            "test_accuracy": test["accuracy"],
            **{f"test_{k}": v for k, v in test.items() if k.startswith("top")},
            "best_val_accuracy": max(hist.get("val_accuracy", [float("nan")])),
            "params": int(model.count_params()),
        }
        if cfg.export:
            check = export.sample_images(data.splits["val"], cfg, data.num_classes, 64, cfg.seed)
            metrics["export_parity"] = export.export_saved_model(
                model, data.class_names, cfg.data.image_size, export_dir, check,
                export.artifact_metadata(run_.dir, cfg))
            artifacts["saved_model"] = str(export_dir)
        if compression:
            metrics["sparsity"] = compression["overall_sparsity"]
            artifacts["compression_report"] = str(run_.dir / "compression.json")
        return metrics, artifacts


def build_model(cfg: config_lib.Config, input_shape: tuple, classes: int) -> tf.keras.Model:
    """The configured classifier (its backbone from a pretraining run when `backbone=RUN`)."""
    model = models.build_classifier(cfg.model, input_shape, classes)
    if cfg.backbone:
        from tfkarpa import contrastive

        contrastive.load_encoder_into(model, cfg.backbone, cfg.freeze_backbone)
    return model


def _callbacks(cfg, run_: runs.Run, sample: np.ndarray, extra: list,
               monitor: str = "val_accuracy") -> list:
    callbacks = [
        StopOnNonFiniteLoss(),
        *extra,
        LearningRateLogger(),
        AtomicCheckpoint(run_.checkpoints, monitor, first_eligible=_first_eligible_epoch(cfg),
                         state_dir=run_.chief_checkpoints),
        tf.keras.callbacks.CSVLogger(str(run_.dir / "history.csv"), append=True),
        ImageGrid(run_.logs, sample, run_.dir / "samples.png"),
        tf.keras.callbacks.TensorBoard(str(run_.logs), write_graph=True, profile_batch=0),
    ]
    if cfg.early_stopping:
        callbacks.append(tf.keras.callbacks.EarlyStopping(
            monitor=monitor, mode="max", patience=cfg.early_stopping))
    # Last, so an epoch is recorded as done only once everything else about it is written.
    callbacks += [tf.keras.callbacks.BackupAndRestore(str(run_.backup)), EpochsCommitted()]
    return callbacks


# What a collective op raises when a peer worker dies or stops answering.
_LOST_PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                     tf.errors.AbortedError, tf.errors.CancelledError, tf.errors.InternalError)


class EpochsCommitted(tf.keras.callbacks.Callback):
    """Counts epochs whose backup was written (it runs after BackupAndRestore)."""

    epochs = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs = max(self.epochs, epoch)  # a resumed fit starts at the restored epoch

    def on_epoch_end(self, epoch, logs=None):
        self.epochs = epoch + 1


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
    # An epoch logged but not backed up before a crash is trained again on resume: keep the
    # row of the run that went on.
    by_epoch = {r.get("epoch"): r for r in rows}
    rows = [by_epoch[e] for e in sorted(by_epoch, key=lambda e: int(e or 0))]
    # CSVLogger writes "NA" where an epoch did not log a key (monitors that skip epochs).
    return {key: [float(r[key]) for r in rows if r.get(key) not in (None, "", "NA")]
            for key in rows[0] if key != "epoch"}


def _first_eligible_epoch(cfg) -> int:
    """The first epoch whose weights have the run's final structure (pruning: target reached)."""
    if cfg.stages and cfg.stages[-1] == "prune":
        return min(cfg.epochs - 1, math.ceil(cfg.prune.end * cfg.epochs) - 1)
    return 0

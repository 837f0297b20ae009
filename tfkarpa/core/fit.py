"""The one fit loop: data, model and optimizer under a strategy, callbacks, resume, run record.

`run(cfg, task)` is a whole training run as a library call: `train`, `pretrain`, `finetune`,
`linear-eval` and every `compress` stage come here with their task (`tfkarpa.tasks`). Everything
that can be checked is checked before the run directory is created (strategy and TF_CONFIG,
config, model name, data source, writable paths), so a mistake leaves nothing behind. Then it
claims a run directory (resuming an unfinished twin through BackupAndRestore) and asks the task
(`core.task.Task`) for the rest: it builds its model, optimizer and data inside the strategy's
scope; the loop fits with the shared callbacks, reloads the best checkpoint, and the task
finishes (evaluates, exports). Checkpoints are written atomically; a non-finite loss stops the
run at once, before the epoch's state is saved, with a message naming the epoch and step; a lost
multi-worker peer stops it with a message that says how to resume.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import tensorflow as tf

from tfkarpa import board, distribute, runs
from tfkarpa.core import auto
from tfkarpa import config as config_lib
from tfkarpa.core.callbacks import (AtomicCheckpoint, EpochsCommitted, ImageGrid,
                                    LearningRateLogger, NonFiniteLoss, StopOnNonFiniteLoss,
                                    load_checkpoint)
from tfkarpa.core.optim import scaled_lr
from tfkarpa.core.task import FitParts, Task
from tfkarpa.data.splits import Split
from tfkarpa.errors import TfkarpaError
from tfkarpa.models.classifiers import synchronized_batch_norm

log = logging.getLogger(__name__)


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


def default_name(cfg: config_lib.Config, suffix: str = "") -> str:
    """`name`, else `<source>[-<path tail>]-<model><suffix>` (the task's suffix)."""
    source = cfg.data.source.split(":", 1)
    tail = Path(source[1]).name if len(source) > 1 else ""
    data = "-".join(p for p in (source[0], tail.replace("/", "_")) if p)
    return cfg.name or f"{data}-{cfg.model.name}{suffix}"


def check_placement(cfg: config_lib.Config) -> distribute.Placement:
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
    return placement


def run(cfg: config_lib.Config, task: Task, verbose: int = 2, callbacks: list = ()) -> dict:
    """Train, evaluate on the test split, export. Returns {run_dir, artifacts, metrics}.

    `task` is the `core.task.Task` that `cfg.task` names (`tfkarpa.tasks.run` looks it up);
    `callbacks` are extra Keras callbacks (timers, custom loggers) added to the fit.
    """
    started = time.time()
    placement = check_placement(cfg)
    cfg, data, chosen, name, export_dir = _load_and_resolve(cfg, task, placement)

    cfg_dict = config_lib.to_dict(cfg)
    run_ = _claim(cfg, cfg_dict, name, placement)
    if not placement.is_chief:
        export_dir = run_.dir / "export"  # written like the chief's, then removed
    elif not cfg.export_dir:  # follow the claimed name: a numbered run must not replace another's
        export_dir = Path("saved_models") / run_.name
    try:
        try:
            result = _fit_in_run(cfg, cfg_dict, data, run_, verbose, export_dir, started,
                                 callbacks, placement, task, chosen)
        except tf.errors.DataLossError as err:  # a record failing its checksum, read mid-run
            text = " ".join(str(err).split())[:160]
            raise TfkarpaError(
                f"a record of {cfg.data.source} is damaged ({text}); write the data again (for "
                "tfrecord: `python -m pipelines data convert SOURCE out=DIR`), then re-run the "
                "same command: the run resumes from its last saved epoch, if any") from err
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


def _load_and_resolve(cfg, task: Task, placement: distribute.Placement):
    """The data and the config with its auto keys filled in from it, the run's name and export
    folder: (cfg, data, chosen, name, export_dir). The export folder is checked before the data
    is read when the name is known, else (model=auto names the run) right after; always before
    any training."""
    task.check_model(cfg)

    def export_dir_of(cfg):
        name = default_name(cfg, task.run_suffix)
        export_dir = Path(cfg.export_dir or Path("saved_models") / name)
        if cfg.export and placement.is_chief:
            runs.ensure_writable(export_dir.parent, "export_dir parent")
            runs.check_output_dir(export_dir, "saved_model", "export_dir")
        return export_dir

    if cfg.model.name != "auto":
        export_dir_of(cfg)
    data = task.load_data(cfg)
    log.info("data %s: %s examples, %d classes", data.source,
             {k: s.num_examples for k, s in data.splits.items()}, data.num_classes)
    cfg, chosen = auto.resolve(cfg, data, task.auto,
                               lambda batch: steps_per_epoch(data.splits["train"], batch))
    export_dir = export_dir_of(cfg)
    task.check_model(cfg)  # again, with the sizes chosen from the data
    task.check(cfg, data)
    return cfg, data, chosen, default_name(cfg, task.run_suffix), export_dir


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


def _fit_in_run(cfg, cfg_dict, data, run_, verbose, export_dir, started, extra_callbacks,
                placement: distribute.Placement, task: Task, chosen: dict) -> dict:
    seed_everything(cfg)
    policy_before = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(cfg.mixed_precision)
    try:
        steps = steps_per_epoch(data.splits["train"], cfg.batch_size)
        sync_bn = cfg.model.sync_bn and placement.replicas > 1
        with placement.strategy.scope(), synchronized_batch_norm(sync_bn):
            parts = task.build(cfg, data, placement, run_, steps)
        if not run_.resumed:
            record_start(cfg, cfg_dict, data, run_, parts.net, placement, task, chosen)
        log.info("%s run %s: %s, %d parameters", "resuming" if run_.resumed else "starting",
                 run_.dir, parts.net.name, parts.net.count_params())
        fit_started = time.time()
        history = _fit(cfg, run_, parts, steps, placement, verbose, extra_callbacks)
        fit_seconds = time.time() - fit_started
        _drop_empty_backup(run_)
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


def record_start(cfg, cfg_dict: dict, data, run_: runs.Run, net: tf.keras.Model,
                  placement: distribute.Placement, task: Task, chosen: dict) -> None:
    """config.yaml and manifest.json, written once when a run starts (not on resume);
    `chosen`: the settings `core.auto` chose from the data, with the reason for each."""
    runs.save_config(cfg, run_.dir / "config.yaml")
    runs.atomic_write_json(run_.dir / "manifest.json", runs.manifest(
        cfg_dict, data.summary(), {
            "key_metric": task.key_metric,
            "auto": chosen,
            "training": {"epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch(
                data.splits["train"], cfg.batch_size)},
            "model": {"name": net.name, "params": int(net.count_params())},
            "distribute": {**placement.describe(cfg.batch_size),
                           "lr": scaled_lr(cfg.optimizer, cfg.batch_size),
                           "lr_scaling": cfg.optimizer.lr_scaling,
                           "mixed_precision": cfg.mixed_precision, "xla": cfg.xla}}))


def _fit(cfg, run_: runs.Run, parts: FitParts, steps: int, placement: distribute.Placement,
         verbose: int, extra_callbacks) -> tf.keras.callbacks.History:
    """`model.fit` from where the run stands, its failures turned into messages for people."""
    callbacks = _callbacks(cfg, run_, parts, extra_callbacks)
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
            kept = start or _backed_up_epoch(run_)
            _keep_history_before(run_, kept)
            _advance_to_epoch(train_ds, kept, cfg.deterministic)
    try:
        return parts.model.fit(train_ds, validation_data=parts.val_ds, epochs=cfg.epochs,
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


def _resume_point(run_: runs.Run, model: tf.keras.Model, steps: int, epochs: int) -> int:
    """Where a resumed run starts. Returns the epoch; 0 lets BackupAndRestore decide.

    - Training had finished (the backup is gone, `last.json` says every epoch is done): the
      process died in evaluation or export, so the last weights are loaded and nothing is
      trained again.
    - The BackupAndRestore state is checked tensor by tensor (each carries a checksum). If it
      is corrupt it is moved aside (`backup.corrupt-*`) and the run resumes from the previous
      save, `last.weights.h5` at the epoch in `last.json`, with a warning: the optimizer's
      moments restart there (its step count, and so the learning-rate schedule, does not).
    - A backup once moved aside stays the reason: until a new backup exists, every later
      resume falls back the same way or stops naming the files. It never starts over from
      epoch 0 under the run's name and history (a backup that simply is not there yet, as when
      the process died before its first epoch was backed up, does start over: nothing of the
      run was kept).
    """
    last, record = run_.checkpoints / "last.weights.h5", run_.checkpoints / "last.json"
    latest = _backup_checkpoints(run_)
    if not latest:
        if runs.read_json(record).get("epoch") == epochs and last.is_file():
            load_checkpoint(model, last)
            log.info("run %s finished training before it stopped; going on from %s", run_.dir,
                     last)
            return epochs
        earlier = sorted(run_.dir.glob("backup.corrupt-*"))
        if not earlier:
            return 0
        return _fall_back(run_, model, steps, f"its training backup was found corrupt and "
                                              f"moved to {earlier[-1]}")
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
    return _fall_back(run_, model, steps, f"its training backup is corrupt ({problem}; moved "
                                          f"to {aside})")


def _fall_back(run_: runs.Run, model: tf.keras.Model, steps: int, reason: str) -> int:
    """Resume from `last.weights.h5` at the epoch in `last.json`, or stop saying why not."""
    last, record = run_.checkpoints / "last.weights.h5", run_.checkpoints / "last.json"
    epoch = runs.read_json(record).get("epoch", 0)
    if not last.is_file() or not epoch:
        raise TfkarpaError(
            f"run '{run_.dir}': {reason}, and there is no earlier save to fall back to "
            f"({last} after a whole epoch); start the run again under another name")
    try:
        load_checkpoint(model, last)
    except (OSError, ValueError) as err:
        raise TfkarpaError(f"run '{run_.dir}': {reason}, and {last} does not load either "
                           f"({err}); start the run again under another name") from None
    model.optimizer.iterations.assign(epoch * steps)
    log.warning("run %s: %s; resuming from %s after epoch %d (optimizer moments restart)",
                run_.dir, reason, last, epoch)
    return epoch


def _keep_history_before(run_: runs.Run, epoch: int) -> None:
    """Drop history.csv's rows of epochs from `epoch` on: they are trained again, and the file
    then holds each epoch once, as an uninterrupted run's."""
    path = run_.dir / "history.csv"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:]
                        if line.split(",")[0].isdigit() and int(line.split(",")[0]) < epoch]
    if len(kept) < len(lines):
        runs.atomic_write_text(path, "".join(kept))


def _drop_empty_backup(run_: runs.Run) -> None:
    """Remove the backup folder BackupAndRestore emptied when training completed. Every worker
    tries, after its own part is deleted (the chief's `chief/`, another worker's last
    `workertemp_N/`): whichever looks last finds the folder empty, so no worker waits on another.
    """
    try:
        run_.backup.rmdir()
    except OSError:  # not empty (a peer still deleting, or a failed fit's state), or gone
        pass


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


def steps_per_epoch(split: Split, batch_size: int) -> int:
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


def _callbacks(cfg, run_: runs.Run, parts: FitParts, extra: list) -> list:
    monitor = parts.monitor
    callbacks = [
        StopOnNonFiniteLoss(),
        *parts.callbacks,
        *extra,
        LearningRateLogger(),
        AtomicCheckpoint(run_.checkpoints, monitor, first_eligible=parts.first_eligible,
                         state_dir=run_.chief_checkpoints),
        tf.keras.callbacks.CSVLogger(str(run_.dir / "history.csv"), append=True),
        ImageGrid(run_.logs, parts.sample, run_.dir / "samples.png"),
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

"""Ensembles: several finished classification runs made one model, and one run.

`make` checks that the members predict the same classes from the same input size and were
scored on the same test split (the same data and split seed: otherwise one member's test images
could be another's training images), builds one Keras model with every member inside (one
graph: the SavedModel and TFLite files hold them all), evaluates it on the test split and
writes an ordinary run directory: config.yaml (with `ensemble.members` and `ensemble.method`),
each member's config under members/, the combined weights, the test report and, with export,
the checked SavedModel. Everything that takes a run (evaluate, export, benchmark, report,
predict, a distillation teacher) takes an ensemble; `load` rebuilds it from its own directory,
so the member runs may be deleted afterwards.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import models, optimize, runs
from tfkarpa.core.export import artifact_metadata
from tfkarpa.core.fit import save_final
from tfkarpa.data import sources
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

METHODS = ("mean", "vote")
MEMBERS = "members"


class Combine(tf.keras.layers.Layer):
    """The members' probabilities made one: their mean, or their votes (each member's top
    class; the share of members voting for each class, ties broken by the mean probability)."""

    def __init__(self, method: str, **kwargs):
        super().__init__(**kwargs)
        self.method = method

    def call(self, probabilities):
        stacked = tf.stack([tf.cast(p, tf.float32) for p in probabilities])
        mean = tf.reduce_mean(stacked, axis=0)
        if self.method == "mean":
            return mean
        votes = tf.reduce_mean(tf.one_hot(tf.argmax(stacked, -1), tf.shape(mean)[-1]), axis=0)
        scores = votes + 1e-3 * mean
        return scores / tf.reduce_sum(scores, axis=-1, keepdims=True)

    def get_config(self):
        return {**super().get_config(), "method": self.method}


def combine(members: list[tf.keras.Model], method: str, image_size: int) -> tf.keras.Model:
    inputs = tf.keras.Input((image_size, image_size, 3), name="image")
    outputs = []
    for index, member in enumerate(members):
        member._name = f"member{index}_{member.name}"  # nested models need distinct names
        outputs.append(member(inputs, training=False))
    out = Combine(method, name="probabilities", dtype="float32")(outputs)
    return tf.keras.Model(inputs, out, name=f"ensemble{len(members)}_{method}")


def _member_model(cfg: config_lib.Config, num_classes: int) -> tf.keras.Model:
    model_cfg = config_lib.ModelConfig(**{**config_lib.to_dict(cfg)["model"], "weights": ""})
    size = cfg.data.image_size
    return optimize.rebuild(models.build_classifier(model_cfg, (size, size, 3), num_classes),
                            cfg.stages)


def load(run_dir: Path, cfg: config_lib.Config, num_classes: int) -> tf.keras.Model:
    """An ensemble run's model: its members rebuilt from members/*/config.yaml, the combined
    weights loaded from the run."""
    folders = sorted((Path(run_dir) / MEMBERS).iterdir(), key=lambda p: int(p.name))
    model = combine([_member_model(runs.read_config(f), num_classes) for f in folders],
                    cfg.ensemble.method, cfg.data.image_size)
    model.load_weights(str(runs.weights_file(run_dir)))
    return model


def _split_identity(cfg: config_lib.Config, manifest: dict) -> tuple:
    """What decides which images are test images: the data itself and, unless the validation
    and test sets are given as files, the seed that split it."""
    d = cfg.data
    seed = None if d.val else (d.seed if d.seed >= 0 else cfg.seed)
    return (manifest["data"].get("fingerprint"), d.source, d.val, d.test, d.val_fraction,
            d.test_fraction, seed)


def check_members(paths: list[str]) -> list[tuple[Path, config_lib.Config, dict]]:
    """(run, config, metrics) of each member, or an error naming the member that differs."""
    if len(paths) < 2:
        raise TfkarpaError(f"ensemble needs at least two runs, got {len(paths)}")
    if len({Path(p).resolve() for p in paths}) != len(paths):
        raise TfkarpaError("ensemble: a run is listed twice")
    members = []
    for path in map(Path, paths):
        cfg = runs.read_config(path)
        done = runs.read_json(path / runs.DONE)
        if not done:
            raise TfkarpaError(f"ensemble member '{path}' has not finished (no metrics.json)")
        if cfg.task != "classify":
            raise TfkarpaError(f"ensemble member '{path}' is a {cfg.task} run; ensembles "
                               "combine classifiers")
        if cfg.ensemble.members:
            raise TfkarpaError(f"ensemble member '{path}' is an ensemble itself; list its "
                               "members instead")
        members.append((path, cfg, done.get("metrics", {})))
    first, first_cfg, _ = members[0]
    classes = runs.class_names(first)
    identity = _split_identity(first_cfg, runs.read_json(first / "manifest.json"))
    for path, cfg, _ in members[1:]:
        if runs.class_names(path) != classes:
            raise TfkarpaError(f"ensemble member '{path}' predicts other classes than "
                               f"'{first}' ({', '.join(runs.class_names(path)[:5])}... against "
                               f"{', '.join(classes[:5])}...)")
        if cfg.data.image_size != first_cfg.data.image_size:
            raise TfkarpaError(f"ensemble member '{path}' takes {cfg.data.image_size}-pixel "
                               f"images, '{first}' {first_cfg.data.image_size}-pixel ones")
        if _split_identity(cfg, runs.read_json(path / "manifest.json")) != identity:
            raise TfkarpaError(
                f"ensemble member '{path}' was trained and tested on another split of the data "
                f"than '{first}' (another data source or seed): its test images may be the "
                "others' training images. Train the members with the same data.seed")
    return members


def make(paths: list[str], method: str = "mean", name: str = "", runs_root: str = "runs",
         export: bool = True, export_dir: str = "") -> dict:
    """Combine finished runs into one ensemble run; returns {run_dir, artifacts, metrics}."""
    from tfkarpa.tasks.classify import evaluate as evaluate_lib
    from tfkarpa.tasks.classify import predict as predict_lib
    from tfkarpa.tasks.classify import serving

    started = time.time()
    if method not in METHODS:
        raise TfkarpaError(f"ensemble option 'method': '{method}' is not one of "
                           f"{', '.join(METHODS)}")
    members = check_members(paths)
    first, first_cfg, _ = members[0]
    cfg = copy.deepcopy(first_cfg)
    cfg.ensemble = config_lib.EnsembleConfig([str(p.resolve()) for p, _, _ in members], method)
    cfg.name = name or f"{first.name}-ensemble"
    cfg.runs_root, cfg.run_dir, cfg.export, cfg.export_dir = runs_root, "", export, export_dir
    if export:
        runs.ensure_writable(Path(export_dir or "saved_models"), "export_dir")
    classes = runs.class_names(first)
    data = sources.load(cfg.data, cfg.seed)
    model = combine([predict_lib.load_run_model(p, c, len(classes)) for p, c, _ in members],
                    method, cfg.data.image_size)
    cfg_dict = config_lib.to_dict(cfg)
    run_ = runs.claim(cfg.runs_root, cfg.name, "", cfg_dict)
    try:
        runs.save_config(cfg, run_.dir / "config.yaml")
        for index, (path, _, _) in enumerate(members):
            runs.atomic_write_text(run_.dir / MEMBERS / str(index) / "config.yaml",
                                   (path / "config.yaml").read_text())
        scores = [m.get("test_accuracy") for _, _, m in members]
        runs.atomic_write_json(run_.dir / "manifest.json", runs.manifest(cfg_dict, data.summary(), {
            "key_metric": "test_accuracy",
            "model": {"name": model.name, "params": int(model.count_params())},
            "ensemble": {"method": method, "members": [
                {"run": str(p), "model": c.model.name, "test_accuracy": s}
                for (p, c, _), s in zip(members, scores)]}}))
        run_.checkpoints.mkdir(parents=True, exist_ok=True)
        final = save_final(model, run_)
        predictor = predict_lib.Predictor(
            "keras", run_.dir, classes, cfg.data.image_size, cfg,
            lambda x: model(tf.cast(x, tf.float32), training=False), model)
        test = evaluate_lib.evaluate(predictor, "test", out_dir=run_.dir / "eval" / "test",
                                     data=data, tensorboard_dir=run_.logs / "eval")
        best = max(s for s in scores if s is not None) if any(s is not None for s in scores) else None
        metrics = {"test_accuracy": test["accuracy"], "test_ece": test["ece"],
                   **{f"test_{k}": v for k, v in test.items() if k.startswith("top")},
                   "members": len(members), "best_member_test_accuracy": best,
                   "params": int(model.count_params())}
        artifacts = {"run_dir": str(run_.dir), "config": str(run_.dir / "config.yaml"),
                     "final_weights": str(final),
                     "test_report": str(run_.dir / "eval" / "test" / "report.md"),
                     "reliability_diagram": str(run_.dir / "eval" / "test" / "reliability.png")}
        if export:
            target = Path(export_dir or Path("saved_models") / run_.name)
            check = serving.sample_images(data.splits["val"], cfg, data.num_classes, 64, cfg.seed)
            metrics["export_parity"] = serving.export_saved_model(
                model, classes, cfg.data.image_size, target, check,
                artifact_metadata(run_.dir, cfg, ("ensemble",)))
            artifacts["saved_model"] = str(target)
        metrics["total_seconds"] = round(time.time() - started, 2)
        runs.atomic_write_json(run_.dir / runs.DONE, {"metrics": metrics, "artifacts": artifacts,
                                                       "history": {}})
        return {"run_dir": str(run_.dir), "artifacts": artifacts, "metrics": metrics}
    except BaseException:
        run_.discard()
        raise
    finally:
        run_.release()

"""Ensembles of classifiers as one Keras model: the members inside one graph (so SavedModel
and TFLite files hold them all), combined by mean or vote.

`check_members` says whether runs can be combined: the same classes, input size and test split
(the same data and split seed: otherwise one member's test images could be another's training
images). `load` rebuilds an ensemble run's model from its own directory (its members' configs
under members/, the combined weights), so the member runs may be deleted once it is made.
`ensemble_run.make` makes the run.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import models, optimize, runs
from tfkarpa.errors import TfkarpaError

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
    models.load_weights(model, runs.weights_file(run_dir), about=f"ensemble run '{run_dir}'")
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

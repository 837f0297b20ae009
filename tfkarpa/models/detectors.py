"""Detector builders: keras-cv's YOLOv8 and RetinaNet, and our Faster / Cascade R-CNN
(`models.rcnn`), with backbones from explicit sizes.

No presets: a preset downloads. YOLOv8's backbone sizes are those of keras-cv's `yolo_v8_xs`,
`_s` and `_m` presets, written out. RetinaNet sits on the keras-cv backbones the classifier
builders use (`kcv_resnet18`, `kcv_resnet50`, `kcv_csp_darknet_tiny`), whose P3-P5 outputs feed
its feature pyramid. Every family also comes on EfficientNet-Lite0 (`yolov8_lite0`,
`retinanet_lite0`, `faster_rcnn_lite0`, `cascade_rcnn_lite0`, the mask variants), which starts
from ImageNet with `model.weights=imagenet` (offline; its batch norms then stay at ImageNet's
statistics, frozen, as detectors trained in small batches usually keep them). Each detector's
backbone is also a classifier name (`backbone_of`), so a classification or SimCLR run of that
model can initialise the detector (`backbone=RUN`).

Both detectors take float32 images in [0, 255] (the backbones rescale) and boxes in absolute
pixel `xyxy`. Their `prediction_decoder` is keras-cv's `NonMaxSuppression`, configured from
`detect.*`; it is built of TFLite built-in ops, so exported files carry it.
"""

from __future__ import annotations

import difflib
import re
import warnings

import tensorflow as tf

from tfkarpa.config import DetectConfig, ModelConfig
from tfkarpa.errors import TfkarpaError
from tfkarpa.models.backbones import KCV_BACKBONES, YOLO_SIZES, yolo_backbone
from tfkarpa.models.efficientnet_lite import PYRAMID_LEVELS, pretrained_features
from tfkarpa.models.weights import load_weights

BOX_FORMAT = "xyxy"
# keras-cv's Task.__setattr__ touches deprecated Keras 2 properties on every attribute set.
warnings.filterwarnings("ignore", message=r"`(Model\.state_updates|layer\.updates)` will be removed",
                        category=UserWarning)

LITE0 = "efficientnet_lite0"
_YOLO_LITE0 = "yolov8_lite0"
_RETINANET_BACKBONES = {
    "retinanet_lite0": LITE0,
    "retinanet_resnet18": "kcv_resnet18",
    "retinanet_resnet50": "kcv_resnet50",
    "retinanet_csp_darknet_tiny": "kcv_csp_darknet_tiny",
}
# The two-stage family (`models.rcnn`): Faster R-CNN (one box stage) and Cascade R-CNN (three).
_RCNN_BACKBONES = {
    **{f"{family}_rcnn_{backbone}": f"kcv_{backbone}" for family in ("faster", "cascade")
       for backbone in ("resnet18", "resnet50", "csp_darknet_tiny")},
    "faster_rcnn_lite0": LITE0, "cascade_rcnn_lite0": LITE0,
}
DETECTORS = (*YOLO_SIZES, _YOLO_LITE0, *_RETINANET_BACKBONES, *_RCNN_BACKBONES)
# Instance segmentation (task=segment): the same two-stage models with a mask head.
_MASK_RCNN = {name.replace("faster_rcnn", "mask_rcnn").replace("cascade_rcnn", "cascade_mask_rcnn"):
              name for name in _RCNN_BACKBONES}
SEGMENTERS = tuple(_MASK_RCNN)
# Head tensors that join box regression logits and class probabilities (YOLOv8's per-level
# concat, reshape and slices) or produce them: an int8 TFLite export keeps them float, since one
# int8 scale cannot hold both ranges (measured in tasks/detect/serving.py).
INT8_FLOAT_TENSORS = re.compile(r"concat|reshape|getitem|classifier|head_\d_(box|class)_3_conv", re.I)


def check_segmenter(name: str) -> None:
    if name not in SEGMENTERS:
        close = difflib.get_close_matches(name, SEGMENTERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TfkarpaError(f"config key 'model.name': '{name}' does not segment instances{hint} "
                           f"(task=segment takes {', '.join(SEGMENTERS)})")


def has_masks(name: str) -> bool:
    return name in _MASK_RCNN


def check_name(name: str) -> None:
    if name not in DETECTORS and name not in SEGMENTERS:
        close = difflib.get_close_matches(name, DETECTORS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TfkarpaError(f"config key 'model.name': '{name}' is not a detector{hint} (task=detect "
                           f"takes {', '.join(DETECTORS)})")


def backbone_of(name: str) -> str:
    """The classifier whose backbone the detector uses (for `backbone=RUN`)."""
    check_name(name)
    if name in YOLO_SIZES:
        return f"kcv_{name}"
    if name == _YOLO_LITE0:
        return LITE0
    return _RETINANET_BACKBONES.get(name) or _RCNN_BACKBONES[_MASK_RCNN.get(name, name)]


def is_yolo(name: str) -> bool:
    return name in YOLO_SIZES or name == _YOLO_LITE0


def check_weights(model: ModelConfig) -> None:
    """`model.weights=imagenet` is for the detectors on EfficientNet-Lite0 (a file: the
    detector's own weights, loaded whole)."""
    if model.weights == "imagenet" and backbone_of(model.name) != LITE0:
        lite = [n for n in (*DETECTORS, *SEGMENTERS) if "lite0" in n]
        raise TfkarpaError(f"config key 'model.weights': imagenet weights come with the "
                           f"EfficientNet-Lite0 detectors ({', '.join(lite)}), not {model.name}")


def make_backbone(name: str, input_shape: tuple, imagenet: bool = False) -> tf.keras.Model:
    """The backbone classifier `name` builds on, with keras-cv's `pyramid_level_inputs` (the
    layers giving P2-P5) so keras-cv's detectors and ours can read its feature maps."""
    if name != LITE0:
        return KCV_BACKBONES[name](input_shape)
    net = pretrained_features(input_shape, imagenet)
    net.pyramid_level_inputs = dict(PYRAMID_LEVELS)
    if imagenet:
        for layer in net.layers:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                layer.trainable = False  # frozen batch norm: inference mode, ImageNet statistics
    return net


def is_two_stage(name: str) -> bool:
    return name in _RCNN_BACKBONES or name in _MASK_RCNN


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
    check_name(model.name)
    check_input(model.name, input_shape)
    check_weights(model)
    imagenet = model.weights == "imagenet"
    if is_two_stage(model.name):
        detector = two_stage(_MASK_RCNN.get(model.name, model.name), detect, input_shape,
                             classes, masks=has_masks(model.name), model_name=model.name,
                             imagenet=imagenet)
    else:
        detector = _one_stage(model.name, detect, input_shape, classes, imagenet)
    if model.weights and not imagenet:
        load_weights(detector, model.weights, about="config key 'model.weights'",
                     fix="give the weights file of a detector run with the same model settings")
    return detector


def _one_stage(name: str, detect: DetectConfig, input_shape: tuple, classes: int,
               imagenet: bool) -> tf.keras.Model:
    """keras-cv's YOLOv8 or RetinaNet on the named backbone."""
    from tfkarpa import kcv
    keras_cv = kcv.load()

    if is_yolo(name):
        # YOLOv8's class head ends in a sigmoid: its scores are probabilities already.
        backbone = (make_backbone(LITE0, input_shape, imagenet) if name == _YOLO_LITE0
                    else yolo_backbone(name, input_shape))
        detector = keras_cv.models.YOLOV8Detector(
            num_classes=classes, bounding_box_format=BOX_FORMAT, backbone=backbone,
            fpn_depth=detect.fpn_depth, prediction_decoder=decoder(detect, from_logits=False))
    else:
        backbone = make_backbone(_RETINANET_BACKBONES[name], input_shape, imagenet)
        # RetinaNet's class head ends in logits; its decoder applies the sigmoid.
        detector = keras_cv.models.RetinaNet(
            num_classes=classes, bounding_box_format=BOX_FORMAT, backbone=backbone,
            prediction_decoder=decoder(detect))
    detector._name = name
    return detector


def two_stage(name: str, detect: DetectConfig, input_shape: tuple, classes: int,
              masks: bool = False, model_name: str = "", imagenet: bool = False) -> tf.keras.Model:
    """A Faster or Cascade R-CNN (with a mask head if `masks`), built: its weights exist, so
    `load_weights` and `set_weights` work at once."""
    from tfkarpa.models.rcnn.model import TwoStageDetector

    backbone = make_backbone(_RCNN_BACKBONES[name], input_shape, imagenet)
    detector = TwoStageDetector(
        backbone, classes, input_shape[0], cascade=name.startswith("cascade"), masks=masks,
        proposals=detect.proposals, roi_samples=detect.roi_samples, iou=detect.iou,
        confidence=detect.confidence, max_detections=detect.max_detections,
        name=model_name or name)
    detector(tf.zeros((1, *input_shape)))
    return detector


def portable_ops():
    """A context in which detectors trace with TFLite builtin ops only (the two-stage family's
    RoI Align as gathers); TFLite conversion traces inside it."""
    from tfkarpa.models.rcnn.roi import portable

    return portable()


def detector_backbone(detector: tf.keras.Model) -> tf.keras.Model:
    """The backbone model inside a keras-cv detector."""
    backbone = getattr(detector, "backbone", None)
    if backbone is None:
        raise TfkarpaError(f"{detector.name} has no backbone attribute")
    return backbone


def compile_detector(detector: tf.keras.Model, name: str, optimizer, detect: DetectConfig,
                     jit_compile: bool = False) -> None:
    """Compile with the losses of the detector's family: YOLOv8 takes the configured box loss
    (CIoU by default) and binary cross-entropy on its sigmoid scores, RetinaNet smooth L1 and
    focal loss on its logits; the R-CNN family computes its own (`rcnn.model`)."""
    if is_two_stage(name):  # its own losses, in its train_step
        detector.compile(optimizer=optimizer, jit_compile=jit_compile)
    elif is_yolo(name):
        detector.compile(optimizer=optimizer, box_loss=detect.box_loss,
                         classification_loss="binary_crossentropy", jit_compile=jit_compile)
    else:
        detector.compile(optimizer=optimizer, box_loss="smoothl1", classification_loss="focal",
                         jit_compile=jit_compile)

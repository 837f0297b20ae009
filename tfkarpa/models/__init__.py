"""Model builders by name. A dict is the whole registry: name -> function returning a Model."""

from __future__ import annotations

import difflib

from tfkarpa.config import ModelConfig
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import classifiers
from tfkarpa.models.weights import load_weights  # noqa: F401  (the models' one loader)

MODELS = {
    "small_cnn": classifiers.small_cnn,
    "resnet": classifiers.resnet,
    "mobilenet_v2": classifiers.mobilenet_v2,
    "kcv_resnet18": classifiers.kcv_resnet18,
    "kcv_resnet50": classifiers.kcv_resnet50,
    "kcv_csp_darknet_tiny": classifiers.kcv_csp_darknet_tiny,
    "kcv_efficientnet_lite_b0": classifiers.kcv_efficientnet_lite_b0,
    "kcv_yolov8_xxs": classifiers.kcv_yolov8_xxs,
    "kcv_yolov8_xs": classifiers.kcv_yolov8_xs,
    "kcv_yolov8_s": classifiers.kcv_yolov8_s,
    "kcv_yolov8_m": classifiers.kcv_yolov8_m,
    "keras_resnet50": classifiers.keras_resnet50,
    "keras_mobilenet_v2": classifiers.keras_mobilenet_v2,
    "keras_mobilenet_v3_small": classifiers.keras_mobilenet_v3_small,
    "keras_efficientnet_b0": classifiers.keras_efficientnet_b0,
    "efficientnet_lite0": classifiers.efficientnet_lite0,
}
OWN_MODELS = ("small_cnn", "resnet", "mobilenet_v2")  # built here: model.norm applies
# model.weights=imagenet: Keras Applications (downloaded once) and EfficientNet-Lite0 (offline,
# from a pinned package)
PRETRAINED = ("keras_resnet50", "keras_mobilenet_v2", "keras_mobilenet_v3_small",
              "keras_efficientnet_b0", "efficientnet_lite0")


def check_name(name: str) -> None:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TfkarpaError(
            f"config key 'model.name': unknown model '{name}'{hint} (choose from {', '.join(MODELS)})"
        )


def check(cfg: ModelConfig) -> None:
    """The model section's keys that only some models take; before anything is built. `auto`
    passes: the task chooses the model from the data (`core.auto`) and checks again."""
    if cfg.name == "auto":
        return
    check_name(cfg.name)
    if cfg.weights == "imagenet" and cfg.name not in PRETRAINED:
        raise TfkarpaError(f"config key 'model.weights': imagenet weights come with "
                           f"{', '.join(PRETRAINED)}, not {cfg.name}; "
                           "or give a weights file of your own")
    if cfg.norm != "batch" and cfg.name not in OWN_MODELS:
        raise TfkarpaError(f"config key 'model.norm': {cfg.norm} normalisation is for tfkarpa's "
                           f"own models ({', '.join(OWN_MODELS)}), not {cfg.name}")
    if cfg.drop_path and cfg.name != "resnet":
        raise TfkarpaError(f"config key 'model.drop_path': stochastic depth skips residual "
                           f"blocks of resnet, not {cfg.name}")


def build_classifier(cfg: ModelConfig, input_shape: tuple, classes: int):
    """Build the configured classifier; start from ImageNet (`model.weights=imagenet`, Keras
    Applications models) or from the user's weights file if one is given."""
    check(cfg)
    imagenet = cfg.weights == "imagenet"
    with classifiers.normalization(cfg.norm):
        model = MODELS[cfg.name](input_shape, classes, depth=cfg.depth, version=cfg.version,
                                 width=cfg.width, dropout=cfg.dropout, head_norm=cfg.head_norm,
                                 imagenet=imagenet, drop_path=cfg.drop_path)
    if cfg.weights and not imagenet:
        load_weights(model, cfg.weights, about="config key 'model.weights'",
                     fix="give the weights file of a run with the same model settings")
    return model

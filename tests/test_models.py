"""Model builders: shapes, sizes against the papers, the errors for bad arguments."""

import numpy as np
import pytest
import tensorflow as tf

from tfkarpa import config
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import MODELS, build_classifier, classifiers


@pytest.mark.parametrize("name", ["small_cnn", "resnet", "mobilenet_v2"])
def test_builders_output_probabilities(name):
    model = MODELS[name]((32, 32, 3), 7, depth=20, version=1, width=0.5)
    out = model(tf.random.uniform((2, 32, 32, 3), 0, 255))
    assert out.shape == (2, 7) and out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy().sum(-1), 1.0, rtol=1e-5)
    assert model.input.name.startswith("image")


@pytest.mark.slow
def test_resnet_sizes_match_the_paper():
    # He et al. 2016 list 0.27M parameters for ResNet-20 and 0.85M for ResNet-56 (CIFAR-10).
    assert classifiers.resnet((32, 32, 3), 10, depth=20).count_params() == pytest.approx(0.27e6, rel=0.03)
    assert classifiers.resnet((32, 32, 3), 10, depth=56).count_params() == pytest.approx(0.85e6, rel=0.03)
    v2 = classifiers.resnet((32, 32, 3), 10, depth=20, version=2)
    assert any("pre_bn" in layer.name for layer in v2.layers)


def test_resnet_rejects_bad_depth():
    with pytest.raises(TfkarpaError, match="6n\\+2"):
        classifiers.resnet((32, 32, 3), 10, depth=21)


@pytest.mark.slow
def test_mobilenet_width_multiplier_scales_parameters():
    small = classifiers.mobilenet_v2((32, 32, 3), 10, width=0.35).count_params()
    full = classifiers.mobilenet_v2((32, 32, 3), 10, width=1.0).count_params()
    assert small < full / 3
    # Small inputs keep resolution longer: 32x32 ends at 4x4, 224 at 7x7.
    m = classifiers.mobilenet_v2((32, 32, 3), 10, width=0.35)
    assert m.get_layer("top_conv").output.shape[1] == 4


@pytest.mark.slow
def test_keras_cv_backbone_builds_without_presets():
    model = MODELS["kcv_csp_darknet_tiny"]((32, 32, 3), 5)
    assert model(tf.zeros((1, 32, 32, 3))).shape == (1, 5)


def test_unknown_model_and_user_weights(tmp_path):
    cfg = config.build(overrides=["model=resnet_20"])
    with pytest.raises(TfkarpaError, match="did you mean 'resnet'"):
        build_classifier(cfg.model, (16, 16, 3), 3)
    base = build_classifier(config.build(overrides=["model.width=0.25"]).model, (16, 16, 3), 3)
    path = tmp_path / "w.weights.h5"
    base.save_weights(str(path))
    cfg = config.build(overrides=["model.width=0.25", f"model.weights={path}"])
    again = build_classifier(cfg.model, (16, 16, 3), 3)
    np.testing.assert_array_equal(again.get_weights()[0], base.get_weights()[0])
    bad = config.build(overrides=["model.width=0.5", f"model.weights={path}"])
    with pytest.raises(TfkarpaError, match="model.weights"):
        build_classifier(bad.model, (16, 16, 3), 3)


def test_mixed_precision_keeps_float32_probabilities():
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = classifiers.small_cnn((16, 16, 3), 4, width=0.25)
        assert model.get_layer("stage1a_conv").compute_dtype == "bfloat16"
        model.compile(optimizer="sgd", loss="categorical_crossentropy")
        x = tf.random.uniform((8, 16, 16, 3), 0, 255)
        y = tf.one_hot(tf.range(8) % 4, 4)
        loss = model.train_on_batch(x, y)
        assert np.isfinite(loss)
        assert model(x).dtype == tf.float32
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)


@pytest.mark.slow
def test_yolov8_xxs_is_the_narrow_demo_detector():
    """Half yolov8_xs' channels and one block per stage: about 1.0 M parameters as a detector
    (the demo's), and its backbone is a classifier too (for backbone=RUN)."""
    from tfkarpa.models import detectors

    cfg = config.build(overrides=["task=detect", "model=yolov8_xxs"])
    detector = detectors.build_detector(cfg.model, cfg.detect, (64, 64, 3), 6)
    assert 0.9e6 < detector.count_params() < 1.2e6
    assert detectors.backbone_of("yolov8_xxs") == "kcv_yolov8_xxs"
    assert MODELS["kcv_yolov8_xxs"]((64, 64, 3), 6).output.shape[-1] == 6


@pytest.mark.slow
def test_imagenet_weights_come_from_the_keras_cache_and_name_the_file(tmp_path, monkeypatch):
    """model.weights=imagenet loads Keras Applications' file from $KERAS_HOME/models (written
    here by the test: nothing is downloaded) and, when it is missing and cannot be fetched,
    names the file, the address and the folder."""
    from tfkarpa.models import applications

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cfg = config.build(overrides=["model=keras_mobilenet_v2", "model.width=0.35",
                                  "model.weights=imagenet"]).model
    file = tmp_path / "keras" / "models" / (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5")
    file.parent.mkdir(parents=True)
    stand_in = tf.keras.applications.MobileNetV2(include_top=False, weights=None,
                                                 input_shape=(96, 96, 3), alpha=0.35)
    stand_in.save_weights(str(file))  # what Keras would have downloaded, in its format
    model = build_classifier(cfg, (96, 96, 3), 4)
    loaded = model.get_layer("keras_mobilenet_v2_backbone").get_layer(stand_in.name)
    for mine, theirs in zip(loaded.get_weights(), stand_in.get_weights()):
        np.testing.assert_array_equal(mine, theirs)
    assert model(tf.zeros((1, 96, 96, 3))).shape == (1, 4)

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tf.keras.utils, "get_file", offline)
    efficient = config.build(overrides=["model=keras_efficientnet_b0",
                                        "model.weights=imagenet"]).model
    with pytest.raises(TfkarpaError, match=r"efficientnetb0_notop.h5 is not in .*keras/models "
                                           r"and could not be fetched from https://storage"):
        build_classifier(efficient, (32, 32, 3), 4)
    with pytest.raises(TfkarpaError, match="imagenet weights come with keras_resnet50, .*efficientnet_lite0, not small_cnn"):
        build_classifier(config.build(overrides=["model.weights=imagenet"]).model,
                         (32, 32, 3), 4)


@pytest.mark.slow
def test_group_norm_replaces_every_batch_norm_in_our_own_models():
    import tensorflow as tf

    from tfkarpa import config, models

    for name in ("small_cnn", "resnet", "mobilenet_v2"):
        cfg = config.build(overrides=[f"model={name}", "model.norm=group", "model.width=0.25",
                                      "model.depth=8"]).model
        model = models.build_classifier(cfg, (16, 16, 3), 3)
        kinds = {type(layer).__name__ for layer in model.layers}
        assert "GroupNormalization" in kinds and "BatchNormalization" not in kinds, name
    with pytest.raises(TfkarpaError, match="'model.norm': group normalisation is for"):
        models.build_classifier(config.build(overrides=["model=kcv_resnet18",
                                                        "model.norm=group"]).model, (32, 32, 3), 3)
    plain = models.build_classifier(config.build(overrides=["model.width=0.25"]).model,
                                    (16, 16, 3), 3)
    assert any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in plain.layers)

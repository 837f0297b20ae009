"""LP-FT: the classifier's last layer set by logistic regression on the starting network's
features before every layer fine-tunes (`model.head_init`)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfkarpa import tasks
from tfkarpa.data import sources
from tfkarpa.models import MODELS
from tfkarpa.tasks.classify import probe
from tfkarpa.tasks.classify.task import build_model


def test_the_folded_probe_is_scikit_learns_on_the_raw_features():
    """The standardisation folded into the kernel gives scikit-learn's own decision values on
    the raw features; two classes fill the second column (the first stays 0); a class the
    images lack keeps a zero column."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(0, 1, (300, 8)) * [1, 5, 0.1, 1, 1, 1, 1, 1] + 3
    x[:, 0] += 2 * y  # separable along one feature at another scale
    kernel, bias = probe.fit_head(x, y, 4)
    assert kernel.shape == (8, 4) and bias.shape == (4,)
    mu, sigma = x.mean(0), x.std(0) + 1e-6
    reference = LogisticRegression(max_iter=1000, C=1.0).fit((x - mu) / sigma, y)
    np.testing.assert_allclose((x @ kernel + bias)[:, :3],
                               reference.decision_function((x - mu) / sigma), atol=1e-3)
    assert not kernel[:, 3].any() and bias[3] == 0
    two = np.where(y == 2, 1, 0)
    kernel, bias = probe.fit_head(x, two, 2)
    assert not kernel[:, 0].any() and bias[0] == 0
    assert np.mean(np.argmax(x @ kernel + bias, 1) == two) > 0.9


@pytest.mark.parametrize("name", ["small_cnn", "mobilenet_v2", "efficientnet_lite0",
                                  "kcv_resnet18", "keras_mobilenet_v3_small"])
def test_each_kind_of_classifier_ends_with_the_layer_the_probe_sets(name):
    """Our own, EfficientNet-Lite0, keras-cv and Keras Applications builders all end in the
    shared head (`classifiers._head`)."""
    model = MODELS[name]((32, 32, 3), 3, depth=20, version=1, width=0.25)
    assert model.get_layer(probe.LAYER).units == 3
    assert model.layers[-1].name == "probabilities"


def test_probe_head_sets_the_layer_and_wanted_follows_the_key(tmp_path):
    cfg = tiny_config(tmp_path, "model.head_init=probe")
    assert probe.wanted(cfg)
    assert not probe.wanted(tiny_config(tmp_path))  # the default: Keras' initialiser
    assert not probe.wanted(tiny_config(tmp_path, "model=efficientnet_lite0",
                                        "model.weights=imagenet"))  # also from ImageNet
    data = sources.load(cfg.data, cfg.seed)
    model = build_model(cfg, (16, 16, 3), data.num_classes)
    before = model.get_layer("logits").get_weights()[0].copy()
    info = probe.probe_head(model, data.splits["train"], cfg, data.num_classes)
    assert info["images"] == data.splits["train"].num_examples
    assert not np.allclose(model.get_layer("logits").get_weights()[0], before)
    # The model's own predictions on those images are the probe's: its reported accuracy.
    x, y = probe.features(model, data.splits["train"], cfg, data.num_classes, probe.MAX_IMAGES)
    predicted = np.argmax(model.get_layer("logits")(tf.constant(x)).numpy(), axis=1)
    assert np.mean(predicted == y) == pytest.approx(info["train_accuracy"], abs=1e-4)
    assert info["train_accuracy"] > 1.5 / data.num_classes  # random features, still above chance


@pytest.mark.slow
def test_a_probed_run_records_it_and_a_random_one_does_not(tmp_path):
    probed = tasks.run(tiny_config(tmp_path, "model.head_init=probe", "epochs=1"), verbose=0)
    assert 0 < probed["metrics"]["head_probe_train_accuracy"] <= 1
    plain = tasks.run(tiny_config(tmp_path / "b", "epochs=1"), verbose=0)
    assert "head_probe_train_accuracy" not in plain["metrics"]
    done = json.loads((tmp_path / "runs").joinpath(
        probed["run_dir"].split("/")[-1], "metrics.json").read_text())
    assert done["metrics"]["head_probe_train_accuracy"] == probed["metrics"]["head_probe_train_accuracy"]

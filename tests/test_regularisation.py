"""MixUp/CutMix (`data.mix`), stochastic depth (`model.drop_path`) and calibration (ECE and
the reliability diagram) in classifier reports."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from tfkarpa import config, models
from tfkarpa.data import pipeline, sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify.evaluate import calibration


@pytest.mark.parametrize("text, parsed", [("off", None), ("mixup", ("mixup", 0.2)),
                                          ("cutmix", ("cutmix", 1.0)),
                                          ("MixUp:0.4", ("mixup", 0.4))])
def test_mix_names_a_method_and_its_alpha(text, parsed):
    assert config.parse_mix(text) == parsed


@pytest.mark.parametrize("text", ["mixdown", "mixup:", "mixup:-1", "cutmix:x", "off:1"])
def test_a_bad_mix_is_refused(text):
    with pytest.raises(TfkarpaError, match="data.mix"):
        config.parse_mix(text)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_batches_carry_soft_labels_that_match_their_pixels(tmp_path, mix):
    cfg = tiny_config(tmp_path, f"data.mix={mix}:1.0", "data.augment=off", "batch_size=64")
    data = sources.load(cfg.data, cfg.seed)
    plain_cfg = tiny_config(tmp_path, "data.augment=off", "batch_size=64")
    split = data.splits["train"]
    images, labels = next(iter(pipeline.make_dataset(split, cfg, data.num_classes, True)))
    plain, hard = next(iter(pipeline.make_dataset(split, plain_cfg, data.num_classes, True)))
    labels = labels.numpy()
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-5)
    assert set(np.unique(hard.numpy())) == {0.0, 1.0}  # without mix: one-hot as before
    mixed = labels.max(-1) < 1 - 1e-6
    assert mixed.mean() > 0.5  # Beta(1, 1) ratios: almost every example is a blend
    if mix == "mixup":
        # Blended pixels: values that no 0..255 integer image has.
        assert np.any(np.abs(images.numpy() - np.round(images.numpy())) > 1e-3)
    else:
        # Pasted boxes: pixels stay integers, and an image's label share of its own class is
        # its share of its own pixels, so no label is above 1 or below 0.
        assert np.allclose(images.numpy(), np.round(images.numpy()))
        assert labels.min() >= 0 and labels.max() <= 1 + 1e-6
    # Evaluation pipelines never mix.
    _, eval_labels = next(iter(pipeline.make_dataset(data.splits["val"], cfg, data.num_classes,
                                                     False)))
    assert set(np.unique(eval_labels.numpy())) == {0.0, 1.0}


def test_ece_of_known_predictions():
    # Two confidence bins: 0.95 (4 predictions, 3 right) and 0.55 (2 predictions, 2 right).
    probs = np.array([[0.95, 0.05]] * 4 + [[0.45, 0.55]] * 2)
    labels = np.array([0, 0, 0, 1, 1, 1])
    result = calibration(labels, probs, bins=10)
    expected = 4 / 6 * abs(0.75 - 0.95) + 2 / 6 * abs(1.0 - 0.55)
    assert result["ece"] == pytest.approx(expected)
    full = [b for b in result["bins"] if b["count"]]
    assert [(b["low"], b["count"], b["accuracy"]) for b in full] == [(0.5, 2, 1.0), (0.9, 4, 0.75)]
    assert result["mean_confidence"] == pytest.approx((0.95 * 4 + 0.55 * 2) / 6)
    # Perfectly confident and right: 0.
    assert calibration(np.array([1, 0]), np.array([[0.0, 1.0], [1.0, 0.0]]))["ece"] == 0.0


def test_drop_path_skips_resnet_blocks_in_training_only():
    cfg = config.ModelConfig(name="resnet", depth=8, width=0.25, drop_path=0.6)
    net = models.build_classifier(cfg, (16, 16, 3), 4)
    rates = [round(layer.rate, 3) for layer in net.layers if "drop_path" in layer.name]
    assert rates == [0.2, 0.4, 0.6]  # linear in depth, the last block at drop_path
    x = np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    np.testing.assert_array_equal(net(x, training=False), net(x, training=False))
    outputs = {net(x, training=True).numpy().round(5).tobytes() for _ in range(10)}
    assert len(outputs) > 1  # some steps skipped a block, some did not
    plain = models.build_classifier(config.ModelConfig(name="resnet", depth=8, width=0.25),
                                    (16, 16, 3), 4)
    assert net.count_params() == plain.count_params()  # no weights of its own


def test_a_run_reports_its_calibration(trained_run):
    run = Path(trained_run["run_dir"])
    report = json.loads((run / "eval" / "test" / "report.json").read_text())
    assert 0 <= report["ece"] <= 1 and report["ece"] == trained_run["metrics"]["test_ece"]
    assert sum(b["count"] for b in report["calibration"]["bins"]) == report["examples"]
    assert "expected calibration error (15 bins)" in (run / "eval" / "test" / "report.md").read_text()
    png = Path(trained_run["artifacts"]["reliability_diagram"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


@pytest.mark.slow
def test_a_mixed_resnet_with_stochastic_depth_trains_and_exports(tmp_path):
    from tfkarpa import tasks

    cfg = tiny_config(tmp_path, "data.mix=cutmix", "model=resnet", "model.depth=8",
                      "model.drop_path=0.2", "epochs=1")
    result = tasks.run(cfg, verbose=0)
    assert np.isfinite(result["metrics"]["final_train_loss"])
    assert result["metrics"]["export_parity"]["max_abs_diff"] <= 1e-4  # scaled as in Keras
    recorded = config.load_yaml(Path(result["run_dir"]) / "config.yaml")
    assert recorded["data"]["mix"] == "cutmix" and recorded["model"]["drop_path"] == 0.2

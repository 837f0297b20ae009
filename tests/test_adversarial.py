"""Adversarial robustness: our PGD (training) stays in its budget and raises the loss; evaluate
reports robust accuracy made by ART on a run and transferred to its SavedModel; adversarial
training logs val_robust_accuracy and keeps the most robust epoch; bad options are refused."""

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from pipelines.__main__ import main
from tfkarpa import tasks
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify import adversarial


@pytest.fixture(scope="module")
def keras_run(trained_run):
    predictor = tasks.load_predictor(trained_run["run_dir"])
    data = tasks.get("classify").load_data(predictor.config)
    from tfkarpa.tasks.classify.serving import sample_images

    images, labels = sample_images(data.splits["test"], predictor.config, data.num_classes, 24,
                                   0, labels=True)
    return predictor, images.astype(np.float32), labels


def test_pgd_stays_within_its_radius_and_raises_the_loss(keras_run):
    predictor, images, labels = keras_run
    radius = 8.0
    adv = adversarial.pgd(predictor.model, images, labels, radius, steps=5).numpy()
    assert np.abs(adv - images).max() <= radius + 1e-3
    assert adv.min() >= 0 and adv.max() <= 255

    def loss(x):
        return float(tf.reduce_mean(adversarial._cross_entropy(
            labels, predictor.model(x, training=False))))

    assert loss(adv) > loss(images)


def test_attacked_images_are_whole_pixels_within_the_budget():
    clean = np.array([[0.0, 100.0, 255.0]])
    attacked = adversarial.as_images(np.array([[-3.7, 102.6, 251.2]]), clean, radius=2.55)
    assert attacked.dtype == np.uint8 and attacked.tolist() == [[0, 102, 253]]


def test_evaluate_reports_robust_accuracy_for_a_run_and_its_saved_model(trained_run, tmp_path,
                                                                         capsys):
    run, saved = trained_run["run_dir"], trained_run["artifacts"]["saved_model"]
    out = tmp_path / "eval"
    assert main(["evaluate", run, "attack=pgd", "eps=8/255", "attack_steps=5",
                 f"out={out}", "--json", "--quiet"]) == 0
    white = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metrics"]
    assert white["robust_accuracy_pgd"] <= white["accuracy"]
    report = json.loads((out / "report.json").read_text())["robust"]
    assert report == {"attack": "pgd", "eps": "8/255", "steps": 5, "transfer": False,
                      "accuracy": white["robust_accuracy_pgd"]}
    assert "robust accuracy under pgd (eps 8/255, 5 step(s)): " in (out / "report.md").read_text()

    assert main(["evaluate", saved, "attack=fgsm", f"out={tmp_path / 'sm'}", "--json",
                 "--quiet"]) == 0
    transfer = json.loads((tmp_path / "sm" / "report.json").read_text())["robust"]
    assert transfer["transfer"] is True and transfer["eps"] == "2/255"  # the default budget
    assert 0 <= transfer["accuracy"] <= 1


@pytest.mark.parametrize("options, message", [
    (["attack=cw"], "'cw' is not one of fgsm, pgd"),
    (["attack=pgd", "eps=0"], "not a radius in (0, 1]"),
    (["attack=pgd", "eps=0.5/255"], "under one grey level"),
    (["attack=pgd", "attack_steps=0"], "attack_steps"),
    (["eps=2/255"], "need attack=fgsm|pgd"),
])
def test_bad_attack_options_are_refused(trained_run, tmp_path, capsys, options, message):
    out = tmp_path / "eval"
    assert main(["evaluate", trained_run["run_dir"], *options, f"out={out}", "--quiet"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_detector_refuses_attacks():
    with pytest.raises(TfkarpaError, match="for classifiers; 'det' is a detector"):
        tasks.get("detect").evaluate(SimpleNamespace(path="det"), options={"attack": "pgd"})


def test_trades_training_logs_robust_accuracy_and_keeps_the_most_robust_epoch(tmp_path):
    cfg = tiny_config(tmp_path, "adversarial=trades", "adversarial.eps=4/255",
                      "adversarial.steps=2", "adversarial.robust_images=32", "export=false")
    result = tasks.run(cfg, verbose=0)
    run = Path(result["run_dir"])
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    robust = [float(r["val_robust_accuracy"]) for r in rows]
    assert len(robust) == 2 and all(0 <= r <= 1 for r in robust)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["val_robust_accuracy"] == pytest.approx(max(robust))

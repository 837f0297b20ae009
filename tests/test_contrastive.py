"""SimCLR: the loss against a plain NumPy version and across replicas, the views, LARS, a tiny
pretrain -> fine-tune -> linear-eval chain, label budgets and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_config
from tfkarpa import config, distribute, tasks
from tfkarpa.data import sources
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify.task import build_model
from tfkarpa.tasks.pretrain import model as simclr
from tfkarpa.tasks.pretrain import views

PRETRAIN = ["task=pretrain", "optimizer=lars", "optimizer.lr=0.3", "optimizer.weight_decay=1e-6",
            "contrastive.projector_images=40"]


def numpy_nt_xent(z1, z2, t):
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    sim = z @ z.T / t
    np.fill_diagonal(sim, -np.inf)
    partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    log_prob = sim[np.arange(2 * n), partner] - np.log(np.exp(sim).sum(1))
    return -(log_prob[:n] + log_prob[n:])  # per pair, as nt_xent returns it


def test_nt_xent_matches_the_definition():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 8, 5)).astype(np.float32)
    loss, hit = simclr.nt_xent(tf.constant(z1), tf.constant(z2), 0.5)
    np.testing.assert_allclose(loss.numpy(), numpy_nt_xent(z1, z2, 0.5), rtol=1e-5)
    _, hit = simclr.nt_xent(tf.constant(z1), tf.constant(z1 * 3), 0.1)
    assert hit.numpy().all()  # a view's partner is itself scaled: always the nearest


def test_nt_xent_gathers_negatives_across_replicas():
    strategy = distribute.resolve("mirrored", ["/cpu:0", "/cpu:1"]).strategy
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(2, 8, 5)).astype(np.float32)

    def per_replica(ctx):
        i = ctx.replica_id_in_sync_group
        return tf.constant(z1)[i * 4:(i + 1) * 4], tf.constant(z2)[i * 4:(i + 1) * 4]

    v1 = strategy.experimental_distribute_values_from_function(lambda c: per_replica(c)[0])
    v2 = strategy.experimental_distribute_values_from_function(lambda c: per_replica(c)[1])
    step = tf.function(lambda x, y: strategy.run(  # as in training: inside a tf.function
        lambda a, b: simclr.nt_xent(a, b, 0.5)[0], args=(x, y)))
    losses = step(v1, v2)
    gathered = np.concatenate([t.numpy() for t in strategy.experimental_local_results(losses)])
    # Each replica's pairs saw all 16 views as candidates: the one-device loss, exactly.
    np.testing.assert_allclose(gathered, numpy_nt_xent(z1, z2, 0.5), rtol=1e-5)


@pytest.mark.slow
def test_views_are_two_different_augmentations_of_each_image(tmp_path):
    cfg = tiny_config(tmp_path, *PRETRAIN, "contrastive.blur_prob=0.5")
    data = sources.load(cfg.data, cfg.seed)
    v1, v2 = next(iter(views.views_dataset(data.splits["train"], cfg, training=True)))
    assert v1.shape == v2.shape == (cfg.batch_size, 16, 16, 3)
    assert 0 <= float(tf.reduce_min(v1)) and float(tf.reduce_max(v1)) <= 255.5
    assert float(tf.reduce_mean(tf.abs(v1 - v2))) > 1.0


def _stages(cfg):
    return [type(layer).__name__ for layer in views.view_augmenter(cfg, 0).layers]


@pytest.mark.slow
def test_rotation_is_an_optional_view_stage(tmp_path):
    assert "RandomRotation" not in _stages(tiny_config(tmp_path, *PRETRAIN))
    cfg = tiny_config(tmp_path, *PRETRAIN, "contrastive.rotation=0.5")
    assert _stages(cfg)[:3] == ["RandomCropAndResize", "RandomFlip", "RandomRotation"]
    data = sources.load(cfg.data, cfg.seed)
    v1, v2 = next(iter(views.views_dataset(data.splits["train"], cfg, training=True)))
    assert 0 <= float(tf.reduce_min(v1)) and float(tf.reduce_max(v1)) <= 255.5
    with pytest.raises(TfkarpaError, match="'contrastive.rotation' must be in"):
        tiny_config(tmp_path, *PRETRAIN, "contrastive.rotation=1.5")


def test_random_apply_each_picks_images_independently_and_repeatably():
    images = tf.zeros((400, 4, 4, 3))
    plus_one = tf.keras.layers.Lambda(lambda x: x + 1.0)

    def applied(rate, seed):
        out = views.RandomApplyEach(plus_one, rate, seed=seed)(images)
        return out.numpy().reshape(400, -1).max(1)

    assert applied(0.0, 1).sum() == 0 and applied(1.0, 1).sum() == 400
    chosen = applied(0.8, 1)
    assert set(np.unique(chosen)) == {0.0, 1.0} and 0.72 < chosen.mean() < 0.88
    np.testing.assert_array_equal(chosen, applied(0.8, 1))  # the same seed, the same images
    assert (chosen != applied(0.8, 2)).any()
    unchanged = views.RandomApplyEach(plus_one, 0.8, seed=1)(images, training=False)
    assert unchanged.numpy().sum() == 0
    with pytest.raises(ValueError, match="rate"):
        views.RandomApplyEach(plus_one, 1.5)


def test_lars_scales_matrices_by_the_trust_ratio_and_leaves_vectors_alone():
    from tfkarpa.optimizers import LARS

    w = tf.Variable([[3.0, 4.0]])  # norm 5
    b = tf.Variable([1.0, 1.0])
    opt = LARS(learning_rate=0.5, momentum=0.0, weight_decay=0.0, trust=0.01)
    gw, gb = tf.constant([[0.6, 0.8]]), tf.constant([2.0, 2.0])  # |gw| = 1
    opt.apply_gradients([(gw, w), (gb, b)])
    np.testing.assert_allclose(w.numpy(), [[3.0, 4.0]] - 0.5 * 0.01 * 5.0 * gw.numpy(), rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), [0.0, 0.0], atol=1e-7)  # plain lr on a vector


def test_label_budget_is_per_class_deterministic_and_nested(tmp_path):
    cfg = tiny_config(tmp_path)
    data = sources.load(cfg.data, cfg.seed)
    ten = sources.with_label_budget(data, "10%", 3)
    again = sources.with_label_budget(data, "10%", 3)
    five = sources.with_label_budget(data, "2", 3)
    assert np.array_equal(ten.splits["train"].labels, again.splits["train"].labels)
    assert np.bincount(five.splits["train"].labels).tolist() == [2] * data.num_classes
    counts = np.bincount(data.splits["train"].labels)
    assert np.bincount(ten.splits["train"].labels).tolist() == [
        max(1, round(c * 0.1)) for c in counts]
    images = {x.tobytes() for x, _ in ten.splits["train"].make().as_numpy_iterator()}
    smaller = sources.with_label_budget(data, "5%", 3)
    assert {x.tobytes() for x, _ in smaller.splits["train"].make().as_numpy_iterator()} <= images
    assert ten.splits["val"] is data.splits["val"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("simclr")
    # Monitors on epochs 1, 3 and 4 only: the history must cope with the gap.
    return tasks.run(tiny_config(tmp, *PRETRAIN, "epochs=4", "contrastive.monitor_every=3"),
                     verbose=0)


@pytest.mark.slow
def test_pretrain_run_delivers_encoder_monitors_and_projector(pretrained):
    run = pretrained["run_dir"]
    metrics = pretrained["metrics"]
    assert 0.0 <= metrics["test_knn_accuracy"] <= 1.0
    assert 0.0 <= metrics["test_linear_probe_accuracy"] <= 1.0
    history = json.loads(open(f"{run}/metrics.json").read())["history"]
    for key in ("loss", "contrastive_accuracy", "val_contrastive_accuracy"):
        assert len(history[key]) == 4, key
    for key in ("knn_accuracy", "linear_probe_accuracy"):
        assert len(history[key]) == 3, key
    projector = pretrained["artifacts"]["projector"]
    labels = open(f"{projector}/metadata.tsv").read().splitlines()
    assert len(labels) == 24 and set(labels) <= set(sources.load(config.build(
        [], ["data=shapes", "data.count=240", "data.image_size=16"]).data).class_names)
    pbtxt = open(f"{projector}/projector_config.pbtxt").read()
    assert "sprite.png" in pbtxt and "metadata.tsv" in pbtxt
    manifest = json.load(open(f"{run}/manifest.json"))
    assert manifest["model"]["name"].endswith("_encoder")
    assert "saved_model" not in pretrained["artifacts"]  # an encoder is not a classifier


@pytest.mark.slow
def test_finetune_starts_from_the_encoder_and_linear_eval_keeps_it_fixed(pretrained, tmp_path):
    from tfkarpa import models
    from tfkarpa.tasks.classify.predict import load_run_model

    cfg = tiny_config(tmp_path, f"backbone={pretrained['run_dir']}", "export=false")
    model = build_model(cfg, (16, 16, 3), 6)
    encoder = simclr.encoder_of(models.build_classifier(cfg.model, (16, 16, 3), 6))
    encoder.load_weights(f"{pretrained['run_dir']}/checkpoints/final.weights.h5")
    for a, b in zip(simclr.encoder_of(model).get_weights(), encoder.get_weights()):
        np.testing.assert_array_equal(a, b)

    linear = tasks.run(tiny_config(tmp_path, f"backbone={pretrained['run_dir']}",
                                   "freeze_backbone=true", "model.head_norm=true",
                                   "data.labels=50%", "export=false", "optimizer=adam",
                                   "optimizer.lr=0.01"), verbose=0)
    run = Path(linear["run_dir"])
    trained = load_run_model(run, config.build([run / "config.yaml"]), 6)
    assert trained.get_layer("head_norm") is not None  # the head kept the user's setting
    for a, b in zip(simclr.encoder_of(trained).get_weights(), encoder.get_weights()):
        np.testing.assert_array_equal(a, b)  # frozen, BatchNorm statistics included
    counts = json.load(open(f"{linear['run_dir']}/manifest.json"))["data"]["class_counts"]["train"]
    assert sum(counts.values()) < 120


@pytest.mark.slow
def test_finetune_head_probe_trains_a_linear_head_first_then_everything(pretrained, capsys):
    from pipelines import finetune

    args = [f"from={pretrained['run_dir']}", "labels=50%", "head=probe", "epochs=1",
            "export=false", "--json", "--quiet"]
    assert finetune.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    probe = Path(result["artifacts"]["probe_run"])
    assert probe.name.endswith("-linear-eval-50pct")
    stage_one = config.build([probe / "config.yaml"])
    assert stage_one.freeze_backbone and stage_one.model.head_norm
    assert stage_one.optimizer.name == "adam" and stage_one.data.augment == "light"
    tuned = config.build([Path(result["run_dir"]) / "config.yaml"])
    assert not tuned.freeze_backbone and tuned.model.head_norm and tuned.epochs == 1
    assert tuned.model.weights == str(probe / "checkpoints" / "final.weights.h5")
    assert result["metrics"]["probe_test_accuracy"] == json.load(
        open(probe / "metrics.json"))["metrics"]["test_accuracy"]
    # The same command again goes on from the finished probe instead of training another.
    assert finetune.main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["artifacts"]["probe_run"] == str(probe)
    assert not probe.with_name(probe.name + "-2").exists()
    assert finetune.main([*args[:2], "head=old"]) == 1
    assert "option 'head' must be new or probe" in capsys.readouterr().err


@pytest.mark.slow
def test_transfer_bad_input(pretrained, trained_run, tmp_path):
    with pytest.raises(TfkarpaError, match="is a classify run, not a contrastive one"):
        tasks.run(tiny_config(tmp_path, f"backbone={trained_run['run_dir']}"), verbose=0)
    with pytest.raises(TfkarpaError, match="not a run directory"):
        tasks.run(tiny_config(tmp_path, f"backbone={tmp_path / 'nothing'}"), verbose=0)
    with pytest.raises(TfkarpaError, match="pretrained on 16-pixel images"):
        tasks.run(tiny_config(tmp_path, f"backbone={pretrained['run_dir']}",
                              "data.image_size=24"), verbose=0)
    for bad in ("0%", "150%", "0"):
        with pytest.raises(TfkarpaError, match="config key 'data.labels'"):
            tiny_config(tmp_path, f"data.labels={bad}")
    with pytest.raises(TfkarpaError, match="do not fill one batch of 512"):
        tasks.run(tiny_config(tmp_path, *PRETRAIN, "batch_size=512"), verbose=0)
    with pytest.raises(TfkarpaError, match="needs batch_size >= 2"):
        tasks.run(tiny_config(tmp_path, *PRETRAIN, "batch_size=1"), verbose=0)
    with pytest.raises(TfkarpaError, match="freeze_backbone=true needs backbone"):
        tasks.run(tiny_config(tmp_path, "freeze_backbone=true"), verbose=0)
    assert not (tmp_path / "runs").exists()


def test_cli_finetune_from_a_classification_run_exits_1(trained_run, tmp_path, monkeypatch,
                                                        capsys):
    """The verbs' own entry point, in this process (the exit status and stderr line are what the
    command prints; a new TensorFlow process would only add 10 s)."""
    from pipelines.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["finetune", f"from={trained_run['run_dir']}", "labels=10%"]) == 1
    assert "not a contrastive one" in capsys.readouterr().err
    assert main(["linear-eval", "labels=10%"]) == 1
    assert "needs from=RUN" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_pretraining_runs_under_two_replicas_and_bfloat16(tmp_path):
    result = tasks.run(tiny_config(tmp_path, *PRETRAIN, "strategy=mirrored",
                                   "devices=/cpu:0,/cpu:1", "mixed_precision=mixed_bfloat16",
                                   "epochs=1", "contrastive.projector_images=8"), verbose=0)
    assert np.isfinite(result["metrics"]["final_train_loss"])
    manifest = json.load(open(f"{result['run_dir']}/manifest.json"))["distribute"]
    assert manifest["replicas"] == 2 and manifest["per_replica_batch"] == 16

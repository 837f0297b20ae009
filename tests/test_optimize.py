"""Compression stages through TF-MOT: sparsity, 2:4 structure, clusters, QAT that keeps them."""

import json
from pathlib import Path

import numpy as np
import pytest

from tfkarpa import optimize
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import load_predictor
from tfkarpa.tasks.classify.compress import compress_run

FAST = ["epochs=2"]


@pytest.fixture(scope="module")
def pruned_then_qat(trained_run):
    """Fine-tunes twice (pruning, then QAT): every test using it is slow."""
    return compress_run(trained_run["run_dir"], ["prune.sparsity=0.75", "qat=true", *FAST], verbose=0)


def kernels(run_dir):
    model = load_predictor(run_dir).model
    return {layer.name: w.numpy() for layer in model.layers for w in layer.weights
            if w.name.split("/")[-1].startswith("kernel") and w.numpy().ndim >= 2}


@pytest.mark.slow
# Whichever runs first sets up pruned_then_qat: two fine-tuning runs (and the shared
# trained_run if no test made it yet): 100 s measured on a busy 2-core machine, 200 s on one
# loaded five times over.
@pytest.mark.timeout(480)
def test_pruning_reaches_the_target_in_every_wrapped_layer(pruned_then_qat):
    prune_run = Path(pruned_then_qat["artifacts"]["stage_runs"].split(",")[0])
    report = json.loads((prune_run / "compression.json").read_text())
    assert report["stage"] == "prune" and len(report["wrapped"]) == 7
    assert report["skipped"] == ["rescale (Rescaling)"]  # listed, not a crash
    for name in report["wrapped"]:
        assert report["layers"][name]["sparsity"] == pytest.approx(0.75, abs=0.01), name
    # Stripped: the run reloads as the plain architecture, zeros included.
    for name, kernel in kernels(prune_run).items():
        assert np.mean(kernel == 0) == pytest.approx(0.75, abs=0.01), name
    from test_train import scalar_and_image_tags

    assert any(t.startswith("pruning/") or "sparsity" in t for t in scalar_and_image_tags(prune_run / "logs"))


def tflite_layout(kernel):
    """A Keras kernel in TFLite's layout: Conv2D (h, w, in, out) -> (out, h, w, in); Dense
    (in, out) -> (out, in). (The converter folds the BatchNormalization after a convolution into
    its filter, a scale per output channel, which keeps every zero a zero.)"""
    return np.transpose(kernel, (3, 0, 1, 2)) if kernel.ndim == 4 else kernel.T


@pytest.mark.slow
# Whichever runs first sets up pruned_then_qat: two fine-tuning runs (and the shared
# trained_run if no test made it yet): 100 s measured on a busy 2-core machine, 200 s on one
# loaded five times over.
@pytest.mark.timeout(480)
def test_qat_after_pruning_keeps_the_zeros_and_exports_int8(pruned_then_qat, tmp_path):
    """QAT with the prune-preserving scheme keeps every zero pruning made, exactly, in the
    QAT run's float kernels and in the int8 weights of its TFLite file: the reference is the
    pruned run's own kernels, zero by zero."""
    from ai_edge_litert.interpreter import Interpreter

    from tfkarpa.tasks import export_run

    qat_run = pruned_then_qat["run_dir"]
    prune_run = Path(pruned_then_qat["artifacts"]["stage_runs"].split(",")[0])
    assert pruned_then_qat["metrics"]["sparsity"] >= 0.7
    predictor = load_predictor(qat_run)
    assert any("quant" in layer.name for layer in predictor.model.layers)
    pruned = kernels(prune_run)
    # QAT wraps each layer as quant_<name>; the kernel inside keeps the layer's own name.
    after_qat = {name.removeprefix("quant_"): k for name, k in kernels(qat_run).items()}
    assert set(after_qat) == set(pruned) and len(pruned) == 7
    for name, kernel in pruned.items():
        zeros = kernel == 0
        assert zeros.mean() == pytest.approx(0.75, abs=0.01), name
        assert np.all(after_qat[name][zeros] == 0), name  # every pruned zero still exactly 0
        assert np.any(after_qat[name][~zeros] != kernel[~zeros]), name  # and QAT did train it

    out = export_run(qat_run, formats=["tflite"], quantize=["int8"], out_dir=tmp_path,
                     representative=16, check=8)
    zeros = {tflite_layout(kernel).shape: tflite_layout(kernel == 0) for kernel in pruned.values()}
    assert len(zeros) == 7  # seven kernels, seven shapes: its shape finds each weight tensor
    tflite = Interpreter(model_path=out["artifacts"]["tflite_int8"])
    found = [t for t in tflite.get_tensor_details()
             if t["dtype"] == np.int8 and tuple(t["shape"]) in zeros]
    assert sorted(tuple(t["shape"]) for t in found) == sorted(zeros)  # each once, all int8
    for t in found:
        assert not np.any(t["quantization_parameters"]["zero_points"]), t["name"]  # symmetric
        # so int8 0 is exactly 0.0: every weight pruning zeroed is still zero in the file
        assert np.all(tflite.get_tensor(t["index"])[zeros[tuple(t["shape"])]] == 0), t["name"]


@pytest.mark.slow  # fine-tunes a 2:4 pruning stage
# ~20 s, and trained_run first if no test made it yet: 80 s + 100 s measured on a
# 2-core machine loaded five times over
@pytest.mark.timeout(300)
def test_two_of_four_structure(trained_run):
    result = compress_run(trained_run["run_dir"], ["prune.structure=2:4", *FAST], verbose=0)
    checked = 0
    for name, kernel in kernels(result["run_dir"]).items():
        if kernel.shape[-2] % 4:
            continue  # TF-MOT leaves layers whose input channels are not a multiple of 4
        groups = np.moveaxis(kernel, -2, -1).reshape(-1, 4)
        assert np.all(np.sum(groups == 0, axis=-1) >= 2), name
        checked += 1
    assert checked >= 5


@pytest.mark.slow  # fine-tunes a clustering stage
# ~20 s, and trained_run first if no test made it yet: 80 s + 100 s measured on a
# 2-core machine loaded five times over
@pytest.mark.timeout(300)
def test_clustering_leaves_at_most_k_values_per_layer(trained_run):
    result = compress_run(trained_run["run_dir"], ["cluster.clusters=8", *FAST], verbose=0)
    report = json.loads(Path(result["artifacts"]["compression_report"]).read_text())
    for name in report["wrapped"]:
        assert report["layers"][name]["unique_values"] <= 8, name


@pytest.mark.parametrize("overrides, message", [
    ([], "nothing to compress"),
    (["prune.sparsity=1.0"], "'prune.sparsity' must be in [0, 1)"),
    (["prune.sparsity=0.5", "name=x"], "sets stages, model.weights"),
    (["prune.sparsity=0.5", "prune.begin=0.7"], "'prune.begin' < 'prune.end'"),
])
def test_bad_compress_requests(trained_run, overrides, message):
    with pytest.raises(TfkarpaError, match=None) as err:
        compress_run(trained_run["run_dir"], overrides, verbose=0)
    assert message in str(err.value)


def test_compress_needs_a_finished_run(tmp_path):
    with pytest.raises(TfkarpaError, match="does not exist"):
        compress_run(tmp_path / "nope", ["qat=true"])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(TfkarpaError, match="has not finished"):
        compress_run(tmp_path / "half", ["qat=true"])


@pytest.mark.slow
def test_nested_backbones_are_skipped_and_listed_and_empty_models_refused():
    import tensorflow as tf

    from tfkarpa import config
    from tfkarpa.models import MODELS

    cfg = config.build(overrides=["prune.sparsity=0.5"])
    model = MODELS["kcv_csp_darknet_tiny"]((32, 32, 3), 3)
    wrapped = optimize.wrap("prune", model, cfg, 100, "/tmp", earlier=[])
    assert wrapped.wrapped == ["logits"]
    assert any("Functional" in s or "Backbone" in s for s in wrapped.skipped)

    inner = tf.keras.Sequential([tf.keras.layers.Dense(3)], name="inner")
    inputs = tf.keras.Input((4,))
    opaque = tf.keras.Model(inputs, inner(tf.keras.layers.Rescaling(0.5)(inputs)), name="opaque")
    with pytest.raises(TfkarpaError, match="no layer TF-MOT can prune"):
        optimize.wrap("prune", opaque, cfg, 100, "/tmp", earlier=[])


@pytest.mark.slow  # trains and exports a student run
# ~20 s, and trained_run first if no test made it yet: 80 s + 100 s measured on a
# 2-core machine loaded five times over
@pytest.mark.timeout(300)
def test_distillation_trains_the_student_and_exports_it_alone(trained_run, tmp_path):
    from conftest import tiny_config
    from tfkarpa import tasks

    cfg = tiny_config(tmp_path, f"distill.teacher={trained_run['run_dir']}", "epochs=1",
                      "model.width=0.125", "name=student")
    result = tasks.run(cfg, verbose=0)
    history = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())["history"]
    assert "distill_loss" in history and np.isfinite(history["distill_loss"][0])
    student = load_predictor(result["run_dir"]).model
    assert student.count_params() < load_predictor(trained_run["run_dir"]).model.count_params()
    assert result["metrics"]["params"] == student.count_params()


def test_soften_matches_softmax_of_logits_over_temperature():
    import tensorflow as tf

    from tfkarpa.optimize.distill import soften

    logits = tf.constant([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5]])
    np.testing.assert_allclose(soften(tf.nn.softmax(logits), 4.0), tf.nn.softmax(logits / 4.0),
                               rtol=1e-5)


@pytest.mark.slow
def test_teacher_must_share_classes_and_size(trained_run, tmp_path):
    import shutil

    from conftest import tiny_config
    from tfkarpa import tasks

    other = tmp_path / "other_teacher"
    shutil.copytree(trained_run["run_dir"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["data"]["classes"] = list(reversed(manifest["data"]["classes"]))
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TfkarpaError, match="they must match in order"):
        tasks.run(tiny_config(tmp_path, f"distill.teacher={other}"), verbose=0)
    with pytest.raises(TfkarpaError, match="16-pixel images, the student 24"):
        tasks.run(tiny_config(tmp_path, f"distill.teacher={trained_run['run_dir']}",
                              "data.image_size=24"), verbose=0)
    with pytest.raises(TfkarpaError, match="is not a finished run"):
        tasks.run(tiny_config(tmp_path, f"distill.teacher={tmp_path}"), verbose=0)
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("pruned, clustered, scheme", [
    (False, False, "Default8BitQuantizeScheme"),
    (True, False, "PrunePreserve"),
    (False, True, "ClusterPreserve"),
    (True, True, "ClusterPreserve"),
])
def test_qat_schemes_apply_to_the_plain_model(trained_run, pruned, clustered, scheme, caplog):
    import logging

    model = load_predictor(trained_run["run_dir"]).model
    with caplog.at_level(logging.INFO, logger="tfkarpa.optimize"):
        wrapped = optimize.qat(model, pruned=pruned, clustered=clustered)
    assert scheme in caplog.text
    assert "rescale" in wrapped.wrapped  # quantized at its output, not refused
    x = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(wrapped.model(x).numpy().sum(-1), 1.0, rtol=1e-4)
    # In a graph too, as fit runs it (autograph once mixed up this config's methods).
    graph_out = __import__("tensorflow").function(lambda t: wrapped.model(t, training=True))(x)
    np.testing.assert_allclose(graph_out.numpy().sum(-1), 1.0, rtol=1e-4)

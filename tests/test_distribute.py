"""Strategies: resolution and bad input, a real two-replica MirroredStrategy (two logical CPU
devices made in conftest), sharded TFRecords, and a real two-process MultiWorkerMirrored run."""

import json

import numpy as np
import pytest

from conftest import tiny_config
from tfkarpa import distribute, tasks
from tfkarpa.core import optim
from tfkarpa.errors import TfkarpaError

# Same data order (deterministic), same initial weights (checked by construction: the seeded
# build is identical under either strategy), constant small learning rate.
CURVE = ["optimizer.weight_decay=0", "optimizer.lr=0.01", "optimizer.schedule=constant",
         "data.augment=off", "epochs=3", "deterministic=true", "export=false"]


def _finished(root):
    run = next(root.glob("runs/*/metrics.json")).parent
    return (json.loads((run / "metrics.json").read_text()),
            json.loads((run / "manifest.json").read_text()))


@pytest.mark.slow
def test_mirrored_over_two_devices_follows_the_default_loss_curve(tmp_path):
    """Tolerance: the two runs differ only in floating-point reduction order and in how
    synchronized BatchNorm forms the variance over replicas (E[x^2] - E[x]^2) against the fused
    one-device kernel. Measured here: 1e-7 relative after the first steps, growing to 6e-4 by
    the third epoch as training amplifies it. rtol=1e-2 leaves room for other CPUs' kernels,
    while the mistakes it guards against are far larger: per-replica BatchNorm is 1.5-8% off
    from the first epoch, a loss summed instead of averaged over replicas doubles the step."""
    tasks.run(tiny_config(tmp_path / "one", "strategy=default", *CURVE), verbose=0)
    tasks.run(tiny_config(tmp_path / "two", "strategy=mirrored", "devices=/cpu:0,/cpu:1",
                          *CURVE), verbose=0)
    one, _ = _finished(tmp_path / "one")
    two, manifest = _finished(tmp_path / "two")
    assert manifest["distribute"]["strategy"] == "mirrored"
    assert manifest["distribute"]["replicas"] == 2
    assert manifest["distribute"]["per_replica_batch"] == 16
    a, b = np.array(one["history"]["loss"]), np.array(two["history"]["loss"])
    assert a[-1] < 0.9 * a[0]  # the curve moves well beyond the tolerance
    np.testing.assert_allclose(b, a, rtol=1e-2)


def test_auto_picks_the_default_strategy_on_a_plain_cpu_machine(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("TPU_NAME", raising=False)
    placement = distribute.resolve("auto")
    assert placement.name == "default" and placement.replicas == 1 and placement.is_chief


def test_global_batch_must_divide_over_replicas(tmp_path):
    with pytest.raises(TfkarpaError, match="global batch 33 does not divide over the 2 replicas"):
        tasks.run(tiny_config(tmp_path, "strategy=mirrored", "devices=/cpu:0,/cpu:1",
                              "batch_size=33"), verbose=0)
    assert not (tmp_path / "runs").exists()


def test_a_device_that_does_not_exist_is_named():
    with pytest.raises(TfkarpaError, match="device '/gpu:3' does not exist here"):
        distribute.resolve("mirrored", ["/cpu:0", "/gpu:3"])


@pytest.mark.parametrize("tf_config, message", [
    ("{not json", "TF_CONFIG does not parse as JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "no 'cluster' mapping"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}}', "no 'task'"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
     "task index 2 is out of range"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not a job of the cluster"),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
     "must be a list of 'host:port' strings"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}',
     "'ps' are not used"),
])
def test_bad_tf_config_is_explained(monkeypatch, tf_config, message):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(TfkarpaError, match=message):
        distribute.resolve("multi_worker")


def test_multi_worker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(TfkarpaError, match="needs TF_CONFIG"):
        distribute.resolve("multi_worker")


def test_chief_is_the_chief_job_or_worker_zero():
    assert distribute.is_chief({"cluster": {"worker": ["a:1", "b:1"]},
                                "task": {"type": "worker", "index": 0}})
    assert not distribute.is_chief({"cluster": {"chief": ["c:1"], "worker": ["a:1"]},
                                    "task": {"type": "worker", "index": 0}})


def test_a_tpu_that_does_not_answer_fails_within_the_timeout():
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TfkarpaError, match=f"TPU at 'grpc://127.0.0.1:{port}' does not answer"):
        distribute.resolve("tpu", tpu=f"grpc://127.0.0.1:{port}", timeout=3)
    with pytest.raises(TfkarpaError, match="needs tpu=ADDRESS"):
        distribute.resolve("tpu")


def test_learning_rate_scaling_rules():
    from tfkarpa.config import OptimizerConfig

    assert optim.scaled_lr(OptimizerConfig(lr=0.1), 1024) == 0.1
    assert optim.scaled_lr(OptimizerConfig(lr=0.1, lr_scaling="linear"), 1024) == pytest.approx(0.4)
    assert optim.scaled_lr(OptimizerConfig(lr=0.1, lr_scaling="sqrt"), 1024) == pytest.approx(0.2)


def test_tfrecord_round_trip_is_exact(tmp_path):
    from tfkarpa import config
    from tfkarpa.data import sources, tfrecord

    cfg = config.build([], ["data=shapes", "data.count=120", "data.image_size=24"])
    original = sources.load(cfg.data, 0)
    schema = tfrecord.convert(original, tmp_path / "shards", shards=3)
    assert sorted(p.name for p in (tmp_path / "shards").glob("[!.]*"))[:1] == ["dataset.json"]
    back = sources.load(config.build([], [f"data=tfrecord:{tmp_path / 'shards'}"]).data)
    assert back.class_names == original.class_names
    for name in ("train", "val", "test"):
        a = list(original.splits[name].make().as_numpy_iterator())
        b = list(back.splits[name].make().as_numpy_iterator())
        assert len(a) == len(b) == schema["splits"][name]["examples"] > 0
        for (xa, ya), (xb, yb) in zip(a, b):  # round-robin shards, interleaved back: same order
            assert ya == yb and xa.dtype == xb.dtype and np.array_equal(xa, xb)
    assert back.summary()["class_counts"]["train"] == original.summary()["class_counts"]["train"]
    assert back.splits["train"].files == 3


@pytest.mark.slow
def test_tfrecord_bad_inputs_are_named(tmp_path):
    from tfkarpa.data import sources, tfrecord
    from tfkarpa import config

    def load(path):
        return sources.load(config.build([], [f"data=tfrecord:{path}"]).data)

    with pytest.raises(TfkarpaError, match="no such directory"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TfkarpaError, match="no dataset.json"):
        load(tmp_path / "empty")
    (tmp_path / "empty" / "dataset.json").write_text('{"format": ')
    with pytest.raises(TfkarpaError, match=r"dataset.json: not valid JSON .* line 1"):
        load(tmp_path / "empty")
    data = sources.load(config.build([], ["data=digits"]).data)
    tfrecord.convert(data, tmp_path / "d", shards=2)
    tfrecord.convert(data, tmp_path / "d", shards=2)  # over its own earlier shards: replaced
    (tmp_path / "d" / "val-00001-of-00002.tfrecord").unlink()
    with pytest.raises(TfkarpaError, match="shard 'val-00001-of-00002.tfrecord' .* is missing"):
        load(tmp_path / "d")
    schema = json.loads((tmp_path / "d" / "dataset.json").read_text())
    schema["splits"]["train"]["files"] = ["../../etc/passwd"]
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(schema))
    with pytest.raises(TfkarpaError, match="must be a plain file name"):
        load(tmp_path / "d")


@pytest.mark.slow
def test_bfloat16_under_mirrored_and_xla_on_one_device(tmp_path):
    result = tasks.run(tiny_config(tmp_path / "bf16", "strategy=mirrored", "devices=/cpu:0,/cpu:1",
                                   "mixed_precision=mixed_bfloat16", "epochs=1", "export=false"),
                       verbose=0)
    assert np.isfinite(result["metrics"]["final_train_loss"])
    manifest = json.loads(next((tmp_path / "bf16").glob("runs/*/manifest.json")).read_text())
    assert manifest["distribute"]["mixed_precision"] == "mixed_bfloat16"
    # Earlier deterministic runs in this process left op determinism on (TensorFlow exports
    # no public way back); XLA refuses it for MaxPool gradients.
    from tensorflow.python.framework import config as tf_framework_config

    tf_framework_config.disable_op_determinism()
    result = tasks.run(tiny_config(tmp_path / "xla", "xla=true", "epochs=1", "export=false"),
                       verbose=0)
    assert np.isfinite(result["metrics"]["final_train_loss"])
    manifest = json.loads(next((tmp_path / "xla").glob("runs/*/manifest.json")).read_text())
    assert manifest["distribute"]["xla"] is True
    with pytest.raises(TfkarpaError, match="xla=true cannot compile one step over several CPU"):
        tasks.run(tiny_config(tmp_path / "no", "xla=true", "strategy=mirrored",
                              "devices=/cpu:0,/cpu:1"), verbose=0)
    with pytest.raises(TfkarpaError, match="xla=true and deterministic=true"):
        tasks.run(tiny_config(tmp_path / "no", "xla=true", "deterministic=true"), verbose=0)


def test_cli_bad_tf_config_exits_1_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The train verb's entry point in this process: TF_CONFIG is read when the strategy is
    resolved, before any cluster is joined, so no worker process is needed to see the refusal."""
    from pipelines.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["127.0.0.1:1"]}, '
                                    '"task": {"type": "worker", "index": 3}}')
    assert main(["train", "data=digits", "strategy=multi_worker",
                 f"runs_root={tmp_path / 'runs'}", "--quiet"]) == 1
    assert "TF_CONFIG task index 3 is out of range" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

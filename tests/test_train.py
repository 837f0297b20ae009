"""The fit loop: what a run directory holds, TensorBoard contents, resume, NaN, bad paths."""

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import tiny_config
from tfkarpa import tasks
from tfkarpa.core import optim
from tfkarpa.errors import TfkarpaError


def scalar_and_image_tags(log_dir: Path) -> set[str]:
    tags = set()
    for path in log_dir.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def test_run_directory_has_everything(trained_run):
    run_dir = Path(trained_run["run_dir"])
    for name in ("config.yaml", "manifest.json", "metrics.json", "history.csv",
                 "checkpoints/best.weights.h5", "checkpoints/last.weights.h5",
                 "eval/test/report.md", "eval/test/report.json", "eval/test/confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["packages"]["tensorflow"] == "2.21.0"
    assert len(manifest["data"]["fingerprint"]) == 64 and manifest["data"]["classes"][0] == "circle"
    metrics = trained_run["metrics"]
    assert metrics["epochs_run"] == 2 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["export_parity"]["top1_agreement"] == 1.0
    assert not list(run_dir.glob("**/.tmp-*")) and not (run_dir / "run.lock").exists()


def test_tensorboard_has_scalars_lr_images_graph(trained_run):
    logs = Path(trained_run["artifacts"]["tensorboard"])
    tags = scalar_and_image_tags(logs)
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate",
            "augmented_training_images"} <= tags
    assert any(t.startswith("confusion_matrix/") for t in tags)
    graph_written = any(
        event.graph_def for p in (logs / "train").glob("events.*")
        for event in tf.compat.v1.train.summary_iterator(str(p)))
    assert graph_written


def test_cosine_schedule_warms_up_then_decays():
    cfg = tiny_config(Path("/tmp")).optimizer
    lr = optim.make_schedule(cfg, epochs=10, steps_per_epoch=10)
    values = [float(lr(s)) for s in (0, 5, 10, 50, 99)]
    assert values[0] < values[1] < values[2] == pytest.approx(cfg.lr)
    assert values[2] > values[3] > values[4]


def test_step_schedule():
    from tfkarpa import config

    cfg = config.build(overrides=["optimizer.schedule=step", "optimizer.step_epochs=2,4",
                                  "optimizer.lr=1.0"]).optimizer
    lr = optim.make_schedule(cfg, epochs=6, steps_per_epoch=10)
    assert [float(lr(s)) for s in (0, 25, 45)] == pytest.approx([1.0, 0.1, 0.01])


def _stopped_after_two_epochs(tmp_path, monkeypatch):
    """A 3-epoch tiny run interrupted the moment after epoch 2 was recorded as done: its
    config and run folder."""
    cfg = tiny_config(tmp_path, "epochs=3", "export=false")
    backup = tf.keras.callbacks.BackupAndRestore
    original = backup.on_epoch_end

    def crash_after_second_epoch(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(backup, "on_epoch_end", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        tasks.run(cfg, verbose=0)
    monkeypatch.undo()
    return cfg, tmp_path / "runs" / "shapes-small_cnn"


@pytest.mark.slow
def test_interrupted_run_resumes_in_the_same_directory(tmp_path, monkeypatch):
    cfg, run_dir = _stopped_after_two_epochs(tmp_path, monkeypatch)
    assert (run_dir / "checkpoints" / "last.weights.h5").exists()
    assert not (run_dir / "metrics.json").exists()

    result = tasks.run(cfg, verbose=0)
    assert result["run_dir"] == str(run_dir)
    # Only epoch 3 was left to train, and the run's metrics still cover all three.
    assert result["metrics"]["epochs_run"] == 3
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert len(history["loss"]) == len(history["val_accuracy"]) == 3
    epochs = [line.split(",")[0] for line in (run_dir / "history.csv").read_text().splitlines()]
    assert [e for e in epochs if e.isdigit()] == ["0", "1", "2"]

    # A finished run is never written into: the same command makes a numbered sibling, whose
    # default export is numbered too.
    monkeypatch.chdir(tmp_path)
    again = tasks.run(tiny_config(tmp_path, "epochs=3", "export_dir="), verbose=0)
    assert again["run_dir"] == str(tmp_path / "runs" / "shapes-small_cnn-2")
    assert again["artifacts"]["saved_model"] == "saved_models/shapes-small_cnn-2"


@pytest.mark.slow
def test_corrupt_backup_falls_back_to_the_last_epoch_with_a_warning(tmp_path, monkeypatch,
                                                                   caplog):
    cfg, run_dir = _stopped_after_two_epochs(tmp_path, monkeypatch)
    data_files = list((run_dir / "backup").rglob("*.data-*"))
    assert data_files
    for f in data_files:  # flip bytes in the middle: the tensors' checksums no longer match
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 3: len(raw) // 3 + 64] = bytes(64)
        f.write_bytes(bytes(raw))

    with caplog.at_level("WARNING", logger="tfkarpa.core.fit"):
        result = tasks.run(cfg, verbose=0)
    assert "training backup is corrupt" in caplog.text and "after epoch 2" in caplog.text
    assert result["metrics"]["epochs_run"] == 3
    assert len(list(run_dir.glob("backup.corrupt-*"))) == 1
    epochs = [line.split(",")[0] for line in (run_dir / "history.csv").read_text().splitlines()]
    assert [e for e in epochs if e.isdigit()] == ["0", "1", "2"]


@pytest.mark.slow
def test_a_failed_fall_back_stops_every_time_and_never_restarts(tmp_path, monkeypatch):
    """Backup (its checkpoint index cut in half) and last checkpoint both damaged: the rerun
    names both; a second rerun stops the same way (it once trained from epoch 0 under the old
    history); once the last checkpoint is sound again the run resumes from it, each epoch once
    in history.csv."""
    cfg, run_dir = _stopped_after_two_epochs(tmp_path, monkeypatch)
    indexes = list((run_dir / "backup").rglob("*.index"))  # the other test damages .data
    assert indexes
    for f in indexes:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    last = run_dir / "checkpoints" / "last.weights.h5"
    sound = last.read_bytes()
    last.write_bytes(sound[:len(sound) // 2])
    history = (run_dir / "history.csv").read_text()

    with pytest.raises(TfkarpaError) as first:
        tasks.run(cfg, verbose=0)
    assert "training backup is corrupt" in str(first.value) and str(last) in str(first.value)
    with pytest.raises(TfkarpaError) as second:
        tasks.run(cfg, verbose=0)
    assert "backup.corrupt-" in str(second.value) and str(last) in str(second.value)
    assert (run_dir / "history.csv").read_text() == history
    assert not (run_dir / "metrics.json").exists()

    last.write_bytes(sound)
    result = tasks.run(cfg, verbose=0)
    assert result["metrics"]["epochs_run"] == 3
    epochs = [line.split(",")[0] for line in (run_dir / "history.csv").read_text().splitlines()]
    assert epochs[1:] == ["0", "1", "2"]


def test_non_finite_loss_stops_with_epoch_and_step(tmp_path):
    cfg = tiny_config(tmp_path, "optimizer.lr=1e30", "optimizer.schedule=constant", "epochs=3")
    with pytest.raises(TfkarpaError, match=r"loss became (nan|inf) at epoch 1, step \d+"):
        tasks.run(cfg, verbose=0)
    # It failed in its first epoch: nothing to resume, so nothing is left behind.
    assert not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "saved_models" / "tiny").exists()


def test_unwritable_run_dir_fails_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = tiny_config(tmp_path, f"run_dir={blocker / 'run'}")
    with pytest.raises(TfkarpaError, match="not writable"):
        tasks.run(cfg, verbose=0)


def test_config_written_is_the_config_used(trained_run):
    stored = yaml.safe_load((Path(trained_run["run_dir"]) / "config.yaml").read_text())
    assert stored["data"]["count"] == 240 and stored["model"]["width"] == 0.25


@pytest.mark.slow
def test_deterministic_runs_repeat_exactly(tmp_path):
    results = [tasks.run(tiny_config(tmp_path / str(i), "deterministic=true", "epochs=1",
                                     "export=false"), verbose=0) for i in range(2)]
    a, b = (r["metrics"] for r in results)
    assert a["final_train_loss"] == b["final_train_loss"]
    assert a["test_accuracy"] == b["test_accuracy"]
    np.testing.assert_equal(a["best_val_accuracy"], b["best_val_accuracy"])

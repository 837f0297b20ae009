"""Every kind of file tfkarpa writes and reads back, damaged, through the CLI: the answer is exit
status 1 and one line that names the damaged file, never a traceback (that only with --verbose).

Each test copies what it damages out of the session's finished run (`trained_run`) into its own
tmp_path, so the shared run stays whole.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import stop_federation_in_round
from PIL import Image

from pipelines.__main__ import main


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _copy_run(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run["run_dir"], run, ignore=shutil.ignore_patterns("eval", "logs"))
    return run


def _photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 20, 3), 120, np.uint8)).save(path)
    return path


def _refused(argv, named, capsys, *more) -> str:
    """Run the CLI; assert exit 1, one error line naming `named` (and `more`), no traceback."""
    code = main([*argv, "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1, err
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) <= 2 and lines[-1].startswith("error: "), err
    for fragment in (str(named), *more):
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def _other_model_weights(path: Path) -> Path:
    """A weights file of another run's shape: the same architecture at twice the width."""
    from tfkarpa import config, models

    cfg = config.build(overrides=["model.width=0.5"])
    models.build_classifier(cfg.model, (16, 16, 3), 3).save_weights(str(path))
    return path


# -- weights .h5 of a finished run: truncated, empty, another model's, under every verb that
#    loads them
# The first of these to run may train the session's `trained_run` (a minute on 2 busy cores).
@pytest.mark.timeout(300)
@pytest.mark.parametrize("damage", ["truncated", "empty", "other_model"])
@pytest.mark.parametrize("verb", ["evaluate", "predict", "export", "ensemble"])
def test_damaged_run_weights_are_named(trained_run, tmp_path, capsys, monkeypatch, damage, verb):
    monkeypatch.chdir(tmp_path)
    run = _copy_run(trained_run, tmp_path)
    weights = run / "checkpoints" / "final.weights.h5"
    if damage == "truncated":
        _truncate(weights)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        _other_model_weights(weights)
    argv = {"evaluate": ["evaluate", str(run)],
            "predict": ["predict", str(run), str(_photo(tmp_path))],
            "export": ["export", str(run), f"out={tmp_path / 'out'}", "formats=saved_model"],
            "ensemble": ["ensemble", str(run), trained_run["run_dir"],
                         f"runs_root={tmp_path / 'runs'}", "export=false"]}[verb]
    _refused(argv, weights, capsys)


def test_model_weights_key_names_a_damaged_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "cut.weights.h5"
    weights.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)
    _refused(["train", "data=shapes", "data.count=60", "data.image_size=16",
              f"model.weights={weights}", f"runs_root={tmp_path / 'runs'}"], weights, capsys,
             "model.weights")


# -- SavedModel: its variables file cut short, its variables index (a TF checkpoint index)
#    overwritten
@pytest.mark.parametrize("part", ["variables.data-00000-of-00001", "variables.index"])
def test_damaged_saved_model_is_named(trained_run, tmp_path, capsys, part):
    saved = tmp_path / "saved_model"
    shutil.copytree(trained_run["artifacts"]["saved_model"], saved)
    target = saved / "variables" / part
    if part == "variables.index":
        target.write_bytes(b"not a checkpoint index" * 8)
    else:
        _truncate(target)
    _refused(["predict", str(saved), str(_photo(tmp_path))], saved, capsys)


# -- TFLite: written by `export`, then cut short
@pytest.mark.slow  # a TFLite conversion end to end (the table has a fake and an empty one)
def test_damaged_tflite_is_named(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "exported"
    assert main(["export", trained_run["run_dir"], "formats=tflite", "quantize=none",
                 f"out={out}", "--quiet"]) == 0
    capsys.readouterr()
    tflite = next(out.rglob("*.tflite"))
    _truncate(tflite, 0.3)
    _refused(["predict", str(tflite), str(_photo(tmp_path))], tflite, capsys)


# -- TFRecord: one shard cut in half, refused before training starts
def test_tfrecord_shard_cut_in_half_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    assert main(["data", "convert", "shapes", f"out={shards}", "data.count=60",
                 "data.image_size=16", "shards=2", "--quiet"]) == 0
    capsys.readouterr()
    shard = sorted(shards.glob("train-*.tfrecord"))[0]
    _truncate(shard)
    _refused(["train", f"data=tfrecord:{shards}", "model=small_cnn", "data.image_size=16",
              "epochs=1", f"runs_root={tmp_path / 'runs'}", "export=false"], shard, capsys,
             "cut short")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- a search's Optuna database (SQLite) overwritten
def test_damaged_study_database_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.db").write_bytes(b"this is not an SQLite database" * 50)
    (tmp_path / "space.yaml").write_text("optimizer.lr: [0.01, 0.1]\n")
    _refused(["search", "data=shapes", "data.count=60", "data.image_size=16", "epochs=1",
              "space=space.yaml", "trials=1", f"study={study}"], study / "study.db", capsys)


# -- a Flower federation's round checkpoint damaged after round 1: the resume names it
@pytest.mark.slow  # trains one federated round
@pytest.mark.timeout(300)  # a minute alone; Flower's start and two clients on shared cores
def test_damaged_federated_checkpoint_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["data=shapes", "data.count=240", "data.image_size=16", "model.width=0.25",
            "batch_size=32", "data.augment=light", "federated.clients=2", "federated.rounds=2",
            "federated.fraction=1.0", f"runs_root={tmp_path / 'runs'}", "export=false"]
    go_on = stop_federation_in_round(monkeypatch, 2)
    assert main(["federate", *argv, "--quiet"]) == 130
    go_on()
    capsys.readouterr()
    npz = next(tmp_path.glob("runs/*/checkpoints/round.npz"))
    _truncate(npz)
    _refused(["federate", *argv], npz, capsys)


# -- checkpoints that cannot be written mid-run: one line, and the run stays resumable
@pytest.mark.slow  # a whole (one-epoch) training run
def test_unwritable_checkpoints_say_the_run_is_resumable(tmp_path, capsys, monkeypatch):
    from tfkarpa.core import callbacks

    monkeypatch.chdir(tmp_path)

    def refuse(self, name):
        raise PermissionError(13, "Permission denied", str(self.directory / name))

    monkeypatch.setattr(callbacks.AtomicCheckpoint, "_save", refuse)
    err = _refused(["train", "data=shapes", "data.count=60", "data.image_size=16",
                    "model.width=0.25", "epochs=1", "batch_size=32",
                    f"runs_root={tmp_path / 'runs'}", "export=false"], "checkpoints", capsys,
                   "resumable", "re-run the same command")
    assert "Permission denied" in err


def test_verbose_shows_the_traceback_of_a_damaged_file(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path)
    weights = _truncate(run / "checkpoints" / "final.weights.h5")
    assert main(["predict", str(run), str(_photo(tmp_path)), "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and str(weights) in err.splitlines()[-1]


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only the user's problems become one line: an exception from tfkarpa's own code (here a
    made-up one) still raises, so it is seen and reported."""
    from tfkarpa.core import artifacts

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(artifacts, "open_artifact", broken)
    with pytest.raises(ZeroDivisionError):
        main(["evaluate", str(tmp_path), "--quiet"])


def test_only_environment_errors_that_name_a_file_become_a_line():
    """The environment errors the CLI turns into a line are OSErrors naming their file."""
    from pipelines import _cli

    assert "denied" in _cli.user_error(PermissionError(13, "Permission denied", "/x/y"))
    assert "/x/y" in _cli.user_error(OSError(28, "No space left on device", "/x/y"))
    assert _cli.user_error(OSError(2, "No such file")) is None  # no file named: a bug
    assert _cli.user_error(KeyError("k")) is None


@pytest.mark.slow  # reads the shards in a (short) training epoch
@pytest.mark.timeout(300)  # converts, then trains until the damaged record
def test_tfrecord_record_failing_its_checksum_is_named(tmp_path, capsys, monkeypatch):
    """A byte flipped inside a record keeps the shard's framing whole, so only TensorFlow's
    checksum finds it, mid-epoch: the answer still names the data and says the run resumes."""
    monkeypatch.chdir(tmp_path)
    shards = tmp_path / "shards"
    assert main(["data", "convert", "shapes", f"out={shards}", "data.count=60",
                 "data.image_size=16", "shards=1", "--quiet"]) == 0
    capsys.readouterr()
    shard = next(shards.glob("train-*.tfrecord"))
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF  # inside the first record's data, past its 12-byte header
    shard.write_bytes(bytes(data))
    _refused(["train", f"data=tfrecord:{shards}", "model=small_cnn", "data.image_size=16",
              "epochs=1", "batch_size=16", "model.width=0.25", f"runs_root={tmp_path / 'runs'}",
              "export=false"], f"tfrecord:{shards}", capsys, "damaged", "resumes")

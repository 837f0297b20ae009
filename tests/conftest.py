"""Shared fixtures: a scratch working directory and one tiny trained run reused by many tests.

Importing tfkarpa first selects Keras 2 before TensorFlow loads (see tfkarpa/__init__.py).
"""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras' cache (ImageNet weights tfkarpa converts there) in a scratch folder, never the
# developer's ~/.keras: processes the tests start inherit it. Tests that check the cache set
# their own.
def _scratch_keras_home():
    import atexit
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="tfkarpa-tests-keras-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["KERAS_HOME"] = home


_scratch_keras_home()

import tfkarpa  # noqa: E402,F401
import tensorflow as tf  # noqa: E402

# Two logical CPU devices, made before TensorFlow starts, so the strategy tests run a real
# two-replica MirroredStrategy in this process. Single-device code still uses /cpu:0 only.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tfkarpa import config  # noqa: E402

# A run small enough to train in seconds on 2 cores; accuracy is not the point here.
TINY = ["data=shapes", "data.count=240", "data.image_size=16", "model.width=0.25",
        "epochs=2", "batch_size=32", "data.augment=light"]


def tiny_config(tmp_path, *extra):
    return config.build(overrides=[*TINY, f"runs_root={tmp_path / 'runs'}",
                                   f"export_dir={tmp_path / 'saved_models' / 'tiny'}", *extra])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Train once per session: {run_dir, artifacts, metrics} of a 2-epoch shapes run."""
    from tfkarpa import tasks

    tmp = tmp_path_factory.mktemp("trained")
    return tasks.run(tiny_config(tmp), verbose=0)


def write_image_folder(root, classes=("cat", "dog"), per_class=6, size=20, fmt="png", seed=0):
    """A folder source on disk: root/<class>/<i>.<fmt>, each class a different colour."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            pixels[..., c % 3] += 180
            Image.fromarray(pixels).save(d / f"{i}.{fmt}")
    return root


@contextlib.contextmanager
def started(args, **popen_kwargs):
    """Popen(args) in a process group of its own, killed with everything it started when the
    block ends, however it ends: a failed assertion or a test timeout leaves no worker, server
    or client behind to hold CI's output pipe open."""
    proc = subprocess.Popen(args, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_process(args, *, timeout, **popen_kwargs):
    """subprocess.run(args, timeout=...) with the same group kill: a child that outlives
    `timeout` is killed with its own children and the test fails with TimeoutExpired."""
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    if popen_kwargs.pop("capture_output", False):
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    with started(args, **popen_kwargs) as proc:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)


def tensorboard_tags(log_dir) -> set:
    """Every scalar and image tag TensorBoard's event files under `log_dir` hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in Path(log_dir).glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
        acc.Reload()
        tags |= set(acc.Tags()["tensors"])
    return tags


@pytest.fixture(autouse=True)
def _sigint_restored():
    """Ctrl-C's handler in place around each test. Something Flower brings in (importing
    test_federated's modules is enough) sets SIGINT to SIG_IGN and leaves it so; a process a
    later test starts then inherits the ignore (exec keeps ignored signals), and the test that
    Ctrl-C's a search (test_search) saw its study run to the end, exit 0, in full-suite runs
    where the federated tests shared its worker."""
    def restore():
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    restore()
    yield
    restore()


def stop_federation_in_round(monkeypatch, number: int):
    """Make a federation stop as Ctrl-C would when round `number` is evaluated (its earlier
    rounds checkpointed); returns the function that lifts the patch."""
    from tfkarpa.tasks.federate import run as federate

    real = federate.RoundBook.evaluate

    def stop(self, server_round, weights):
        if server_round == number:
            raise KeyboardInterrupt
        return real(self, server_round, weights)

    monkeypatch.setattr(federate.RoundBook, "evaluate", stop)
    return lambda: monkeypatch.setattr(federate.RoundBook, "evaluate", real)


def stranger_file(folder: Path, name: str = "mine.txt") -> tuple[Path, bytes, int]:
    """A file the user put there: its path, content and mtime, for `untouched` afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"the user's own notes\n")
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return path, path.read_bytes(), path.stat().st_mtime_ns


def untouched(stranger: tuple[Path, bytes, int]) -> None:
    path, content, mtime = stranger
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime


def refused(capsys, argv: list[str], named) -> str:
    """The command exits 1 with one line that names `named` (the path, or the option)."""
    from pipelines.__main__ import main

    assert main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(named) in err, err
    return err


def paired_detections(got, want, i: int, box_atol: float = 0.05, score_atol: float = 1e-3):
    """Two detectors' padded outputs (boxes, scores, classes, count[, masks]) for image `i`:
    the index in `got` of each of `want`'s detections (`metrics.partners`, order-blind: two
    detections whose scores tie to float precision come out of NMS in either order on another
    CPU, CI saw two Cascade boxes swap), asserting that each has a partner of the same class
    within `box_atol` px and `score_atol`."""
    from tfkarpa.tasks.detect.metrics import partners

    n = int(want[3][i])
    assert int(got[3][i]) == n, (i, int(got[3][i]), n)
    order = partners(tuple(o[i][:n] for o in want[:3]), tuple(o[i][:n] for o in got[:3]),
                     box_atol, score_atol)
    lone = np.flatnonzero(order < 0)
    assert not len(lone), (f"image {i}: detection {lone[0]} (class {want[2][i][lone[0]]}, box "
                           f"{want[0][i][lone[0]]}, score {want[1][i][lone[0]]:.4f}) has no "
                           "partner")
    return order

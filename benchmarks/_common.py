"""Helpers shared by the benchmarks: machine facts, epoch timing, FLOP counting, JSON output."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tfkarpa  # noqa: E402,F401  (Keras 2 before TensorFlow)
import tensorflow as tf  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "python": platform.python_version(),
            "tensorflow": tf.__version__}


class EpochTimer(tf.keras.callbacks.Callback):
    """Training time per epoch, from epoch start to the start of validation (or epoch end).

    It has no per-batch hook on purpose: one would make Keras fetch the logs after every step.
    """

    def __init__(self):
        super().__init__()
        self.seconds = []
        self._end = None

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._end = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if self._end is None:
            self._end = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append((self._end or time.perf_counter()) - self._start)


def forward_flops(model: tf.keras.Model) -> int:
    """Multiply-adds x 2 of convolutions and dense layers, counted from their shapes.

    Written here because tf.profiler's FLOP count needs a frozen graph and double-counts
    fused ops; for a CNN the conv and dense layers are all but the whole cost.
    """
    total = 0
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            total += forward_flops(layer)
            continue
        if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * c * kh * kw
        elif isinstance(layer, tf.keras.layers.Conv2D):
            _, h, w, cout = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * cout * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, tf.keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


def matmul_roof(n: int = 4096, repeats: int = 5) -> dict:
    """Best float32 matrix-multiply rate of TensorFlow (oneDNN) and NumPy on this machine."""
    a = tf.random.uniform((n, n))
    b = tf.random.uniform((n, n))
    tf.linalg.matmul(a, b).numpy()
    best_tf = min(_timed(lambda: tf.linalg.matmul(a, b).numpy()) for _ in range(repeats))
    an, bn = a.numpy(), b.numpy()
    best_np = min(_timed(lambda: an @ bn) for _ in range(repeats))
    flops = 2 * n**3
    return {"n": n, "tensorflow_gflops": flops / best_tf / 1e9, "numpy_gflops": flops / best_np / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mean_std(runs: list[dict], keys) -> dict:
    """`<key>_mean` and `<key>_std` (sample standard deviation) over the runs that have it."""
    import statistics

    out = {}
    for key in keys:
        values = [r[key] for r in runs if key in r]
        if values:
            out[f"{key}_mean"] = round(statistics.mean(values), 4)
            out[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    return out


def cli(*args: str) -> dict:
    """`python -m pipelines ARGS --json --quiet` in a fresh process, from the repository root:
    its JSON result, or the benchmark stops with the command's error."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "pipelines", *args, "--json", "--quiet"],
                         cwd=RESULTS.parents[1], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def provenance() -> dict:
    """The commit the script ran from (with `dirty` when the tree had uncommitted changes) and
    the exact command, so that every results JSON says how to reproduce it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": " ".join(["python", *sys.argv])}


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    from tfkarpa.runs import atomic_write_json

    atomic_write_json(path, {"machine": machine(), "provenance": provenance(), **payload})
    print(f"wrote {path}")
    return path


class WallClock(tf.keras.callbacks.Callback):
    """Seconds since training began at every epoch end, with the epoch's `keys` from the logs
    (None where an epoch did not log one). Runs after a task's own callbacks (its evaluation)."""

    def __init__(self, keys: tuple[str, ...]):
        super().__init__()
        self.keys, self.curve = keys, []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        point = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - self.start, 1)}
        point.update({k: None if logs.get(k) is None else round(float(logs[k]), 5)
                      for k in self.keys})
        self.curve.append(point)
        print(point, flush=True)

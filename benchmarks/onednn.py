"""TensorFlow's oneDNN kernels on and off: training and predict throughput on this CPU.

TensorFlow enables oneDNN by itself only on CPUs with AVX-512; `import tfkarpa` sets
TF_ENABLE_ONEDNN_OPTS=1 unless the user set it. This measures what that buys: each setting in
a fresh process (the variable is read once, when TensorFlow loads), alternating, two rounds,
on the models the demo trains (ResNet-20 and the small CNN at 32 px, YOLOv8-xxs at 64 px).

    python benchmarks/onednn.py     # writes benchmarks/results/onednn.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROUNDS = 2
CHILD = r"""
import json, time, numpy as np
import tfkarpa, tensorflow as tf
from tfkarpa import config
from tfkarpa.models import classifiers, detectors

def images_per_s(model, ds, n, epochs=1):
    model.fit(ds, epochs=1, verbose=0)  # traces
    start = time.perf_counter()
    model.fit(ds, epochs=epochs, verbose=0)
    return epochs * n / (time.perf_counter() - start)

out, rng = {}, np.random.default_rng(0)
x = rng.uniform(0, 255, (2560, 32, 32, 3)).astype("float32")
y = tf.one_hot(rng.integers(0, 6, len(x)), 6).numpy()
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(128).cache().prefetch(2)
for name, build in (("resnet20", lambda: classifiers.resnet((32, 32, 3), 6, depth=20)),
                    ("small_cnn", lambda: classifiers.small_cnn((32, 32, 3), 6))):
    model = build()
    model.compile(tf.keras.optimizers.SGD(0.01, momentum=0.9), "categorical_crossentropy")
    out[f"{name}_train"] = images_per_s(model, ds, len(x))
    model.predict(ds, verbose=0)
    start = time.perf_counter()
    model.predict(ds, verbose=0)
    out[f"{name}_predict"] = len(x) / (time.perf_counter() - start)
cfg = config.build(overrides=["task=detect", "model=yolov8_xxs"])
det = detectors.build_detector(cfg.model, cfg.detect, (64, 64, 3), 6)
detectors.compile_detector(det, "yolov8_xxs", tf.keras.optimizers.Adam(1e-3), cfg.detect)
n = 640
boxes = {"boxes": tf.constant(np.tile([[[8.0, 8.0, 40.0, 40.0]]], (n, 1, 1)), tf.float32),
         "classes": tf.zeros((n, 1), tf.float32)}
dds = tf.data.Dataset.from_tensor_slices(
    (rng.uniform(0, 255, (n, 64, 64, 3)).astype("float32"), boxes)).batch(32).cache()
out["yolov8_xxs_train"] = images_per_s(det, dds, n)
print(json.dumps(out))
"""


def measure(setting: str) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    rounds = {"0": [], "1": []}
    for i in range(ROUNDS):
        for setting in ("0", "1"):
            rounds[setting].append(measure(setting))
            print(f"round {i + 1} oneDNN={setting}:", rounds[setting][-1], flush=True)
    keys = list(rounds["1"][0])
    median = {s: {k: round(statistics.median(r[k] for r in rs), 1) for k in keys}
              for s, rs in rounds.items()}
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    from _common import write

    write("onednn", {
        "what": "images/s with TF_ENABLE_ONEDNN_OPTS=0 and =1, each in a fresh process, "
                f"alternating, {ROUNDS} rounds (median); fp32, batch 128 at 32 px, 32 at 64 px",
        "cpu_has_avx512": "avx512f" in flags,
        "off_images_per_s": median["0"], "on_images_per_s": median["1"],
        "ratio_on_over_off": {k: round(median["1"][k] / median["0"][k], 2) for k in keys},
        "rounds": rounds})
    print(json.dumps(median, indent=1))


if __name__ == "__main__":
    main()

"""Training throughput of ResNet-20 at 32x32: the tfkarpa fit loop against a bare model.fit.

Both train the same architecture with the same optimizer on the same shapes images in this one
process, alternating, each for several epochs; the first epoch of each (tracing) is dropped and
the median of the rest is kept. Also measured in the same run: the float32 matrix-multiply roof
(to turn images/s into a share of what the machine can do) and the input pipeline alone with
augmentation (the headroom over what training consumes).

    python benchmarks/throughput.py            # writes benchmarks/results/throughput.json
"""

from __future__ import annotations

import statistics
import tempfile
import time

from _common import EpochTimer, forward_flops, matmul_roof, write

import numpy as np
import tensorflow as tf

from tfkarpa import config, tasks
from tfkarpa.core import optim
from tfkarpa.data import pipeline, sources
from tfkarpa.models import classifiers

IMAGES = 5120
EPOCHS = 4
ROUNDS = 3
BATCH = 128


def make_cfg(tmp: str, augment: str) -> config.Config:
    return config.build(overrides=[
        "data=shapes", f"data.count={IMAGES}", "data.image_size=32", f"data.augment={augment}",
        "data.val_fraction=0.05", "data.test_fraction=0.05", "model=resnet", "model.depth=20",
        f"epochs={EPOCHS}", f"batch_size={BATCH}", "export=false", f"runs_root={tmp}"])


def images_per_second(timer: EpochTimer, n_train: int) -> float:
    return n_train / statistics.median(timer.seconds[1:])


def bare_fit(cfg: config.Config, data: sources.SourceData) -> float:
    split = data.splits["train"]
    x = np.stack([im.numpy() for im, _ in split.make()]).astype(np.float32)
    y = tf.one_hot(split.labels, data.num_classes).numpy()
    tf.keras.utils.set_random_seed(cfg.seed)
    model = classifiers.resnet((32, 32, 3), data.num_classes, depth=20)
    model.compile(optimizer=optim.make_optimizer(cfg.optimizer, EPOCHS, int(np.ceil(len(x) / BATCH))),
                  loss=tf.keras.losses.CategoricalCrossentropy(),
                  metrics=[tf.keras.metrics.CategoricalAccuracy(name="accuracy"),
                           tf.keras.metrics.TopKCategoricalAccuracy(k=5, name="top_k_accuracy")])
    timer = EpochTimer()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, callbacks=[timer], verbose=0)
    return images_per_second(timer, len(x))


def tfkarpa_fit(cfg: config.Config, n_train: int) -> float:
    timer = EpochTimer()
    tasks.run(cfg, verbose=0, callbacks=[timer])
    return images_per_second(timer, n_train)


def pipeline_alone(cfg: config.Config, data: sources.SourceData, passes: int = 3) -> float:
    ds = pipeline.make_dataset(data.splits["train"], cfg, data.num_classes, training=True)
    rates = []
    for _ in range(passes):
        start, n = time.perf_counter(), 0
        for images, _ in ds:
            n += int(images.shape[0])
        rates.append(n / (time.perf_counter() - start))
    return max(rates[1:])


def main() -> None:
    roof = matmul_roof()
    print(f"matmul roof: TensorFlow {roof['tensorflow_gflops']:.0f} GFLOP/s, "
          f"NumPy {roof['numpy_gflops']:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_cfg(tmp, "off")
        data = sources.load(cfg.data, cfg.seed)
        n_train = data.splits["train"].num_examples
        bare, ours = [], []
        for r in range(ROUNDS):
            bare.append(bare_fit(cfg, data))
            ours.append(tfkarpa_fit(make_cfg(f"{tmp}/{r}", "off"), n_train))
            print(f"round {r + 1}: bare model.fit {bare[-1]:.0f} img/s, tfkarpa {ours[-1]:.0f} img/s")
        ours_light = tfkarpa_fit(make_cfg(f"{tmp}/light", "light"), n_train)
        print(f"tfkarpa with light augmentation: {ours_light:.0f} img/s")
        feed = {aug: pipeline_alone(make_cfg(tmp, aug), data) for aug in ("off", "light", "strong")}
        print("input pipeline alone:", {k: round(v) for k, v in feed.items()})

    flops = forward_flops(classifiers.resnet((32, 32, 3), data.num_classes, depth=20))
    bare_rate, our_rate = statistics.median(bare), statistics.median(ours)
    per_round = [o / b for o, b in zip(ours, bare)]
    achieved = our_rate * 3 * flops / 1e9  # training step counted as 3x the forward pass
    result = {
        "model": "resnet20 v1, 32x32x3, batch 128, fp32",
        "train_images": n_train,
        "epochs_per_measurement": EPOCHS,
        "note": "median epoch time of epochs 2..N (epoch 1 traces), rounds alternate bare/tfkarpa",
        "bare_model_fit_images_per_s": [round(v, 1) for v in bare],
        "tfkarpa_fit_images_per_s": [round(v, 1) for v in ours],
        "ratio_tfkarpa_over_bare": round(our_rate / bare_rate, 3),
        "ratio_per_round": [round(r, 3) for r in per_round],
        "tfkarpa_light_augmentation_images_per_s": round(ours_light, 1),
        "forward_gflops_per_image": flops / 1e9,
        "achieved_gflops": round(achieved, 1),
        "matmul_roof": {k: round(v, 1) if isinstance(v, float) else v for k, v in roof.items()},
        "fraction_of_roof": round(achieved / roof["tensorflow_gflops"], 3),
        "pipeline_alone_images_per_s": {k: round(v, 1) for k, v in feed.items()},
        "headroom_light_over_training": round(feed["light"] / ours_light, 2),
        "headroom_strong_over_training": round(feed["strong"] / ours_light, 2),
    }
    print(f"ratio tfkarpa/bare = {result['ratio_tfkarpa_over_bare']}, "
          f"{achieved:.0f} GFLOP/s = {result['fraction_of_roof']:.0%} of the matmul roof, "
          f"headroom (light) {result['headroom_light_over_training']}x")
    write("throughput", result)


if __name__ == "__main__":
    main()

"""SimCLR view making: tfkarpa's augmenter against the same stages with keras-cv's RandomApply.

keras-cv's RandomApply runs its layer one image at a time inside tf.map_fn;
`tasks.pretrain.views.RandomApplyEach` runs it on the whole batch and keeps a random choice of images
(and repeats across runs). Both pipelines make two views of every batch of the shapes set at
32x32, batch 256 as in the recipe, in this one process, alternating rounds; the median of the
rounds is kept. Also checked: each one's share of images changed by colour jitter and grayscale.

    python benchmarks/views.py            # writes benchmarks/results/views.json
"""

from __future__ import annotations

import statistics
import time

from _common import write

import tensorflow as tf

from tfkarpa import config, kcv
from tfkarpa.tasks.pretrain import views as simclr_views
from tfkarpa.data import pipeline, sources

IMAGES = 4096
BATCH = 256
ROUNDS = 5


def keras_cv_augmenter(cfg):
    """The same stages as tfkarpa's view_augmenter, wrapped in keras-cv's RandomApply."""
    keras_cv = kcv.load()
    ours = simclr_views.view_augmenter(cfg, cfg.seed)
    stages = []
    for layer in ours.layers:
        if isinstance(layer, simclr_views.RandomApplyEach):
            layer = keras_cv.layers.RandomApply(layer.layer, rate=layer.rate, seed=cfg.seed)
        stages.append(layer)
    return tf.keras.Sequential(stages)


def views(cfg, data, aug):
    ds = pipeline.prepared(data.splits["train"], cfg, True).batch(BATCH, drop_remainder=True)

    def two(x, y):
        x = tf.cast(x, tf.float32)
        return aug(x, training=True), aug(x, training=True)

    return ds.map(two, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def images_per_second(ds) -> float:
    start, n = time.perf_counter(), 0
    for v1, _ in ds:
        n += int(v1.shape[0])
    return n / (time.perf_counter() - start)


def main():
    cfg = config.build(overrides=["task=pretrain", "data=shapes", f"data.count={IMAGES}",
                                  "data.image_size=32", "data.val_fraction=0.05",
                                  "data.test_fraction=0.05", f"batch_size={BATCH}"])
    data = sources.load(cfg.data, cfg.seed)
    with pipeline.float32_layers():
        pipelines = {"tfkarpa": views(cfg, data, simclr_views.view_augmenter(cfg, cfg.seed)),
                     "keras_cv_random_apply": views(cfg, data, keras_cv_augmenter(cfg))}
    for ds in pipelines.values():  # trace both before timing
        next(iter(ds))
    rates = {name: [] for name in pipelines}
    for r in range(ROUNDS):
        for name, ds in pipelines.items():
            rates[name].append(images_per_second(ds))
        print(f"round {r + 1}/{ROUNDS}: " + ", ".join(f"{k} {v[-1]:.0f} images/s"
                                                      for k, v in rates.items()))
    median = {name: round(statistics.median(v), 1) for name, v in rates.items()}
    write("views", {
        "what": "two SimCLR views per image, shapes 32x32, batch 256, strength "
                f"{cfg.contrastive.strength}, jitter_prob {cfg.contrastive.jitter_prob}, "
                f"gray_prob {cfg.contrastive.gray_prob}; images/s of view pairs, median of "
                f"{ROUNDS} alternating rounds over {len(data.splits['train'].labels)} images",
        "images_per_second": median,
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "speedup_ratio": round(median["tfkarpa"] / median["keras_cv_random_apply"], 2),
    })


if __name__ == "__main__":
    main()

"""SimCLR's views: two augmentations of every image, made on whole batches inside tf.data.

keras-cv layers do the work (random resized crop, flip, colour jitter, grayscale, optional blur
and rotation); `RandomApplyEach` applies a layer to a random share of a batch's images.
"""

from __future__ import annotations

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa.data import pipeline, sources

AUTOTUNE = tf.data.AUTOTUNE


class RandomApplyEach(tf.keras.layers.Layer):
    """Applies `layer` to each image of a batch with probability `rate`.

    Written here rather than using keras-cv's RandomApply, which decides image by image inside
    tf.map_fn: its parallel iterations draw from the random state in an order that changes from
    run to run (so even deterministic=true could not repeat a pretraining), and it runs the
    wrapped layer one image at a time. Here the whole batch goes through the (vectorized) layer
    at once and one draw picks the images that keep the result.
    """

    def __init__(self, layer: tf.keras.layers.Layer, rate: float, seed: int | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        self.layer, self.rate, self.seed = layer, rate, seed
        self._generator = (tf.random.Generator.from_seed(seed) if seed is not None
                           else tf.random.get_global_generator())

    def call(self, images, training=True):
        if not training or self.rate == 0:
            return images
        chosen = self._generator.uniform([tf.shape(images)[0], 1, 1, 1]) < self.rate
        return tf.where(chosen, tf.cast(self.layer(images, training=True), images.dtype), images)

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "seed": self.seed,
                "layer": tf.keras.layers.serialize(self.layer)}


def view_augmenter(cfg: config_lib.Config, seed: int | None) -> tf.keras.Sequential:
    with pipeline.float32_layers():
        return _view_augmenter(cfg, seed)


def _view_augmenter(cfg: config_lib.Config, seed: int | None) -> tf.keras.Sequential:
    """SimCLR's augmentation for float images in [0, 255], built from keras-cv layers.

    keras-cv's colour factors differ from the paper's: brightness is an additive share of the
    value range (as in SimCLR's own code), saturation f multiplies by f / (1 - f), hue shifts by
    up to half the factor of the colour circle. The paper's ranges are converted below.
    """
    from tfkarpa import kcv
    keras_cv = kcv.load()

    c, size, s = cfg.contrastive, cfg.data.image_size, cfg.contrastive.strength
    low, high = max(1e-3, 1 - 0.8 * s), 1 + 0.8 * s  # the paper's saturation multipliers
    stages = [keras_cv.layers.RandomCropAndResize(
        target_size=(size, size), crop_area_factor=(c.crop_min, 1.0),
        aspect_ratio_factor=(3 / 4, 4 / 3), seed=seed)]
    if cfg.data.flip:
        stages.append(keras_cv.layers.RandomFlip("horizontal", seed=seed))
    if c.rotation > 0:
        stages.append(keras_cv.layers.RandomRotation(c.rotation, fill_mode="reflect", seed=seed))
    if s > 0 and c.jitter_prob > 0:
        jitter = keras_cv.layers.RandomColorJitter(
            value_range=(0, 255), brightness_factor=min(1.0, 0.8 * s),
            contrast_factor=min(1.0, 0.8 * s),
            saturation_factor=(low / (1 + low), high / (1 + high)),
            hue_factor=min(1.0, 0.4 * s), seed=seed)
        stages.append(RandomApplyEach(jitter, rate=c.jitter_prob, seed=seed))
    if c.gray_prob > 0:
        stages.append(RandomApplyEach(
            keras_cv.layers.Grayscale(output_channels=3), rate=c.gray_prob, seed=seed))
    if c.blur_prob > 0:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # 10% of the side, odd (as in SimCLR)
        stages.append(RandomApplyEach(
            keras_cv.layers.RandomGaussianBlur(kernel_size=kernel, factor=(0.1, 2.0), seed=seed),
            rate=c.blur_prob, seed=seed))
    return tf.keras.Sequential(stages, name="simclr_views")


def views_dataset(split: sources.Split, cfg: config_lib.Config, training: bool,
                  workers: int = 1) -> tf.data.Dataset:
    """Batches of (view1, view2), float32 [B, S, S, 3]; labels are dropped."""
    ds = pipeline.prepared(split, cfg, training)
    # Full batches in training: every image needs the others as negatives.
    ds = ds.batch(cfg.batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    aug = view_augmenter(cfg, cfg.seed if training else cfg.seed + 1)

    def two_views(x, y):
        x = tf.cast(x, tf.float32)
        return aug(x, training=True), aug(x, training=True)

    # The augmentation layers draw from stateful generators: parallel calls would take their
    # draws in a varying order, so a deterministic run makes its views one batch at a time.
    ds = ds.map(two_views, num_parallel_calls=None if cfg.deterministic else AUTOTUNE)
    return pipeline.finished(ds, split, cfg, training, workers, by_file=training)

"""tf.data pipelines: resize, cache, shuffle, batch, augment (keras-cv), prefetch.

Order matters for speed: the per-image work that never changes (decode, resize) runs once and
is cached; shuffling happens on cached examples; augmentation runs on whole batches with
keras-cv's vectorised layers; labels are one-hot (label smoothing needs them) and the images
float32 in [0, 255], since models do their own rescaling so exported models take raw pixels.
`resize_uint8` is the one resize used in training and in the exported serving signature, so
the model sees the same pixels in both.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf

from tfkarpa.config import Config, parse_mix
from tfkarpa.data.sources import Split
from tfkarpa.errors import TfkarpaError

AUTOTUNE = tf.data.AUTOTUNE


def resize_uint8(images: tf.Tensor, size: int) -> tf.Tensor:
    """Resize uint8 image(s) to size x size with area-aware bilinear filtering, back to uint8.

    At the same size this is the identity (checked in the tests), so a model fed at its own
    size sees exactly the pixels it was given; statically known sizes skip the op entirely.
    """
    if images.shape[-3] == size and images.shape[-2] == size:
        return images
    resized = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


@contextlib.contextmanager
def float32_layers():
    """Build layers in float32 whatever the mixed-precision policy: augmentation runs in the
    input pipeline on float32 pixels, and keras-cv's layers fail on bfloat16 inputs."""
    before = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(before)


def augmenter(strength: str, flip: bool, seed: int | None):
    """A keras-cv augmentation pipeline for float images in [0, 255], or None for 'off'."""
    if strength == "off":
        return None
    from tfkarpa import kcv
    keras_cv = kcv.load()

    with float32_layers():
        layers = []
        if flip:
            layers.append(keras_cv.layers.RandomFlip("horizontal", seed=seed))
        layers.append(keras_cv.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed))
        if strength == "strong":
            layers.append(keras_cv.layers.RandAugment(
                value_range=(0, 255), augmentations_per_image=2, magnitude=0.4, seed=seed))
        return tf.keras.Sequential(layers, name=f"augment_{strength}")


def mixer(mix: str, seed: int | None):
    """keras-cv's MixUp or CutMix for `data.mix`, as a function of a batch of (float images,
    one-hot labels) that returns the mixed pair; None for 'off'."""
    parsed = parse_mix(mix)
    if parsed is None:
        return None
    from tfkarpa import kcv
    keras_cv = kcv.load()

    method, alpha = parsed
    with float32_layers():
        layer = (keras_cv.layers.MixUp if method == "mixup" else keras_cv.layers.CutMix)(
            alpha=alpha, seed=seed)

    def mix_batch(images, labels):
        mixed = layer({"images": images, "labels": labels}, training=True)
        return mixed["images"], mixed["labels"]

    return mix_batch


def make_dataset(split: Split, cfg: Config, num_classes: int, training: bool,
                 batch_size: int | None = None, one_hot: bool = True,
                 workers: int = 1, padded: bool = False,
                 drop_remainder: bool = False) -> tf.data.Dataset:
    """Batched (float32 image, label) for `model.fit`/`evaluate`; training adds shuffle+augment.

    `workers` is the number of workers that will share it (multi-worker strategies). `padded`
    (for evaluation) fills the last batch with copies weighted 0, giving (image, label, weight)
    in full batches only: every worker then runs the same number of steps and metrics stay
    exact. `drop_remainder` keeps only full batches (TPUs need static shapes). Training with
    `data.mix` mixes pairs within each batch (after augmentation), so its labels are soft."""
    batch_size = batch_size or cfg.batch_size
    ds = prepared(split, cfg, training)
    if padded:
        count = split.num_examples if split.num_examples >= 0 else int(
            ds.reduce(0, lambda n, _: n + 1))
        ds = ds.map(lambda x, y: (x, y, 1.0))
        filler = ds.take(1).map(lambda x, y, w: (x, y, 0.0)).repeat((-count) % batch_size)
        ds = ds.concatenate(filler)
    ds = ds.batch(batch_size, num_parallel_calls=AUTOTUNE, drop_remainder=padded or drop_remainder)
    aug = augmenter(cfg.data.augment, cfg.data.flip, cfg.seed) if training else None
    mix = mixer(cfg.data.mix, cfg.seed) if training else None
    if mix is not None and not one_hot:
        raise ValueError("data.mix makes soft labels: the pipeline must be one-hot")

    def finish(x, y, *weight):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = aug(x, training=True)
        if one_hot:
            y = tf.one_hot(y, num_classes)
        if mix is not None:
            x, y = mix(x, y)
        return (x, y, *weight)

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE)
    return finished(ds, split, cfg, training, workers, by_file=not padded)


def concrete_size(cfg: Config) -> int:
    """`data.image_size`, which must have been chosen by now (0 = auto is filled in when a run
    starts, by `core.auto`); the augmentation strength `auto` builds as `light` here."""
    if not cfg.data.image_size:
        raise TfkarpaError("config key 'data.image_size' is 0 (auto): it is chosen from the data "
                           "when a run starts; set it to build a pipeline directly")
    return cfg.data.image_size


def prepared(split: Split, cfg: Config, training: bool) -> tf.data.Dataset:
    """(uint8 image, label) at the configured size: resized and cached once, shuffled when
    training. The start of every pipeline here."""
    size = concrete_size(cfg)
    ds = split.make()
    if split.in_memory_shape is None or tuple(split.in_memory_shape[:2]) != (size, size):
        ds = ds.map(lambda x, y: (resize_uint8(x, size), y), num_parallel_calls=AUTOTUNE)
        if cfg.data.cache:
            ds = ds.cache()
    if training:
        buffer = cfg.data.shuffle_buffer if split.num_examples < 0 else min(
            cfg.data.shuffle_buffer, split.num_examples)
        ds = ds.shuffle(buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    return ds


def finished(ds: tf.data.Dataset, split: Split, cfg: Config, training: bool, workers: int,
             by_file: bool = True) -> tf.data.Dataset:
    """Options and prefetch: the end of every pipeline here."""
    options = tf.data.Options()
    # Evaluation pairs predictions with labels read in a second pass: keep its order fixed.
    options.deterministic = bool(cfg.deterministic) or not training
    # Under multi-worker strategies each worker reads its own share: whole files when there are
    # enough of them (no wasted reads), else every worker's pipeline keeps 1/N of the batches
    # (also for padded evaluation: only that gives each worker the same number of full batches).
    policy = tf.data.experimental.AutoShardPolicy
    options.experimental_distribute.auto_shard_policy = (
        policy.FILE if by_file and split.files >= max(2, workers) else policy.DATA)
    return ds.with_options(options).prefetch(AUTOTUNE)

"""Optimizers and learning-rate schedules from `optimizer.*`, with the batch-size scaling rule.

Every task compiles its model with `make_optimizer`, so one config section means the same thing
for a classifier, a detector and a contrastive encoder.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError


def make_schedule(cfg: config_lib.OptimizerConfig, epochs: int, steps_per_epoch: int):
    """The learning rate: a schedule over optimizer steps, or a constant."""
    total = max(1, epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
        lr = tf.keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=cfg.lr / max(1, warmup) if warmup else cfg.lr,
            decay_steps=total - warmup, warmup_target=cfg.lr if warmup else None,
            warmup_steps=warmup)
    elif cfg.schedule == "step":
        bounds = [e * steps_per_epoch for e in sorted(cfg.step_epochs)]
        lr = (tf.keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [cfg.lr * cfg.step_factor**i for i in range(len(bounds) + 1)])
            if bounds else cfg.lr)
    else:
        lr = cfg.lr
    return lr


def scaled_lr(cfg: config_lib.OptimizerConfig, global_batch: int) -> float:
    """The peak learning rate after the batch-size scaling rule (Goyal et al. 2017: linear;
    square root is the gentler rule often used with Adam)."""
    ratio = global_batch / cfg.base_batch
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def make_optimizer(cfg: config_lib.OptimizerConfig, epochs: int, steps_per_epoch: int,
                   global_batch: int | None = None):
    if cfg.lr <= 0:  # 0 is "auto", which `core.auto.resolve` fills in with the model
        raise TfkarpaError("config key 'optimizer.lr' must be positive here (0 means: chosen "
                           "with model=auto, which this run does not use); give a rate")
    if global_batch is not None and cfg.lr_scaling != "none":
        cfg = dataclasses.replace(cfg, lr=scaled_lr(cfg, global_batch))
    common = {"learning_rate": make_schedule(cfg, epochs, steps_per_epoch),
              "weight_decay": cfg.weight_decay or None, "clipnorm": cfg.clipnorm or None,
              "global_clipnorm": cfg.global_clipnorm or None}
    if cfg.name == "lars":
        from tfkarpa.optimizers import LARS

        return LARS(common["learning_rate"], momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust=cfg.trust, clipnorm=common["clipnorm"],
                    global_clipnorm=common["global_clipnorm"])
    if cfg.name == "sgd":
        opt = tf.keras.optimizers.SGD(momentum=cfg.momentum, nesterov=cfg.momentum > 0, **common)
    elif cfg.name == "adam":
        opt = tf.keras.optimizers.Adam(**common)
    else:
        opt = tf.keras.optimizers.AdamW(**{**common, "weight_decay": cfg.weight_decay})
    if cfg.weight_decay:
        # Decaying BatchNorm scales and biases only hurts; the usual practice leaves them alone.
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return opt



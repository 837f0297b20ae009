"""A classifier's last layer set by a linear probe before fine-tuning (LP-FT).

Fine-tuning a pretrained network under a freshly initialised last layer sends that layer's
large, random gradients into the features it should be reusing; fitting the last layer first
on the frozen features, then fine-tuning everything, keeps them (Kumar et al. 2022, "Fine-Tuning
can Distort Pretrained Features and Underperform Out-of-Distribution"). The probe here is the
exact one rather than some epochs of SGD with the backbone frozen: scikit-learn's logistic
regression on the features of the training images (no augmentation, one forward pass), the
same probe the contrastive task reports (`pretrain.monitor`), folded into the `logits` Dense
layer. Resuming a run loads its checkpoint over this, as over any starting weight.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf

from tfkarpa.data import pipeline
from tfkarpa.data.splits import Split

log = logging.getLogger(__name__)

LAYER = "logits"  # the Dense layer every classifier of `tfkarpa.models` ends with
MAX_IMAGES = 10_000  # enough for a linear layer's few thousand weights; bounds the forward pass


def wanted(cfg) -> bool:
    """`model.head_init=probe`. Not the default: fine-tuning EfficientNet-Lite0 from ImageNet
    on 1,000 Fashion-MNIST images (benchmarks/transfer.py's setting, 27 epochs at SGD 0.001)
    reached 81.75% and 39.75% test accuracy on seeds 1 and 2 from the probe, where Keras'
    initialiser had reached 84.65% and 82.45% (6 epochs on seed 0 had favoured the probe,
    78.75% to 76.55%). Why was not found (a confident head at that rate, untested)."""
    return cfg.model.head_init == "probe"


def features(model: tf.keras.Model, split: Split, cfg, num_classes: int, limit: int):
    """(features [N, D], labels [N]) of up to `limit` training images, as the model sees them
    at inference (no augmentation, dropout off)."""
    inner = tf.keras.Model(model.inputs, model.get_layer(LAYER).input)
    ds = pipeline.make_dataset(split, cfg, num_classes, training=False, one_hot=False)
    xs, ys, seen = [], [], 0
    for images, labels in ds:
        xs.append(inner(images, training=False).numpy())
        ys.append(labels.numpy())
        seen += len(labels)
        if seen >= limit:
            break
    return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit].astype(np.int64)


def fit_head(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression on standardised `x`, as (kernel [D, K], bias [K]) acting on the raw
    features: the standardisation is folded in (w / sigma, b - (mu / sigma) . w)."""
    from sklearn.linear_model import LogisticRegression

    mu, sigma = x.mean(axis=0), x.std(axis=0) + 1e-6
    probe = LogisticRegression(max_iter=1000, C=1.0)
    probe.fit((x - mu) / sigma, y)
    coef = np.zeros((num_classes, x.shape[1]))
    bias = np.zeros(num_classes)
    present = probe.classes_
    if len(present) == 2:  # scikit-learn keeps one row: the second class's logit against 0
        coef[present[1]], bias[present[1]] = probe.coef_[0], probe.intercept_[0]
    else:
        coef[present], bias[present] = probe.coef_, probe.intercept_
    # A class the probed images lack keeps logit 0 and no weights (only with a label budget).
    kernel = (coef / sigma).T
    return kernel.astype(np.float32), (bias - coef @ (mu / sigma)).astype(np.float32)


def probe_head(model: tf.keras.Model, split: Split, cfg, num_classes: int) -> dict:
    """Set `model`'s last layer by the probe; what was done, for the run's log and manifest."""
    started = time.perf_counter()
    x, y = features(model, split, cfg, num_classes, MAX_IMAGES)
    kernel, bias = fit_head(x, y, num_classes)
    model.get_layer(LAYER).set_weights([kernel, bias])
    logits = x @ kernel + bias
    accuracy = float(np.mean(np.argmax(logits, axis=1) == y))
    seconds = time.perf_counter() - started
    log.info("head: logistic regression on %d training images' frozen features (train "
             "accuracy %.3f, %.0f s), then every layer fine-tunes", len(y), accuracy, seconds)
    return {"images": int(len(y)), "train_accuracy": round(accuracy, 4),
            "seconds": round(seconds, 1)}

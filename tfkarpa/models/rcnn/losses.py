"""The two-stage family's losses, each a mean over what its weights select (so a batch with few
positives does not shrink its gradient): objectness and RoI classification by cross-entropy,
deltas by smooth L1 (Huber, beta 1/9 for the RPN and 1 for box heads, as in Detectron2), masks by
per-pixel binary cross-entropy on the true class's map only (Mask R-CNN's decoupling)."""

from __future__ import annotations

import tensorflow as tf


def _weighted_mean(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
    weights = tf.cast(weights, values.dtype)
    return tf.reduce_sum(values * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def smooth_l1(target: tf.Tensor, predicted: tf.Tensor, beta: float) -> tf.Tensor:
    """Per-element smooth L1: 0.5 d^2 / beta under beta, |d| - 0.5 beta above; summed over
    the last axis (the 4 deltas)."""
    d = tf.abs(tf.cast(predicted, tf.float32) - tf.cast(target, tf.float32))
    return tf.reduce_sum(tf.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta), axis=-1)


def objectness_loss(target: tf.Tensor, logits: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy of objectness logits [B, A] over the sampled anchors."""
    values = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(target, tf.float32),
                                                     tf.cast(logits, tf.float32))
    return _weighted_mean(values, weight)


def delta_loss(target: tf.Tensor, predicted: tf.Tensor, weight: tf.Tensor,
               beta: float) -> tf.Tensor:
    """Smooth L1 of deltas [..., 4], averaged over the positives `weight` selects."""
    return _weighted_mean(smooth_l1(target, predicted, beta), weight)


def classification_loss(labels: tf.Tensor, logits: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """Softmax cross-entropy over C+1 classes (0 = background) of the sampled RoIs."""
    values = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32),
                                                            tf.cast(logits, tf.float32))
    return _weighted_mean(values, weight)


def mask_loss(target: tf.Tensor, logits: tf.Tensor, labels: tf.Tensor,
              weight: tf.Tensor) -> tf.Tensor:
    """Binary cross-entropy per pixel of the mask logits [N, S, S, C] on each RoI's true class
    (labels 1..C; background RoIs carry no weight), mean over pixels and positive RoIs."""
    logits = tf.cast(logits, tf.float32)
    own = tf.gather(tf.transpose(logits, [0, 3, 1, 2]), tf.maximum(labels - 1, 0), batch_dims=1)
    values = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(target, tf.float32), own)
    return _weighted_mean(tf.reduce_mean(values, axis=[1, 2]), weight)

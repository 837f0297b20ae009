"""What a two-stage detector learns from: which anchors (or proposals) match which true boxes,
which of them a step trains on, and the box deltas to regress.

Boxes are xyxy in input pixels, true boxes padded per image ([B, M, 4] with `valid` [B, M]).
Labels: 1 positive (IoU >= `positive` with some true box, or the best anchor of a true box),
0 negative (IoU < `negative` with every box), -1 ignored. Each step trains on `size` of them per
image, up to `positive_fraction` positive (Faster R-CNN: 256 anchors, half positive, for the
RPN; 512 proposals, a quarter positive, for a box head).

Written here rather than taken from keras-cv 0.9: its box encoder is private
(`bounding_box._encode_box_to_deltas`), and `BoxMatcher(force_match_for_each_col=True)` also
force-matches the column of -1s it pads the IoU matrix with (and padded true boxes), so anchor 0
would always be positive. IoU itself is keras-cv's.
"""

from __future__ import annotations

import math

import tensorflow as tf

from tfkarpa import kcv
from tfkarpa.models.rcnn.roi import roi_align_level

# The largest log-scale a decoded box may grow by (Detectron2's clamp: log(1000 / 16)).
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def encode(boxes: tf.Tensor, anchors: tf.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
    """The deltas (dx, dy, dw, dh) * weights that move `anchors` onto `boxes` (xyxy, same shape):
    centre offsets in anchor widths/heights, log size ratios (Girshick et al. 2014)."""
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    bw, bh = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    bx, by = boxes[..., 0] + 0.5 * bw, boxes[..., 1] + 0.5 * bh
    aw, ah = tf.maximum(aw, 1e-6), tf.maximum(ah, 1e-6)
    wx, wy, ww, wh = weights
    return tf.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah,
                     ww * tf.math.log(tf.maximum(bw, 1e-6) / aw),
                     wh * tf.math.log(tf.maximum(bh, 1e-6) / ah)], axis=-1)


def decode(deltas: tf.Tensor, anchors: tf.Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> tf.Tensor:
    """The boxes (xyxy) that `deltas` make of `anchors`: `encode`'s inverse, with the size ratio
    clamped so an untrained head cannot overflow."""
    wx, wy, ww, wh = weights
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    cx, cy = ax + deltas[..., 0] / wx * aw, ay + deltas[..., 1] / wy * ah
    w = aw * tf.exp(tf.minimum(deltas[..., 2] / ww, _MAX_LOG_SCALE))
    h = ah * tf.exp(tf.minimum(deltas[..., 3] / wh, _MAX_LOG_SCALE))
    return tf.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def pairwise_iou(anchors: tf.Tensor, boxes: tf.Tensor) -> tf.Tensor:
    """IoU of every anchor [B, A, 4] (or [A, 4], shared) with every box [B, M, 4]: [B, A, M]."""
    if anchors.shape.rank == 2:
        anchors = tf.broadcast_to(anchors[None], [tf.shape(boxes)[0], *anchors.shape])
    return kcv.load().bounding_box.compute_iou(anchors, boxes, bounding_box_format="xyxy")


def match(iou: tf.Tensor, valid: tf.Tensor, negative: float, positive: float,
          best_anchor_positive: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Each anchor's true box (index [B, A], M for none) and label (1, 0, -1; [B, A]) from
    `iou` [B, A, M].

    With `best_anchor_positive`, the anchors that overlap a true box most (ties included) are
    positive whatever their IoU, so a box no anchor fits well is still learnt (Faster R-CNN's
    rule; Detectron2's allow_low_quality_matches). They keep their own best box as the target."""
    valid = tf.cast(valid, tf.bool)
    # Padding slots below everything; a column of -1 stands for "no box" and wins over them,
    # so an anchor of an image without true boxes is matched to "none", never to padding.
    iou = tf.where(valid[:, None, :], iou, -2.0)
    iou = tf.concat([iou, -tf.ones_like(iou[..., :1])], axis=-1)
    best = tf.reduce_max(iou, axis=-1)
    index = tf.argmax(iou, axis=-1, output_type=tf.int32)
    labels = tf.where(best >= positive, 1, tf.where(best < negative, 0, -1))
    if best_anchor_positive:
        box_best = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, M + 1]
        is_best = tf.logical_and(tf.equal(iou, box_best), box_best > 0.0)
        labels = tf.where(tf.reduce_any(is_best, axis=-1), 1, labels)
    return index, labels  # index M: "no box" (such anchors are negatives)


def sample(labels: tf.Tensor, size: int, positive_fraction: float,
           seed: int | None = None) -> tf.Tensor:
    """Which anchors a step trains on (bool [B, A]): at random, up to size * positive_fraction
    positives per image, negatives for the rest of `size`; ignored anchors never."""
    noise = tf.random.uniform(tf.shape(labels), seed=seed)

    def first(candidates, count):
        # The `count` candidates with the largest noise: rank every anchor by its noise.
        score = tf.where(candidates, noise, -1.0)
        rank = tf.argsort(tf.argsort(score, axis=-1, direction="DESCENDING"), axis=-1)
        return tf.logical_and(candidates, rank < count[:, None])

    positives = tf.equal(labels, 1)
    available = tf.reduce_sum(tf.cast(positives, tf.int32), axis=-1)
    keep_positive = first(positives, tf.minimum(available, int(size * positive_fraction)))
    kept = tf.reduce_sum(tf.cast(keep_positive, tf.int32), axis=-1)
    keep_negative = first(tf.equal(labels, 0), size - kept)
    return tf.logical_or(keep_positive, keep_negative)


def anchor_targets(anchors: tf.Tensor, boxes: tf.Tensor, valid: tf.Tensor, negative: float = 0.3,
                   positive: float = 0.7, size: int = 256, positive_fraction: float = 0.5,
                   weights=(1.0, 1.0, 1.0, 1.0), seed: int | None = None) -> dict:
    """A region proposal network's targets for anchors [A, 4] and true boxes [B, M, 4]:
    `objectness` (1 for positives), `objectness_weight` (the sampled anchors), `deltas` [B, A, 4]
    to each anchor's box and `delta_weight` (sampled positives), all float32."""
    boxes = tf.cast(boxes, tf.float32)
    index, labels = match(pairwise_iou(tf.cast(anchors, tf.float32), boxes), valid, negative,
                          positive)
    boxes = tf.concat([boxes, tf.zeros_like(boxes[:, :1])], axis=1)  # box M: "none"
    chosen = sample(labels, size, positive_fraction, seed)
    positives = tf.logical_and(chosen, tf.equal(labels, 1))
    matched = tf.gather(boxes, index, batch_dims=1)
    return {"objectness": tf.cast(tf.equal(labels, 1), tf.float32),
            "objectness_weight": tf.cast(chosen, tf.float32),
            "deltas": encode(matched, tf.broadcast_to(tf.cast(anchors, tf.float32), tf.shape(matched)),
                             weights),
            "delta_weight": tf.cast(positives, tf.float32)}


def mask_targets(masks: tf.Tensor, proposals: tf.Tensor, index: tf.Tensor,
                 size: int = 28) -> tf.Tensor:
    """A mask head's targets: each proposal's matched true mask, cut to the proposal and resized
    to size x size (bilinear at the bins' centres, then >= 0.5), float32 [B, P, size, size].

    `masks` [B, M, H, W] are the true boxes' masks on the input image (bool or 0..1), `index`
    [B, P] each proposal's box (from `match`; M, "none", gives an empty target, which the loss
    weights out anyway: only positives train the mask head)."""
    batch, count = tf.shape(masks)[0], tf.shape(masks)[1]
    height, width = tf.shape(masks)[2], tf.shape(masks)[3]
    flat = tf.reshape(tf.cast(masks, tf.float32), [-1, height, width, 1])
    flat = tf.concat([flat, tf.zeros_like(flat[:1])], axis=0)  # the last one: "none"
    images = tf.range(batch)[:, None] * count + index
    images = tf.where(index >= count, batch * count, images)
    boxes = tf.reshape(tf.cast(proposals, tf.float32), [-1, 4])
    # The same sampling as the features' RoI Align, so target and prediction cover one area.
    crops = roi_align_level(flat, boxes, tf.reshape(images, [-1]), 1.0, size, sampling=1)
    return tf.reshape(tf.cast(crops[..., 0] >= 0.5, tf.float32),
                      [batch, tf.shape(proposals)[1], size, size])


def proposal_targets(proposals: tf.Tensor, proposal_valid: tf.Tensor, boxes: tf.Tensor,
                     classes: tf.Tensor, valid: tf.Tensor, iou: float = 0.5, size: int = 128,
                     positive_fraction: float = 0.25, weights=(10.0, 10.0, 5.0, 5.0),
                     seed: int | None = None) -> dict:
    """A box head's training set for one stage: `size` RoIs per image, sampled from the proposals
    [B, P, 4] plus the true boxes themselves (so positives exist from the first step), with their
    targets. A RoI is positive (its box's class, 1..C) at IoU >= `iou`, else background (0);
    cascade stages raise `iou` (0.5, 0.6, 0.7). `classes` [B, M] are 0-based, `valid` marks
    real boxes among the padding. Returns float32/int32 tensors: `rois` [B, size, 4], `labels`
    [B, size] (0 = background), `deltas` [B, size, 4] (encoded with `weights`), `roi_weight`
    (1 for sampled RoIs; fewer than `size` candidates leave the rest 0), `delta_weight` (sampled
    positives), and `index` [B, size] (each RoI's true box, M for none: mask targets use it)."""
    boxes = tf.cast(boxes, tf.float32)
    candidates = tf.concat([tf.cast(proposals, tf.float32), boxes], axis=1)
    usable = tf.concat([tf.cast(proposal_valid, tf.bool), tf.cast(valid, tf.bool)], axis=1)
    short = tf.maximum(size - tf.shape(candidates)[1], 0)  # fewer candidates than `size`: pad
    candidates = tf.pad(candidates, [[0, 0], [0, short], [0, 0]])
    usable = tf.pad(usable, [[0, 0], [0, short]])
    index, labels = match(pairwise_iou(candidates, boxes), valid, iou, iou,
                          best_anchor_positive=False)
    labels = tf.where(usable, labels, -1)  # padding is never sampled
    chosen = sample(labels, size, positive_fraction, seed)
    # The chosen candidates first (stable: in candidate order), then the first `size` of them.
    order = tf.argsort(tf.cast(tf.logical_not(chosen), tf.int32), axis=-1, stable=True)[:, :size]
    pick = lambda t: tf.gather(t, order, batch_dims=1)  # noqa: E731
    rois, index, labels, taken = pick(candidates), pick(index), pick(labels), pick(chosen)
    padded = tf.concat([boxes, tf.zeros_like(boxes[:, :1])], axis=1)
    padded_classes = tf.concat([tf.cast(classes, tf.int32), tf.zeros_like(classes[:, :1], tf.int32)], 1)
    positive = tf.logical_and(taken, tf.equal(labels, 1))
    return {"rois": rois,
            "labels": tf.where(positive, tf.gather(padded_classes, index, batch_dims=1) + 1, 0),
            "deltas": encode(tf.gather(padded, index, batch_dims=1), rois, weights),
            "roi_weight": tf.cast(taken, tf.float32),
            "delta_weight": tf.cast(positive, tf.float32),
            "index": index}

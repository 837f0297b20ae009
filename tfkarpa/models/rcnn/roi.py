"""RoI Align over a feature pyramid: a fixed-size feature crop per box, on the level its size picks.

RoI Align (He et al., Mask R-CNN 2017) samples each of the output's bins at `sampling` x `sampling`
regularly spaced points by bilinear interpolation and averages them; nothing is rounded to the
feature grid. `tf.image.crop_and_resize` does the bilinear sampling (a builtin TFLite op): its
first and last sample are placed at the centres of the first and last of the out*sampling
sub-bins, and an average pool of sampling x sampling makes the bins. Points outside the feature
map read 0, as crop_and_resize extrapolates.

Boxes are xyxy in input-image pixels (continuous coordinates: pixel i covers [i, i+1)); a level
with stride s maps x to x / s. `pyramid_levels` is the FPN paper's rule (Lin et al. 2017, eq. 1):
k = floor(k0 + log2(sqrt(w h) / 224)), clipped to the pyramid, with k0 the level of a 224-pixel box.

Not keras-cv's: 0.9 exports only `ROIPooler` (RoI max pooling on rounded bins, the older RoIPool);
its RoI Align (`keras_cv.src.layers.object_detection.roi_align`) is private, a port of Model
Garden's gather-based version that is longer to read than this.
"""

from __future__ import annotations

import tensorflow as tf


def pyramid_levels(boxes: tf.Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                   canonical_level: int = 4) -> tf.Tensor:
    """The FPN level of each xyxy box [..., 4] (input pixels), int32 in [min_level, max_level]."""
    boxes = tf.cast(boxes, tf.float32)
    area = tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    scale = tf.sqrt(tf.maximum(area, 1e-6)) / canonical_size
    level = tf.floor(canonical_level + tf.math.log(scale) / tf.math.log(2.0))
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


def roi_align_level(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor, stride: float,
                    output_size: int = 7, sampling: int = 2) -> tf.Tensor:
    """RoI Align on one feature map [B, H, W, C]: boxes [N, 4] xyxy in input pixels, each from
    image `box_indices[N]`; returns [N, output_size, output_size, C]."""
    shape = tf.shape(features)
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    n = output_size * sampling
    x0, y0, x1, y1 = tf.unstack(tf.cast(boxes, tf.float32) / stride, axis=-1)
    # First and last sample: the centres of the first and last of n sub-bins, as array indices
    # (continuous coordinate - 0.5), normalised the way crop_and_resize reads them (by size - 1).
    def ends(lo, hi, size):
        step = (hi - lo) / n
        first, last = lo + 0.5 * step - 0.5, hi - 0.5 * step - 0.5
        scale = tf.maximum(size - 1.0, 1.0)
        return first / scale, last / scale

    ya, yb = ends(y0, y1, height)
    xa, xb = ends(x0, x1, width)
    crops = tf.image.crop_and_resize(features, tf.stack([ya, xa, yb, xb], axis=-1), box_indices,
                                     [n, n], method="bilinear", extrapolation_value=0.0)
    if sampling == 1:
        return crops
    return tf.nn.avg_pool2d(crops, sampling, sampling, "VALID")


def multilevel_roi_align(features: dict[int, tf.Tensor], boxes: tf.Tensor, output_size: int = 7,
                         sampling: int = 2, canonical_level: int = 4) -> tf.Tensor:
    """RoI Align over a pyramid {level: [B, H_l, W_l, C]} (level l has stride 2**l): boxes
    [B, N, 4] xyxy in input pixels; returns [B, N, output_size, output_size, C], each box cut
    from the level `pyramid_levels` gives it."""
    levels = sorted(features)
    batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    image_of = tf.repeat(tf.range(batch), count)
    chosen = pyramid_levels(flat, levels[0], levels[-1], canonical_level=canonical_level)
    pieces, order = [], []
    for level in levels:
        where = tf.where(tf.equal(chosen, level))[:, 0]
        pieces.append(roi_align_level(features[level], tf.gather(flat, where),
                                      tf.gather(image_of, where), 2.0 ** level, output_size,
                                      sampling))
        order.append(where)
    # Put the crops back in box order: scatter each level's crops to its boxes' positions.
    crops = tf.scatter_nd(tf.cast(tf.concat(order, 0), tf.int32)[:, None], tf.concat(pieces, 0),
                          tf.concat([[batch * count], tf.shape(pieces[0])[1:]], 0))
    return tf.reshape(crops, tf.concat([[batch, count], tf.shape(crops)[1:]], 0))

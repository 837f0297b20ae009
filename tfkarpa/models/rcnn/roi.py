"""RoI Align over a feature pyramid: a fixed-size feature crop per box, on the level its size picks.

RoI Align (He et al., Mask R-CNN 2017) samples each of the output's bins at `sampling` x `sampling`
regularly spaced points by bilinear interpolation and averages them; nothing is rounded to the
feature grid. The points are the centres of the out*sampling sub-bins; an average pool of
sampling x sampling makes the bins. Points outside the feature map read 0 (as
`tf.image.crop_and_resize` extrapolates). The bilinear reads are `tf.image.crop_and_resize`, or
inside `portable()` four `gather_nd`s: CropAndResize is not a TFLite builtin op (the converter
stops with ERROR_NEEDS_FLEX_OPS), gathers are, so TFLite files carry RoI Align too.

Boxes are xyxy in input-image pixels (continuous coordinates: pixel i covers [i, i+1)); a level
with stride s maps x to x / s. `pyramid_levels` is the FPN paper's rule (Lin et al. 2017, eq. 1):
k = floor(k0 + log2(sqrt(w h) / 224)), clipped to the pyramid, with k0 the level of a 224-pixel box.

Not keras-cv's: 0.9 exports only `ROIPooler` (RoI max pooling on rounded bins, the older RoIPool);
its RoI Align (`keras_cv.src.layers.object_detection.roi_align`) is private, a port of Model
Garden's gather-based version (padded per level, for TPUs) that is longer to read than this.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf


def pyramid_levels(boxes: tf.Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                   canonical_level: int = 4) -> tf.Tensor:
    """The FPN level of each xyxy box [..., 4] (input pixels), int32 in [min_level, max_level]."""
    boxes = tf.cast(boxes, tf.float32)
    area = tf.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * tf.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    scale = tf.sqrt(tf.maximum(area, 1e-6)) / canonical_size
    level = tf.floor(canonical_level + tf.math.log(scale) / tf.math.log(2.0))
    return tf.cast(tf.clip_by_value(level, min_level, max_level), tf.int32)


def _sample_points(lo: tf.Tensor, hi: tf.Tensor, n: int) -> tf.Tensor:
    """The centres of n equal sub-bins of [lo, hi] (feature-map coordinates), as array indices
    (continuous coordinate - 0.5): [N, n]."""
    step = (hi - lo) / n
    return lo[:, None] + (tf.range(n, dtype=tf.float32)[None] + 0.5) * step[:, None] - 0.5


def _bilinear(features: tf.Tensor, images: tf.Tensor, ys: tf.Tensor, xs: tf.Tensor) -> tf.Tensor:
    """Features [B, H, W, C] read at the grid ys [N, n] x xs [N, n] of image `images` [N],
    bilinearly: [N, n, n, C]; a point outside [0, H-1] x [0, W-1] reads 0."""
    shape = tf.shape(features)
    height, width = shape[1], shape[2]
    fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    inside = tf.logical_and(
        tf.logical_and(ys >= 0.0, ys <= fh - 1.0)[:, :, None],
        tf.logical_and(xs >= 0.0, xs <= fw - 1.0)[:, None, :])  # [N, n, n]
    y0 = tf.clip_by_value(tf.floor(ys), 0.0, fh - 1.0)
    x0 = tf.clip_by_value(tf.floor(xs), 0.0, fw - 1.0)
    dy = (ys - y0)[:, :, None, None]
    dx = (xs - x0)[:, None, :, None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    y1, x1 = tf.minimum(y0 + 1, height - 1), tf.minimum(x0 + 1, width - 1)
    n = tf.shape(ys)[1]
    image = tf.broadcast_to(images[:, None, None], [tf.shape(ys)[0], n, n])

    def read(y, x):
        index = tf.stack([image, tf.broadcast_to(y[:, :, None], tf.shape(image)),
                          tf.broadcast_to(x[:, None, :], tf.shape(image))], axis=-1)
        return tf.gather_nd(features, index)

    value = ((1 - dy) * ((1 - dx) * read(y0, x0) + dx * read(y0, x1))
             + dy * ((1 - dx) * read(y1, x0) + dx * read(y1, x1)))
    return tf.where(inside[..., None], value, 0.0)


_PORTABLE = threading.local()


@contextlib.contextmanager
def portable():
    """Inside: RoI Align traces as gathers (TFLite builtins) instead of CropAndResize (not a
    builtin). The same numbers (tested); the gathers are 4-7x slower on CPU, so training and
    the SavedModel keep CropAndResize and only TFLite conversion traces inside this."""
    before = getattr(_PORTABLE, "on", False)
    _PORTABLE.on = True
    try:
        yield
    finally:
        _PORTABLE.on = before


def roi_align_level(features: tf.Tensor, boxes: tf.Tensor, box_indices: tf.Tensor, stride: float,
                    output_size: int = 7, sampling: int = 2) -> tf.Tensor:
    """RoI Align on one feature map [B, H, W, C]: boxes [N, 4] xyxy in input pixels, each from
    image `box_indices[N]`; returns [N, output_size, output_size, C]."""
    n = output_size * sampling
    # Slices, not tf.unstack: TFLite's UNPACK refuses an empty input (a level with no boxes).
    boxes = tf.cast(boxes, tf.float32) / stride
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    ys, xs = _sample_points(y0, y1, n), _sample_points(x0, x1, n)
    features, box_indices = tf.cast(features, tf.float32), tf.cast(box_indices, tf.int32)
    if getattr(_PORTABLE, "on", False):
        crops = _bilinear(features, box_indices, ys, xs)
    else:
        # crop_and_resize reads n evenly spaced points from the first to the last given,
        # in coordinates normalised by (size - 1).
        shape = tf.shape(features)
        height = tf.maximum(tf.cast(shape[1], tf.float32) - 1.0, 1.0)
        width = tf.maximum(tf.cast(shape[2], tf.float32) - 1.0, 1.0)
        corners = tf.stack([ys[:, 0] / height, xs[:, 0] / width, ys[:, -1] / height,
                            xs[:, -1] / width], axis=-1)
        crops = tf.image.crop_and_resize(features, corners, box_indices, [n, n],
                                         method="bilinear", extrapolation_value=0.0)
    if sampling == 1:
        return crops
    return tf.nn.avg_pool2d(crops, sampling, sampling, "VALID")


def multilevel_roi_align(features: dict[int, tf.Tensor], boxes: tf.Tensor, output_size: int = 7,
                         sampling: int = 2, canonical_level: int = 4,
                         canonical_size: float = 224.0) -> tf.Tensor:
    """RoI Align over a pyramid {level: [B, H_l, W_l, C]} (level l has stride 2**l): boxes
    [B, N, 4] xyxy in input pixels; returns [B, N, output_size, output_size, C], each box cut
    from the level `pyramid_levels` gives it."""
    levels = sorted(features)
    batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
    flat = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    image_of = tf.repeat(tf.range(batch), count)
    chosen = pyramid_levels(flat, levels[0], levels[-1], canonical_size, canonical_level)
    if getattr(_PORTABLE, "on", False):
        # Every box cut from every level, then each box's own kept: no level's box list is
        # ever empty (TFLite's kernels fail to prepare zero-sized tensors), at 4x the reads.
        crops = tf.add_n([
            roi_align_level(features[level], flat, image_of, 2.0 ** level, output_size, sampling)
            * tf.cast(tf.equal(chosen, level), tf.float32)[:, None, None, None]
            for level in levels])
        return tf.reshape(crops, tf.concat([[batch, count], tf.shape(crops)[1:]], 0))
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


def paste_masks(masks: tf.Tensor, boxes: tf.Tensor, height, width) -> tf.Tensor:
    """A mask head's box-relative maps [D, m, m] (probabilities) put back into an image of
    height x width: [D, H, W] probabilities, 0 outside each box `boxes` [D, 4] (xyxy pixels).

    RoI Align's inverse: each pixel centre is read from the map bilinearly at its place in the
    box, map cells centred at (i + 0.5) / m of the box, and with a zero border around the map,
    so values fade to 0 across the box's edge (as Detectron2's paste, grid_sample with zero
    padding, does) instead of stopping half a cell inside it."""
    masks = tf.cast(masks, tf.float32)
    m = tf.cast(tf.shape(masks)[1], tf.float32)
    padded = tf.pad(masks, [[0, 0], [1, 1], [1, 1]])[..., None]  # cell i is now i + 1
    boxes = tf.cast(boxes, tf.float32)
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)

    def cell(pixel_centre, lo, hi):  # a pixel centre as an index of the padded map
        return (pixel_centre - lo) / tf.maximum(hi - lo, 1e-6) * m - 0.5 + 1.0

    corners = tf.stack([cell(0.5, y0, y1), cell(0.5, x0, x1), cell(h - 0.5, y0, y1),
                        cell(w - 0.5, x0, x1)], axis=-1) / (m + 1.0)
    pasted = tf.image.crop_and_resize(padded, corners, tf.range(tf.shape(masks)[0]),
                                      tf.stack([tf.cast(height, tf.int32), tf.cast(width, tf.int32)]),
                                      method="bilinear", extrapolation_value=0.0)
    return pasted[..., 0]

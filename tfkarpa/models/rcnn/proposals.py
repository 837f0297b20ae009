"""Region proposals: a region proposal network's scored anchor deltas to a few hundred boxes.

Per image: the `pre_nms` anchors of highest objectness, moved by their deltas, clipped to the
image, those narrower or shorter than `min_size` dropped, then non-maximum suppression at IoU
`iou` (keras-cv's, which is built of TFLite builtin ops) keeps at most `post_nms`, padded.
One top-k over all levels rather than Detectron2's top-k per level: at the sizes tfkarpa trains
(a few thousand anchors) the two keep nearly the same boxes, and one is simpler to read.
"""

from __future__ import annotations

import tensorflow as tf

from tfkarpa import kcv
from tfkarpa.models.rcnn.targets import decode

# Logit given to boxes too small to keep: sigmoid of it is 0, under any confidence threshold.
_DROPPED = -1e4


def propose(objectness: tf.Tensor, deltas: tf.Tensor, anchors: tf.Tensor, image_size,
            pre_nms: int = 1000, post_nms: int = 300, iou: float = 0.7, min_size: float = 0.0,
            weights=(1.0, 1.0, 1.0, 1.0)) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Proposals from objectness logits [B, A], deltas [B, A, 4] and anchors [A, 4] (xyxy, input
    pixels) on images of `image_size` (height, width): boxes [B, post_nms, 4], their objectness
    (probability) [B, post_nms] and `valid` [B, post_nms]; padding after the kept ones is 0."""
    top = min(pre_nms, anchors.shape[0] or pre_nms)
    scores, index = tf.math.top_k(tf.cast(objectness, tf.float32), k=top)
    boxes = decode(tf.gather(tf.cast(deltas, tf.float32), index, batch_dims=1),
                   tf.gather(tf.cast(anchors, tf.float32), index), weights)
    height, width = float(image_size[0]), float(image_size[1])
    boxes = tf.clip_by_value(boxes, 0.0, [width, height, width, height])
    small = tf.logical_or(boxes[..., 2] - boxes[..., 0] < min_size,
                          boxes[..., 3] - boxes[..., 1] < min_size)
    scores = tf.where(small, _DROPPED, scores)
    nms = kcv.load().layers.NonMaxSuppression(
        bounding_box_format="xyxy", from_logits=True, iou_threshold=iou,
        confidence_threshold=1e-6, max_detections=post_nms)
    kept = nms(boxes, scores[..., None])
    valid = tf.sequence_mask(kept["num_detections"], post_nms)
    return (tf.where(valid[..., None], kept["boxes"], 0.0),
            tf.where(valid, kept["confidence"], 0.0), valid)

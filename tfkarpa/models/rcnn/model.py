"""The two-stage detector: backbone + FPN, a region proposal network, 1 or 3 box stages and an
optional mask head, as one Keras model with its own training step.

- Features: a keras-cv backbone's P2-P5 (strides 4-32) through a feature pyramid (Lin et al.
  2017: 1x1 laterals, nearest-neighbour top-down sums, 3x3 smoothing), `channels` wide.
- RPN: one head shared by the levels; anchors of 4 x stride (and x sqrt 2) at three aspect ratios
  from keras-cv's AnchorGenerator, fixed by the image size. Its targets: `targets.anchor_targets`.
- Box stages: proposals (`proposals.propose`, gradients stopped) are sampled against the true
  boxes (`targets.proposal_targets`), cut from their pyramid level (`roi.multilevel_roi_align`)
  and classified over C+1 classes with class-agnostic deltas. Faster R-CNN has one stage at IoU
  0.5; Cascade R-CNN (Cai & Vasconcelos 2018) three at 0.5/0.6/0.7, each stage resampling the
  previous stage's refined boxes (plus the true boxes) at its own IoU, with tighter delta weights
  (10/10/5/5, 20/20/10/10, 30/30/15/15). At inference the stages run in turn on the refined
  boxes and the class probabilities are the stages' mean.
- Masks (Mask R-CNN): on the last stage's positive RoIs in training; at inference on the kept
  detections, the detected class's 2S x 2S map as probabilities in box coordinates
  (`masks` [B, D, M, M]); pasting them into image pixels is the serving code's.

Calling the model (training=False) returns final detections in the keras-cv detectors' format
(`boxes` xyxy in input pixels, `confidence`, `classes`, `num_detections`, padded to
`max_detections`), so `predict`, the COCO evaluation and the exports treat it as they treat
YOLOv8; `decode_predictions` is therefore the identity.
"""

from __future__ import annotations

import tensorflow as tf

from tfkarpa import kcv
from tfkarpa.models.rcnn import losses
from tfkarpa.models.rcnn.heads import box_head, mask_head, rpn_head
from tfkarpa.models.rcnn.proposals import propose
from tfkarpa.models.rcnn.roi import multilevel_roi_align
from tfkarpa.models.rcnn.targets import decode, mask_targets, proposal_targets, anchor_targets

layers = tf.keras.layers

LEVELS = (2, 3, 4, 5)
FASTER_STAGES = ((0.5, (10.0, 10.0, 5.0, 5.0)),)
CASCADE_STAGES = ((0.5, (10.0, 10.0, 5.0, 5.0)), (0.6, (20.0, 20.0, 10.0, 10.0)),
                  (0.7, (30.0, 30.0, 15.0, 15.0)))
ANCHOR_SCALES = (1.0, 2 ** 0.5)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
# Which level a RoI is cut from: the level whose anchors (4 x stride) match its side, so a box of
# side s goes to level log2(s / 4); the canonical 64-pixel box sits on level 4.
CANONICAL_SIZE = 64.0


def pyramid(backbone: tf.keras.Model, channels: int) -> tf.keras.Model:
    """images -> {level: [B, H/2**level, W/2**level, channels]} for levels 2-5."""
    names = backbone.pyramid_level_inputs
    outputs = [backbone.get_layer(names[f"P{level}"]).output for level in LEVELS]
    lateral = [layers.Conv2D(channels, 1, name=f"fpn_lateral{level}")(x)
               for level, x in zip(LEVELS, outputs)]
    merged = [lateral[-1]]
    for x in reversed(lateral[:-1]):
        merged.insert(0, layers.Add()([x, layers.UpSampling2D(2, interpolation="nearest")(merged[0])]))
    smoothed = {str(level): layers.Conv2D(channels, 3, padding="same", name=f"fpn_output{level}")(x)
                for level, x in zip(LEVELS, merged)}
    return tf.keras.Model(backbone.inputs, smoothed, name="features")


def anchors_for(image_size: int) -> tf.Tensor:
    """[A, 4] xyxy anchors over levels 2-5, in the RPN head's (level, y, x, anchor) order."""
    generator = kcv.load().layers.AnchorGenerator(
        bounding_box_format="xyxy", sizes=[4.0 * 2 ** level for level in LEVELS],
        scales=list(ANCHOR_SCALES), aspect_ratios=list(ASPECT_RATIOS),
        strides=[2 ** level for level in LEVELS])
    per_level = generator(image_shape=(image_size, image_size, 3))
    return tf.concat([per_level[key] for key in sorted(per_level)], axis=0)


class TwoStageDetector(tf.keras.Model):
    """Faster / Cascade / Mask R-CNN on a keras-cv backbone; see the module docstring."""

    def __init__(self, backbone: tf.keras.Model, num_classes: int, image_size: int,
                 cascade: bool = False, masks: bool = False, channels: int = 64,
                 hidden: int = 256, roi_size: int = 7, proposals: int = 200,
                 roi_samples: int = 128, iou: float = 0.6, confidence: float = 0.01,
                 max_detections: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.num_classes, self.image_size = num_classes, image_size
        self.stages = CASCADE_STAGES if cascade else FASTER_STAGES
        self.with_masks = masks
        self.roi_size, self.proposals, self.roi_samples = roi_size, proposals, roi_samples
        self.features = pyramid(backbone, channels)
        self.anchors = anchors_for(image_size)
        self.rpn = rpn_head(channels, len(ANCHOR_SCALES) * len(ASPECT_RATIOS))
        self.box_heads = [box_head(roi_size, channels, num_classes, hidden, name=f"box_head{i + 1}")
                          for i in range(len(self.stages))]
        self.mask_head = (mask_head(2 * roi_size, channels, num_classes) if masks else None)
        self.nms = kcv.load().layers.NonMaxSuppression(
            bounding_box_format="xyxy", from_logits=False, iou_threshold=iou,
            confidence_threshold=confidence, max_detections=max_detections)
        names = ["loss", "rpn_objectness", "rpn_box"]
        for i in range(len(self.stages)):
            prefix = f"stage{i + 1}_" if cascade else ""
            names += [f"{prefix}box_class", f"{prefix}box_delta"]
        names += ["mask"] if masks else []
        self.trackers = {name: tf.keras.metrics.Mean(name) for name in names}
        self._settings = {"num_classes": num_classes, "image_size": image_size,
                          "cascade": cascade, "masks": masks, "channels": channels,
                          "hidden": hidden, "roi_size": roi_size, "proposals": proposals,
                          "roi_samples": roi_samples, "iou": iou, "confidence": confidence,
                          "max_detections": max_detections, "backbone": backbone.name}

    def get_config(self):
        """The sizes it was built with (the backbone by name: `detectors.two_stage` rebuilds
        the whole model from the run's config; this is for reading, and keeps Keras from
        warning that it cannot serialise the backbone argument)."""
        return dict(self._settings)

    @property
    def metrics(self):
        return list(self.trackers.values())

    # ---- shared pieces
    def _pyramid(self, images, training):
        found = self.features(images, training=training)
        return {int(level): tf.cast(x, tf.float32) for level, x in found.items()}

    def _rpn(self, feats, training):
        logits, deltas = zip(*(self.rpn(feats[level], training=training) for level in LEVELS))
        return tf.concat(logits, axis=1), tf.concat(deltas, axis=1)

    def _propose(self, logits, deltas, count):
        return propose(tf.stop_gradient(logits), tf.stop_gradient(deltas), self.anchors,
                       (self.image_size, self.image_size), pre_nms=4 * count, post_nms=count,
                       iou=0.7, min_size=1.0)

    def _head(self, stage, feats, rois, training):
        """Class logits [B, N, C+1] and deltas [B, N, 4] of RoIs [B, N, 4] at one stage."""
        crops = multilevel_roi_align(feats, rois, self.roi_size, canonical_size=CANONICAL_SIZE)
        batch, count = tf.shape(rois)[0], tf.shape(rois)[1]
        flat = tf.reshape(crops, [-1, self.roi_size, self.roi_size, crops.shape[-1]])
        logits, deltas = self.box_heads[stage](flat, training=training)
        return (tf.reshape(tf.cast(logits, tf.float32), [batch, count, self.num_classes + 1]),
                tf.reshape(tf.cast(deltas, tf.float32), [batch, count, 4]))

    def _clip(self, boxes):
        side = float(self.image_size)
        return tf.clip_by_value(boxes, 0.0, side)

    def _mask_logits(self, feats, rois, training):
        crops = multilevel_roi_align(feats, rois, 2 * self.roi_size,
                                     canonical_size=CANONICAL_SIZE)
        side = 2 * self.roi_size
        flat = tf.reshape(crops, [-1, side, side, crops.shape[-1]])
        return tf.cast(self.mask_head(flat, training=training), tf.float32)  # [B*N, 2s, 2s, C]

    # ---- training
    def _loss_parts(self, images, targets, training):
        boxes = tf.cast(targets["boxes"], tf.float32)
        classes = tf.cast(targets["classes"], tf.int32)
        valid = classes >= 0
        feats = self._pyramid(images, training)
        logits, deltas = self._rpn(feats, training)
        rpn = anchor_targets(self.anchors, boxes, valid)
        out = {"rpn_objectness": losses.objectness_loss(rpn["objectness"], logits,
                                                        rpn["objectness_weight"]),
               "rpn_box": losses.delta_loss(rpn["deltas"], deltas, rpn["delta_weight"],
                                            beta=1.0 / 9)}
        rois, _, rois_valid = self._propose(logits, deltas, self.proposals)
        cascade = len(self.stages) > 1
        for stage, (iou, weights) in enumerate(self.stages):
            prefix = f"stage{stage + 1}_" if cascade else ""
            t = proposal_targets(rois, rois_valid, boxes, tf.maximum(classes, 0), valid, iou=iou,
                                 size=self.roi_samples, weights=weights)
            class_logits, box_deltas = self._head(stage, feats, t["rois"], training)
            out[f"{prefix}box_class"] = losses.classification_loss(t["labels"], class_logits,
                                                                   t["roi_weight"])
            out[f"{prefix}box_delta"] = losses.delta_loss(t["deltas"], box_deltas,
                                                          t["delta_weight"], beta=1.0)
            rois = self._clip(decode(tf.stop_gradient(box_deltas), t["rois"], weights))
            rois_valid = t["roi_weight"] > 0
        if self.with_masks:
            out["mask"] = self._mask_loss(feats, targets["masks"], t, training)
        return out

    def _mask_loss(self, feats, masks, t, training):
        # Only positives train the mask head: its convolutions run on the sampled positives'
        # share (positives first), a quarter of the RoIs, not on all of them.
        keep = max(1, self.roi_samples // 4)
        order = tf.argsort(t["delta_weight"], axis=-1, direction="DESCENDING", stable=True)[:, :keep]
        pick = lambda key: tf.gather(t[key], order, batch_dims=1)  # noqa: E731
        rois, weight = pick("rois"), pick("delta_weight")
        side = 4 * self.roi_size
        wanted = mask_targets(masks, rois, pick("index"), side)
        logits = self._mask_logits(feats, rois, training)
        return losses.mask_loss(tf.reshape(wanted, [-1, side, side]), logits,
                                tf.reshape(pick("labels"), [-1]), tf.reshape(weight, [-1]))

    def _total(self, parts):
        total = tf.add_n(list(parts.values()))
        if self.losses:
            total += tf.add_n(self.losses)
        return total

    def _record(self, parts, total):
        self.trackers["loss"].update_state(total)
        for name, value in parts.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        images, targets = data
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            parts = self._loss_parts(images, targets, training=True)
            total = self._total(parts)
            # The optimizer sums replicas' gradients: each replica's loss is its share.
            scaled = total / replicas
            if isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
                scaled = self.optimizer.get_scaled_loss(scaled)
        grads = tape.gradient(scaled, self.trainable_variables)
        if isinstance(self.optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
            grads = self.optimizer.get_unscaled_gradients(grads)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return self._record(parts, total)

    def test_step(self, data):
        images, targets = data
        parts = self._loss_parts(images, targets, training=False)
        return self._record(parts, self._total(parts))

    # ---- inference
    def call(self, images, training=False):
        feats = self._pyramid(images, training)
        logits, deltas = self._rpn(feats, training)
        rois = self._propose(logits, deltas, self.proposals)[0]
        probabilities = 0.0
        for stage, (_, weights) in enumerate(self.stages):
            class_logits, box_deltas = self._head(stage, feats, rois, training)
            probabilities += tf.nn.softmax(class_logits) / len(self.stages)
            rois = self._clip(decode(box_deltas, rois, weights))
        found = self.nms(rois, probabilities[..., 1:])
        found["classes"] = tf.cast(found["classes"], tf.int32)
        if self.with_masks:
            found["masks"] = self._detected_masks(feats, found)
        return found

    @tf.function(reduce_retracing=True)
    def proposal_boxes(self, images, count: int = 10):
        """The RPN's `count` best proposals per image (boxes [B, count, 4], objectness): what
        the box stages start from, drawn in TensorBoard."""
        logits, deltas = self._rpn(self._pyramid(images, False), False)
        boxes, objectness, _ = self._propose(logits, deltas, count)
        return boxes, objectness

    def _detected_masks(self, feats, found):
        """The detected class's mask probabilities [B, D, 2S, 2S] for each kept box."""
        boxes = found["boxes"]
        batch, count = tf.shape(boxes)[0], tf.shape(boxes)[1]
        logits = self._mask_logits(feats, boxes, training=False)
        classes = tf.reshape(tf.maximum(found["classes"], 0), [-1])
        own = tf.gather(tf.transpose(logits, [0, 3, 1, 2]), classes, batch_dims=1)
        side = 4 * self.roi_size
        return tf.reshape(tf.sigmoid(own), [batch, count, side, side])

    def decode_predictions(self, predictions, images=None):
        """The call's output is final already (see the module docstring)."""
        return predictions

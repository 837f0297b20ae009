"""The two-stage family's heads, as small Keras models shared across levels, stages or RoIs.

- `rpn_head`: per pyramid level, a 3x3 conv then 1x1 convs to one objectness logit and 4 deltas
  per anchor; flattened (y, x, anchor) like keras-cv's AnchorGenerator lists its anchors.
- `box_head`: RoI features [N, S, S, C] through two fully connected layers to C+1 class logits
  (0 = background) and class-agnostic deltas (Cascade R-CNN's choice; one regression per stage).
- `mask_head`: RoI features [N, S, S, C] through four 3x3 convs and a 2x transposed conv to one
  mask logit map per class, [N, 2S, 2S, classes] (Mask R-CNN's FCN head).
The widths are arguments: tfkarpa's defaults are far narrower than the papers' 256/1024 so that
a CPU trains them (the model builder chooses them).
"""

from __future__ import annotations

import tensorflow as tf

layers = tf.keras.layers


def rpn_head(channels: int, anchors_per_location: int, name: str = "rpn_head") -> tf.keras.Model:
    """One level's features [B, H, W, channels] -> objectness [B, H*W*A], deltas [B, H*W*A, 4]."""
    x = inputs = layers.Input((None, None, channels))
    x = layers.Conv2D(channels, 3, padding="same", activation="relu", name="conv")(x)
    def small():  # one initializer per layer: a shared one gives both the same draws
        return tf.keras.initializers.RandomNormal(stddev=0.01)

    logits = layers.Conv2D(anchors_per_location, 1, kernel_initializer=small(), name="objectness")(x)
    deltas = layers.Conv2D(4 * anchors_per_location, 1, kernel_initializer=small(), name="deltas")(x)
    logits = layers.Reshape((-1,), name="objectness_flat")(logits)
    deltas = layers.Reshape((-1, 4), name="deltas_flat")(deltas)
    return tf.keras.Model(inputs, [logits, deltas], name=name)


def box_head(roi_size: int, channels: int, num_classes: int, hidden: int = 256,
             name: str = "box_head") -> tf.keras.Model:
    """RoI features [N, roi_size, roi_size, channels] -> class logits [N, num_classes + 1]
    (0 = background), deltas [N, 4]."""
    x = inputs = layers.Input((roi_size, roi_size, channels))
    x = layers.Flatten()(x)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    x = layers.Dense(hidden, activation="relu", name="fc2")(x)
    logits = layers.Dense(num_classes + 1, kernel_initializer=tf.keras.initializers.RandomNormal(
        stddev=0.01), name="class_logits")(x)
    deltas = layers.Dense(4, kernel_initializer=tf.keras.initializers.RandomNormal(stddev=0.001),
                          name="deltas")(x)
    return tf.keras.Model(inputs, [logits, deltas], name=name)


def mask_head(roi_size: int, channels: int, num_classes: int, width: int = 64,
              name: str = "mask_head") -> tf.keras.Model:
    """RoI features [N, roi_size, roi_size, channels] -> mask logits [N, 2 roi_size,
    2 roi_size, num_classes] (the true class's map is the one trained and used)."""
    x = inputs = layers.Input((roi_size, roi_size, channels))
    for i in range(4):
        x = layers.Conv2D(width, 3, padding="same", activation="relu", name=f"conv{i + 1}")(x)
    x = layers.Conv2DTranspose(width, 2, strides=2, activation="relu", name="upsample")(x)
    logits = layers.Conv2D(num_classes, 1, name="mask_logits")(x)
    return tf.keras.Model(inputs, logits, name=name)

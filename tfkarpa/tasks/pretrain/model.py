"""The SimCLR model: a classifier's encoder, an MLP projection head and the NT-Xent loss.

With several replicas each one's projections are gathered from all replicas (`all_gather`,
whose gradient flows back to the replica that made them), so the negatives are the whole global
batch, as in the paper.
"""

from __future__ import annotations

import tensorflow as tf

from tfkarpa.errors import TfkarpaError


def encoder_of(model: tf.keras.Model) -> tf.keras.Model:
    """The classifier up to its global pooling layer: image in, feature vector out."""
    try:
        pool = model.get_layer("pool")
    except ValueError:
        raise TfkarpaError(f"model '{model.name}' has no 'pool' layer to cut an encoder at") from None
    return tf.keras.Model(model.input, pool.output, name=f"{model.name}_encoder")


def projection_head(features: int, hidden: int, out: int) -> tf.keras.Model:
    inputs = tf.keras.Input((features,), name="features")
    x = tf.keras.layers.Dense(hidden, use_bias=False, name="proj_dense1")(inputs)
    x = tf.keras.layers.BatchNormalization(name="proj_bn1")(x)
    x = tf.keras.layers.ReLU(name="proj_relu")(x)
    x = tf.keras.layers.Dense(out, name="proj_dense2")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Activation("linear", dtype="float32")(x),
                          name="projection_head")


def nt_xent(z1: tf.Tensor, z2: tf.Tensor, temperature: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-example NT-Xent loss of this replica's pairs and whether each found its partner.

    Each of the 2n local views must pick out its partner among all 2N - 1 other views of the
    global batch (N over every replica). Under one replica N = n.
    """
    z1 = tf.math.l2_normalize(tf.cast(z1, tf.float32), axis=1)
    z2 = tf.math.l2_normalize(tf.cast(z2, tf.float32), axis=1)
    n = tf.shape(z1)[0]
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        z1_all, z2_all = ctx.all_gather(z1, axis=0), ctx.all_gather(z2, axis=0)
        sizes = ctx.all_gather(tf.reshape(n, [1]), axis=0)
        offset = tf.reduce_sum(sizes[:ctx.replica_id_in_sync_group])
    else:
        z1_all, z2_all, offset = z1, z2, 0
    labels = tf.range(n) + offset
    self_mask = tf.one_hot(labels, tf.shape(z1_all)[0]) * 1e9
    logits_11 = tf.matmul(z1, z1_all, transpose_b=True) / temperature - self_mask
    logits_22 = tf.matmul(z2, z2_all, transpose_b=True) / temperature - self_mask
    logits_12 = tf.matmul(z1, z2_all, transpose_b=True) / temperature
    logits_21 = tf.matmul(z2, z1_all, transpose_b=True) / temperature
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits
    loss = (ce(labels, tf.concat([logits_12, logits_11], 1))
            + ce(labels, tf.concat([logits_21, logits_22], 1)))
    hit = tf.cast(tf.equal(tf.argmax(logits_12, 1, output_type=tf.int32), labels), tf.float32)
    return loss, hit


class SimCLR(tf.keras.Model):
    """Encoder + projection head trained with NT-Xent on pairs of views."""

    def __init__(self, encoder, projector, temperature: float, **kwargs):
        super().__init__(name="simclr", **kwargs)
        self.encoder, self.projector, self.temperature = encoder, projector, temperature
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.accuracy_tracker = tf.keras.metrics.Mean(name="contrastive_accuracy")

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def call(self, images, training=False):
        return self.projector(self.encoder(images, training=training), training=training)

    def _pairs(self, views, training):
        v1, v2 = views
        z = self(tf.concat([v1, v2], 0), training=training)  # one pass: BatchNorm sees both
        z1, z2 = tf.split(z, 2, axis=0)
        return nt_xent(z1, z2, self.temperature)

    def train_step(self, views):
        with tf.GradientTape() as tape:
            per_example, hit = self._pairs(views, training=True)
            # Gradients are summed over replicas: scale so the step is the global mean.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss = tf.reduce_mean(per_example) / replicas
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        return self._track(per_example, hit)

    def test_step(self, views):
        return self._track(*self._pairs(views, training=False))

    def _track(self, per_example, hit):
        self.loss_tracker.update_state(per_example)
        self.accuracy_tracker.update_state(hit)
        return {m.name: m.result() for m in self.metrics}

"""The multi-task network (one backbone, one output per head) and the model that trains it.

The backbone is any classifier of `tfkarpa.models` up to its pooled features (the input of its
`logits` layer, so dropout and head_norm stay); each head is one dense layer on them. A
classification head ends in a float32 softmax; a regression head's linear output is scaled by
the training split's standard deviation and shifted by its mean inside the model, so the
network learns a standardised target and serves the value in the data's own units.

`MultiTaskTrainer` wraps that network for `fit` (as the adversarial trainer and the distiller
do: the run delivers the network alone). Its loss is the weighted sum of the heads' losses:
cross-entropy for classes, Huber loss of the error in standard deviations for values (so the
heads' losses start on one scale, whatever the values' units, and the weights mean what they
say). With `head_weighting=uncertainty` the weights are learned (Kendall, Gal and Cipolla
2018): each head has a log-variance s, and contributes
exp(-s) * loss + s / 2 (regression heads: exp(-s) * loss / 2 + s / 2). Each head logs its
loss, its accuracy (classes) or MAE and R^2 (values), and its learned weight; `score`, the
mean of the heads' accuracies and R^2, picks the best epoch.
"""

from __future__ import annotations

import re

import tensorflow as tf

from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks.classify.task import build_model as build_classifier
from tfkarpa.tasks.multitask.data import Head

layers = tf.keras.layers
HEAD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Names the model, its logs and its serving outputs use besides the heads' own.
_RESERVED = {"loss", "score", "learning_rate", "image", "images", "norm", "dropout"}


def derived_names(name: str) -> set[str]:
    """Every name a head puts into the model (layers), the logs and the serving outputs."""
    return {name, f"head_{name}", f"head_{name}_logits", f"head_{name}_linear",
            *(f"{name}_{s}" for s in ("loss", "accuracy", "mae", "r2", "weight", "probabilities",
                                      "class_id", "class_name", "score"))}


def check_names(names: list[str], where: str) -> None:
    """Head names that are usable and cannot collide: with each other's derived names (a head
    `x` beside `x_score`), Keras' `val_` prefix or the names the run uses itself."""
    for name in names:
        if not HEAD_NAME.fullmatch(name) or name.startswith("val_") or name in _RESERVED:
            raise TfkarpaError(f"{where}: '{name}' cannot name a head (a letter, then letters, "
                               f"digits or _; not val_..., {', '.join(sorted(_RESERVED))})")
    for a in names:
        for b in names:
            if a != b and b in derived_names(a):
                raise TfkarpaError(f"{where}: heads '{a}' and '{b}' collide ('{b}' is a name "
                                   f"head '{a}' uses for its outputs); rename one")


def build_model(cfg, input_shape: tuple, heads: list[Head]) -> tf.keras.Model:
    """The configured backbone with one output per head: {head: [batch, classes] probabilities
    or [batch, 1] values}."""
    trunk = build_classifier(cfg, input_shape, 2)  # its own head is dropped below
    features = trunk.get_layer("logits").input
    outputs = {}
    for head in heads:
        if head.kind == "class":
            x = layers.Dense(len(head.classes), name=f"head_{head.name}_logits")(features)
            outputs[head.name] = layers.Activation("softmax", dtype="float32",
                                                   name=f"head_{head.name}")(x)
        else:
            # Zero weights: the head starts at the training mean, and its first gradients do
            # not reach the backbone through random weights.
            x = layers.Dense(1, kernel_initializer="zeros", name=f"head_{head.name}_linear")(
                features)
            outputs[head.name] = layers.Rescaling(head.std, offset=head.mean, dtype="float32",
                                                  name=f"head_{head.name}")(x)
    return tf.keras.Model(trunk.input, outputs, name=f"multitask_{trunk.name}")


def head_score_key(head: Head) -> str:
    """The per-epoch figure of a head that counts towards `score` (higher is better)."""
    return f"{head.name}_accuracy" if head.kind == "class" else f"{head.name}_r2"


class MultiTaskTrainer(tf.keras.Model):
    """Trains `net` on the weighted sum of its heads' losses; predicts exactly as `net`."""

    def __init__(self, net: tf.keras.Model, heads: list[Head], weighting: str = "fixed",
                 label_smoothing: float = 0.0):
        super().__init__(name=f"multitask_trainer_{net.name}")
        self.net, self.heads, self.weighting = net, list(heads), weighting
        self.cross_entropy = tf.keras.losses.CategoricalCrossentropy(
            label_smoothing=label_smoothing, reduction=tf.keras.losses.Reduction.NONE)
        self.fixed = tf.constant([h.weight for h in self.heads], tf.float32)
        self.log_variance = self.add_weight(
            name="log_variance", shape=(len(self.heads),), initializer="zeros",
            trainable=weighting == "uncertainty")
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")
        self.trackers = {}
        for head in self.heads:
            self.trackers[f"{head.name}_loss"] = tf.keras.metrics.Mean(name=f"{head.name}_loss")
            if head.kind == "class":
                self.trackers[f"{head.name}_accuracy"] = tf.keras.metrics.CategoricalAccuracy(
                    name=f"{head.name}_accuracy")
            else:
                self.trackers[f"{head.name}_mae"] = tf.keras.metrics.MeanAbsoluteError(
                    name=f"{head.name}_mae")
                r2 = tf.keras.metrics.R2Score(name=f"{head.name}_r2")
                r2.build((None, 1), (None, 1))  # now, not lazily inside a replica's step
                self.trackers[f"{head.name}_r2"] = r2

    @property
    def metrics(self):  # reset by Keras at the start of every epoch and evaluation
        return [self.loss_tracker, *self.trackers.values()]

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def get_config(self):  # for Keras' summaries; the run saves `net`'s weights, never this
        return {"heads": [h.as_dict() for h in self.heads], "weighting": self.weighting}

    def head_losses(self, y, predictions) -> list[tf.Tensor]:
        """Each head's mean loss over the batch, in `heads` order."""
        out = []
        for head in self.heads:
            truth, guess = y[head.name], predictions[head.name]
            if head.kind == "class":
                out.append(tf.reduce_mean(self.cross_entropy(truth, guess)))
            else:
                # Huber on the standardised error: squared near the answer, linear beyond one
                # standard deviation. Plain squared error let one early batch of wild guesses
                # wreck the shared backbone (measured: size loss 12 in epoch 1, then every
                # head at chance for 10 epochs under SGD at lr 0.05).
                error = tf.abs(truth - guess) / head.std
                out.append(tf.reduce_mean(tf.where(error <= 1.0, 0.5 * tf.square(error),
                                                   error - 0.5)))
        return out

    def weights_now(self) -> tf.Tensor:
        """Each head's current loss weight."""
        if self.weighting == "fixed":
            return self.fixed
        halves = tf.constant([1.0 if h.kind == "class" else 0.5 for h in self.heads])
        return halves * tf.exp(-self.log_variance)

    def total_loss(self, losses: list[tf.Tensor]) -> tf.Tensor:
        total = tf.reduce_sum(self.weights_now() * tf.stack(losses))
        if self.weighting == "uncertainty":
            total += 0.5 * tf.reduce_sum(self.log_variance)
        return total

    def _logs(self, y, predictions, losses, total) -> dict:
        self.loss_tracker.update_state(total)
        for head, loss in zip(self.heads, losses):
            self.trackers[f"{head.name}_loss"].update_state(loss)
            for key in (f"{head.name}_accuracy", f"{head.name}_mae", f"{head.name}_r2"):
                if key in self.trackers:
                    self.trackers[key].update_state(y[head.name], predictions[head.name])
        logs = {m.name: m.result() for m in self.metrics}
        logs["score"] = tf.add_n([logs[head_score_key(h)] for h in self.heads]) / len(self.heads)
        return logs

    def train_step(self, data):
        x, y = data
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            predictions = self.net(x, training=True)
            losses = self.head_losses(y, predictions)
            total = self.total_loss(losses) + tf.add_n([0.0, *self.net.losses])
            # Keras' optimizer sums the replicas' gradients: each replica's loss is its share.
            scaled = total / replicas
            if hasattr(self.optimizer, "get_scaled_loss"):
                scaled = self.optimizer.get_scaled_loss(scaled)
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        if hasattr(self.optimizer, "get_unscaled_gradients"):
            grads = self.optimizer.get_unscaled_gradients(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        logs = self._logs(y, predictions, losses, total)
        if self.weighting == "uncertainty":  # learned: in the training logs (fixed ones are not)
            weights = self.weights_now()
            for i, head in enumerate(self.heads):
                logs[f"{head.name}_weight"] = weights[i]
        return logs

    def test_step(self, data):
        x, y = data
        predictions = self.net(x, training=False)
        losses = self.head_losses(y, predictions)
        total = self.total_loss(losses) + tf.add_n([0.0, *self.net.losses])  # as in training
        return self._logs(y, predictions, losses, total)

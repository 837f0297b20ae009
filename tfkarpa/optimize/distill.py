"""Knowledge distillation (Hinton et al. 2015): a student learns from labels and a teacher.

The loss is `alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)`, with
both distributions softened by the temperature T (the T^2 keeps the soft term's gradients on the
scale of the hard one). tfkarpa models end in softmax, so the logits are recovered as log
probabilities: a constant shift per example, which softmax ignores. `Distiller` is a
`keras.Model` only for its `train_step`; it predicts and evaluates exactly as its student, and
the fit loop exports the student alone.
The classify task loads the teacher (`tasks.classify.task.load_teacher`).
"""

from __future__ import annotations

import tensorflow as tf

_EPS = 1e-7


def soften(probabilities: tf.Tensor, temperature: float) -> tf.Tensor:
    logits = tf.math.log(tf.clip_by_value(tf.cast(probabilities, tf.float32), _EPS, 1.0))
    return tf.nn.softmax(logits / temperature, axis=-1)


class Distiller(tf.keras.Model):
    def __init__(self, student: tf.keras.Model, teacher: tf.keras.Model, temperature: float,
                 alpha: float):
        super().__init__(name=f"distill_{student.name}")
        self.student, self.teacher = student, teacher
        self.teacher.trainable = False
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.kl = tf.keras.losses.KLDivergence()

    def call(self, inputs, training=False):
        return self.student(inputs, training=training)

    def train_step(self, data):
        x, y = data
        soft_targets = soften(self.teacher(x, training=False), self.temperature)
        with tf.GradientTape() as tape:
            predictions = self.student(x, training=True)
            hard = self.compiled_loss(y, predictions, regularization_losses=self.student.losses)
            soft = self.kl(soft_targets, soften(predictions, self.temperature)) * self.temperature**2
            loss = self.alpha * hard + (1.0 - self.alpha) * soft
            scaled = self.optimizer.get_scaled_loss(loss) if hasattr(self.optimizer, "get_scaled_loss") else loss
        grads = tape.gradient(scaled, self.student.trainable_variables)
        if hasattr(self.optimizer, "get_unscaled_gradients"):
            grads = self.optimizer.get_unscaled_gradients(grads)
        self.optimizer.apply_gradients(zip(grads, self.student.trainable_variables))
        self.compiled_metrics.update_state(y, predictions)
        return {"loss": loss, "distill_loss": soft, **{m.name: m.result() for m in self.metrics
                                                         if m.name != "loss"}}

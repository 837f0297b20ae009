"""Knowledge distillation (Hinton et al. 2015): a student learns from labels and a teacher.

The loss is `alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(teacher_T || student_T)`, with
both distributions softened by the temperature T (the T^2 keeps the soft term's gradients on the
scale of the hard one). tfkarpa models end in softmax, so the logits are recovered as log
probabilities: a constant shift per example, which softmax ignores. `Distiller` is a
`keras.Model` only for its `train_step`; it predicts and evaluates exactly as its student, and
the fit loop exports the student alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from tfkarpa.errors import TfkarpaError

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


def load_teacher(run_dir: str, class_names: list[str], input_shape: tuple) -> tf.keras.Model:
    """The teacher run's model, frozen; its classes and input size must be the student's."""
    import yaml

    from tfkarpa import config as config_lib
    from tfkarpa.infer import load_run_model

    path = Path(run_dir)
    if not (path / "metrics.json").is_file() or not (path / "config.yaml").is_file():
        raise TfkarpaError(f"config key 'distill.teacher': '{run_dir}' is not a finished run")
    teacher_classes = json.loads((path / "manifest.json").read_text())["data"]["classes"]
    if teacher_classes != list(class_names):
        raise TfkarpaError(
            f"config key 'distill.teacher': the teacher predicts {len(teacher_classes)} classes "
            f"({', '.join(teacher_classes[:5])}...) but the student's data has "
            f"{len(class_names)} ({', '.join(class_names[:5])}...); they must match in order"
        )
    cfg = config_lib.build(base=yaml.safe_load((path / "config.yaml").read_text()))
    if cfg.data.image_size != input_shape[0]:
        raise TfkarpaError(f"config key 'distill.teacher': the teacher takes {cfg.data.image_size}"
                           f"-pixel images, the student {input_shape[0]}; set data.image_size to match")
    teacher = load_run_model(path, cfg, len(class_names))
    teacher.trainable = False
    return teacher

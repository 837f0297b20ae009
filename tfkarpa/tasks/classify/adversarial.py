"""Adversarial robustness for classifiers: attacks to measure it, adversarial training to gain it.

Both work under an L-inf budget `eps` given as a share of the pixel range (2/255 is two grey
levels); our models take pixels in [0, 255], so every radius and step here is in pixels.

- Measuring (`evaluate ... attack=fgsm|pgd`): IBM's Adversarial Robustness Toolbox (ART) makes
  the attacks, FGSM (Goodfellow et al. 2015) and PGD with a random start (Madry et al. 2018),
  on the run's Keras model. The attacked images are rounded to whole pixel values (what a real
  image is) within the budget, then given to the artifact being evaluated: the run itself, or
  its SavedModel or TFLite file (a transfer attack, made on the Keras model the file came from).
- Training (`adversarial.method`): the attack has to run inside `model.fit`'s compiled train
  step, where ART's NumPy attacks cannot go, so it is written here with tf.GradientTape:
  `pgd` trains on PGD examples (Madry), `trades` on the clean loss plus beta * KL(clean ||
  attacked) (Zhang et al. 2019), `fgsm` on one step of 1.25 eps from a random start (Wong et
  al. 2020). An attack measured by ART rather than by the code that trained against it also
  keeps the robust accuracy honest.
"""

from __future__ import annotations

import logging
import logging.config
import sys
import warnings

import numpy as np
import tensorflow as tf

from tfkarpa.config import parse_eps
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

ATTACKS = ("fgsm", "pgd")
PIXELS = 255.0
_EPS = 1e-7


def _cross_entropy(labels, probabilities):
    """Per-example cross-entropy of one-hot (or soft) labels against softmax outputs."""
    p = tf.clip_by_value(tf.cast(probabilities, tf.float32), _EPS, 1.0)
    return -tf.reduce_sum(tf.cast(labels, tf.float32) * tf.math.log(p), axis=-1)


def _kl(p, q):
    p = tf.clip_by_value(tf.cast(p, tf.float32), _EPS, 1.0)
    q = tf.clip_by_value(tf.cast(q, tf.float32), _EPS, 1.0)
    return tf.reduce_sum(p * (tf.math.log(p) - tf.math.log(q)), axis=-1)


def _project(adv, x, radius):
    return tf.clip_by_value(tf.clip_by_value(adv, x - radius, x + radius), 0.0, PIXELS)


def pgd(model, images, labels, radius: float, steps: int, step: float | None = None,
        random_start: bool = True, objective=None):
    """L-inf PGD in pixels: `steps` signed-gradient steps of `step` (default 2.5 * radius /
    steps) that raise `objective(adv_probabilities)` (default: the cross-entropy of `labels`),
    each projected back into the radius around `images` and into [0, 255]. The model runs in
    inference mode: BatchNorm statistics are not moved by the attack."""
    x = tf.cast(images, tf.float32)
    step = step if step is not None else 2.5 * radius / steps
    objective = objective or (lambda probs: _cross_entropy(labels, probs))
    adv = x + tf.random.uniform(tf.shape(x), -radius, radius) if random_start else x
    adv = _project(adv, x, radius)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(adv)
            loss = tf.reduce_sum(objective(model(adv, training=False)))
        adv = _project(adv + step * tf.sign(tape.gradient(loss, adv)), x, radius)
    return tf.stop_gradient(adv)


class AdversarialTrainer(tf.keras.Model):
    """Trains `net` against an L-inf attack; predicts and evaluates exactly as `net`, and the
    fit loop delivers `net` alone (as `optimize.distill.Distiller` does for distillation)."""

    def __init__(self, net: tf.keras.Model, method: str, eps: float, steps: int,
                 beta: float = 6.0):
        super().__init__(name=f"adversarial_{net.name}")
        self.net, self.method, self.beta = net, method, float(beta)
        self.radius, self.steps = eps * PIXELS, int(steps)

    def call(self, inputs, training=False):
        return self.net(inputs, training=training)

    def get_config(self):  # for Keras' summaries; the run saves `net`'s weights, never this
        return {"method": self.method, "radius": self.radius, "steps": self.steps,
                "beta": self.beta}

    def attack(self, x, y):
        if self.method == "fgsm":
            return pgd(self.net, x, y, self.radius, 1, step=1.25 * self.radius)
        if self.method == "trades":
            clean = tf.stop_gradient(self.net(x, training=False))
            start = tf.clip_by_value(x + 0.001 * PIXELS * tf.random.normal(tf.shape(x)), 0.0,
                                     PIXELS)
            return pgd(self.net, start, y, self.radius, self.steps, random_start=False,
                       objective=lambda probs: _kl(clean, probs))
        return pgd(self.net, x, y, self.radius, self.steps)

    def train_step(self, data):
        x, y = data
        x = tf.cast(x, tf.float32)
        adv = self.attack(x, y)
        with tf.GradientTape() as tape:
            if self.method == "trades":
                predictions = self.net(x, training=True)
                natural = self.compiled_loss(y, predictions,
                                             regularization_losses=self.net.losses)
                robust = tf.reduce_mean(_kl(predictions, self.net(adv, training=True)))
                loss = natural + self.beta * robust
            else:
                predictions = self.net(adv, training=True)
                loss = self.compiled_loss(y, predictions, regularization_losses=self.net.losses)
            scaled = (self.optimizer.get_scaled_loss(loss)
                      if hasattr(self.optimizer, "get_scaled_loss") else loss)
        grads = tape.gradient(scaled, self.net.trainable_variables)
        if hasattr(self.optimizer, "get_unscaled_gradients"):
            grads = self.optimizer.get_unscaled_gradients(grads)
        self.optimizer.apply_gradients(zip(grads, self.net.trainable_variables))
        # trades: accuracy on the clean batch; pgd, fgsm: on the attacked one it trained on
        self.compiled_metrics.update_state(y, predictions)
        return {"loss": loss, **{m.name: m.result() for m in self.metrics if m.name != "loss"}}


class RobustAccuracy(tf.keras.callbacks.Callback):
    """After every epoch: accuracy on a fixed set of validation images under a 10-step PGD
    attack, logged as `val_robust_accuracy` (history.csv, TensorBoard) before the loggers
    run."""

    def __init__(self, net: tf.keras.Model, images: np.ndarray, labels: np.ndarray, eps: float,
                 steps: int = 10, batch_size: int = 128):
        super().__init__()
        self.net, self.images, self.labels = net, images.astype(np.float32), labels
        self.radius, self.steps, self.batch_size = eps * PIXELS, steps, batch_size
        self._attack = tf.function(
            lambda x, y: tf.argmax(self.net(pgd(self.net, x, y, self.radius, self.steps),
                                            training=False), -1),
            reduce_retracing=True)

    def on_epoch_end(self, epoch, logs=None):
        hits = 0
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start:start + self.batch_size]
            y = self.labels[start:start + self.batch_size]
            predicted = self._attack(tf.constant(x), tf.constant(y, tf.float32)).numpy()
            hits += int(np.sum(predicted == y.argmax(-1)))
        if logs is not None:
            logs["val_robust_accuracy"] = hits / max(1, len(self.images))


def parse_attack(options: dict) -> dict | None:
    """`evaluate`'s attack options: attack=fgsm|pgd, eps=2/255, attack_steps=10."""
    name = options.get("attack", "")
    if not name:
        return None
    if name not in ATTACKS:
        raise TfkarpaError(f"evaluate option 'attack': '{name}' is not one of {', '.join(ATTACKS)}")
    steps = str(options.get("attack_steps", "10"))
    if not steps.isdigit() or int(steps) < 1:
        raise TfkarpaError(f"evaluate option 'attack_steps' must be a positive whole number, "
                           f"got '{steps}'")
    text = options.get("eps", "2/255")
    eps = parse_eps(text, "eps")
    if eps * PIXELS < 1:
        raise TfkarpaError(f"evaluate option 'eps': {text} is under one grey level (1/255); an "
                           "image of whole pixel values cannot change by less")
    return {"attack": name, "eps": text, "eps_value": eps,
            "steps": 1 if name == "fgsm" else int(steps)}


def attacked_predictions(predictor, source: tf.keras.Model, images_and_labels, num_classes: int,
                         attack: dict, batch_size: int) -> np.ndarray:
    """`predictor`'s probabilities on every batch of (float whole-valued images, labels)
    attacked on `source` (the predictor's own Keras model, or the run a file came from)."""
    maker = art_attack(source, num_classes, predictor.image_size, attack, batch_size)
    radius = attack["eps_value"] * PIXELS
    probs = []
    for images, labels in images_and_labels:
        clean = images.numpy().astype(np.float32)
        adversarial = maker.generate(clean, y=np.eye(num_classes, dtype=np.float32)[labels.numpy()])
        probs.append(predictor.predict(as_images(adversarial, clean, radius)))
    return np.concatenate(probs)


def _import_art() -> None:
    """Import ART without its side effects: its package import runs logging.config.dictConfig,
    which closes every logging handler the process already has (ours, pytest's), and warns
    about the PyTorch it does not find."""
    if "art" in sys.modules:
        return
    configure = logging.config.dictConfig
    logging.config.dictConfig = lambda _config: None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import art.attacks.evasion  # noqa: F401
            import art.estimators.classification  # noqa: F401
    finally:
        logging.config.dictConfig = configure
    logging.getLogger("art").addHandler(logging.NullHandler())  # what its config would add


def art_attack(model: tf.keras.Model, num_classes: int, image_size: int, attack: dict,
               batch_size: int):
    """ART's FGSM or PGD (one random start) on `model`, pixels in [0, 255]."""
    _import_art()
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import TensorFlowV2Classifier

    classifier = TensorFlowV2Classifier(
        model=lambda x, training=False: model(x, training=False), nb_classes=num_classes,
        input_shape=(image_size, image_size, 3), clip_values=(0.0, PIXELS),
        loss_object=tf.keras.losses.CategoricalCrossentropy())
    radius = attack["eps_value"] * PIXELS
    if attack["attack"] == "fgsm":
        return FastGradientMethod(classifier, norm=np.inf, eps=radius, batch_size=batch_size)
    return ProjectedGradientDescent(classifier, norm=np.inf, eps=radius,
                                    eps_step=2.5 * radius / attack["steps"],
                                    max_iter=attack["steps"], num_random_init=1,
                                    batch_size=batch_size, verbose=False)


def as_images(adversarial: np.ndarray, clean: np.ndarray, radius: float) -> np.ndarray:
    """Attacked images as real images: whole pixel values, still within `radius` of the clean
    (whole-valued) ones and in [0, 255]."""
    reach = np.floor(radius + 1e-6)
    rounded = np.clip(np.round(adversarial), clean - reach, clean + reach)
    return np.clip(rounded, 0, PIXELS).astype(np.uint8)

"""LARS (You et al. 2017), the optimizer SimCLR trains with at large batches.

Keras 2 has no LARS and TF Addons is deprecated, so it is written here on Keras' optimizer API
(about what tf-models-official carries). Each weight matrix gets its own step size: the learning
rate times a trust ratio `trust * ||w|| / ||g + wd * w||`, so layers with small gradients are not
starved and large ones do not blow up when the batch (and with it the learning rate) is large.
As in SimCLR, biases and normalisation parameters (every variable of rank <= 1) get neither
weight decay nor the trust ratio. Momentum is the heavy-ball form.
"""

from __future__ import annotations

import tensorflow as tf


class LARS(tf.keras.optimizers.Optimizer):
    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=1e-6, trust=0.001,
                 name="LARS", **kwargs):
        # Weight decay is applied here, inside the trust ratio, not by the base class.
        super().__init__(name=name, weight_decay=None, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.momentum = momentum
        self.lars_weight_decay = weight_decay
        self.trust = trust

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self.velocities = [self.add_variable_from_reference(model_variable=v, variable_name="v")
                           for v in var_list]
        self._built = True

    def update_step(self, gradient, variable):
        gradient = tf.convert_to_tensor(gradient)
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        velocity = self.velocities[self._index_dict[self._var_key(variable)]]
        if variable.shape.rank is not None and variable.shape.rank > 1:
            gradient = gradient + tf.cast(self.lars_weight_decay, dtype) * variable
            w_norm = tf.norm(variable)
            g_norm = tf.norm(gradient)
            ratio = tf.where((w_norm > 0) & (g_norm > 0),
                             tf.cast(self.trust, dtype) * w_norm / g_norm, tf.ones([], dtype))
            lr = lr * ratio
        velocity.assign(tf.cast(self.momentum, dtype) * velocity + lr * gradient)
        variable.assign_sub(velocity)

    def get_config(self):
        config = super().get_config()
        config.update({"learning_rate": self._serialize_hyperparameter(self._learning_rate),
                       "momentum": self.momentum, "weight_decay": self.lars_weight_decay,
                       "trust": self.trust})
        return config

"""tf.distribute strategy from a name. Everything that creates variables runs in its scope.

Kept small on purpose: `default`, `one_device` and `mirrored` over whatever devices TensorFlow
sees. The scale-out work (multi-worker, TPU, `auto`) extends this one function.
"""

from __future__ import annotations

import tensorflow as tf

from tfkarpa.errors import TfkarpaError


def get_strategy(name: str) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    raise TfkarpaError(f"config key 'strategy': unknown strategy '{name}' "
                       "(choose default, one_device or mirrored)")

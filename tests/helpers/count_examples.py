"""One worker of a two-worker group: for each SOURCE given, fit two epochs through tfkarpa's
pipeline and print one JSON line with how many examples the whole group saw per epoch (a metric
summed over replicas). Run by tests/test_multi_worker.py with TF_CONFIG set; one process pair
counts every source, since each TensorFlow start costs about 10 s."""

import json
import sys

import tfkarpa  # noqa: F401  (Keras 2 before TensorFlow)
import tensorflow as tf

from tfkarpa import config, distribute
from tfkarpa.data import pipeline, sources

placement = distribute.resolve("multi_worker", timeout=60)


class Examples(tf.keras.metrics.Metric):
    def __init__(self):
        super().__init__(name="examples")
        self.n = self.add_weight("n", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.n.assign_add(tf.cast(tf.shape(y_true)[0], tf.float32))

    def result(self):
        return self.n


for source in sys.argv[1:]:
    # data.image_size: digits' own 8 px (a pipeline built directly has no auto step to choose it)
    cfg = config.build([], [f"data.source={source}", "batch_size=64", "data.image_size=8"])
    data = sources.load(cfg.data, cfg.seed)
    ds = pipeline.make_dataset(data.splits["train"], cfg, data.num_classes, training=True,
                               workers=placement.workers)
    with placement.strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input(ds.element_spec[0].shape[1:]),
                                     tf.keras.layers.GlobalAveragePooling2D(),
                                     tf.keras.layers.Dense(data.num_classes, activation="softmax")])
        model.compile("sgd", "categorical_crossentropy", metrics=[Examples()])
    history = model.fit(ds, epochs=2, verbose=0)
    print(json.dumps({"source": source, "examples": history.history["examples"],
                      "train_split": data.splits["train"].num_examples}), flush=True)

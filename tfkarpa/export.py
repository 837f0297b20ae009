"""Export a trained classifier as a SavedModel that serves raw images, and check it.

The SavedModel needs TensorFlow only: the resize to the model's input size and the model's own
rescaling are inside it. Two signatures:
- `serving_default`: `images`, uint8 [batch, height, width, 3] of any size;
- `serve_bytes`: `image_bytes`, string [batch] of encoded JPEG/PNG/BMP/GIF files.
Both return `probabilities` [batch, classes], `class_id` [batch], `class_name` [batch] and
`score` [batch] (the top-1 probability). Beside the graph, `tfkarpa.json` records the class
names, input size and the data config it was trained on (so `evaluate` can find the test split),
and `labels.txt` lists the class names one per line for non-TensorFlow consumers.

Every export is checked before it is moved into place: the reloaded SavedModel and the Keras
model must agree on validation images (maximum absolute difference of probabilities and top-1
agreement are recorded in tfkarpa.json); otherwise the export fails and nothing is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.data.pipeline import resize_uint8
from tfkarpa.errors import TfkarpaError
from tfkarpa.runs import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "tfkarpa-saved-model/1"
PARITY_MAX_ABS = 1e-4
PARITY_MIN_AGREEMENT = 1.0


class _Serving(tf.Module):
    def __init__(self, model: tf.keras.Model, class_names: list[str], image_size: int):
        super().__init__()
        self.model = model
        self.class_names = tf.constant(class_names)
        self.image_size = image_size

    def _outputs(self, images):
        probabilities = self.model(tf.cast(resize_uint8(images, self.image_size), tf.float32),
                                   training=False)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {
            "probabilities": probabilities,
            "class_id": class_id,
            "class_name": tf.gather(self.class_names, class_id),
            "score": tf.reduce_max(probabilities, axis=-1),
        }

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(self, images):
        return self._outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
            return resize_uint8(image, self.image_size)

        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
            [self.image_size, self.image_size, 3], tf.uint8))
        return self._outputs(images)


def parity(model: tf.keras.Model, serving_fn, images: np.ndarray) -> dict:
    """Compare the Keras model with an exported signature on the same uint8 images."""
    expected = model(tf.cast(images, tf.float32), training=False).numpy()
    got = serving_fn(images=tf.constant(images))["probabilities"].numpy()
    return {
        "images": int(len(images)),
        "max_abs_diff": float(np.max(np.abs(expected - got))) if len(images) else 0.0,
        "top1_agreement": float(np.mean(expected.argmax(-1) == got.argmax(-1))) if len(images) else 1.0,
    }


def export_saved_model(model: tf.keras.Model, class_names: list[str], image_size: int,
                       path: str | Path, check_images: np.ndarray, metadata: dict | None = None) -> dict:
    """Write a checked SavedModel to `path` (atomically); returns the parity figures."""
    path = Path(path)
    module = _Serving(model, list(class_names), image_size)
    with atomic_dir(path) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={
            "serving_default": module.serve_images,
            "serve_bytes": module.serve_bytes,
        })
        loaded = tf.saved_model.load(str(tmp))
        figures = parity(model, loaded.signatures["serving_default"], check_images)
        if figures["max_abs_diff"] > PARITY_MAX_ABS or figures["top1_agreement"] < PARITY_MIN_AGREEMENT:
            raise TfkarpaError(
                f"export to '{path}' failed its parity check against the Keras model on "
                f"{figures['images']} images: max |diff| {figures['max_abs_diff']:.2e} "
                f"(limit {PARITY_MAX_ABS:.0e}), top-1 agreement {figures['top1_agreement']:.3f}; "
                "nothing was written"
            )
        info = {"format": FORMAT, "task": "classify", "class_names": list(class_names),
                "image_size": image_size, "parity": figures, **(metadata or {})}
        (tmp / "tfkarpa.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "labels.txt").write_text("\n".join(class_names) + "\n")
    log.info("exported SavedModel to %s (parity: max |diff| %.1e, top-1 agreement %.3f)", path,
             figures["max_abs_diff"], figures["top1_agreement"])
    return figures

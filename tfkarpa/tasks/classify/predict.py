"""Classifier predictors for each artifact kind, and top-k predictions for image files.

Every classifier predictor takes uint8 images at its input size and returns class
probabilities, through its own runtime: the run's Keras model, the SavedModel's serving
signature, the TFLite file in the LiteRT interpreter or the ONNX file in onnxruntime.
`evaluate` and `predict` use this, so both work the same on a run and on its exports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import optimize, runs
from tfkarpa.core.artifacts import Artifact, image_files, read_image
from tfkarpa.core.task import Predictor as BasePredictor
from tfkarpa.errors import TfkarpaError
from tfkarpa.models import build_classifier, load_weights
from tfkarpa.tasks.classify import ensemble
from tfkarpa.core.formats import converted_format
from tfkarpa.tasks.classify.serving import LiteRTRunner, converted_runner


class Predictor(BasePredictor):
    """Class probabilities [batch, classes] for uint8 images [batch, S, S, 3]."""

    task = "classify"

    def __init__(self, kind: str, path, class_names: list[str], image_size: int,
                 config: config_lib.Config, fn: Callable[[tf.Tensor], tf.Tensor],
                 model: tf.keras.Model | None = None, content: bytes | None = None):
        super().__init__(kind, path, class_names, image_size, config, model)
        self._fn, self.content = fn, content
        self.meta: dict = {}  # an export's tfkarpa metadata (its run_dir, ...)

    def predict(self, images_uint8) -> np.ndarray:
        out = self._fn(tf.convert_to_tensor(images_uint8, tf.uint8))
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out)

    def timed(self, threads: int | None):
        if self.kind == "tflite" and threads:
            return LiteRTRunner(self.content, num_threads=threads)
        fmt = converted_format(self.kind)  # ONNX
        if fmt and threads:
            return converted_runner(fmt, self.content, self.meta, threads, str(self.path))
        return self.predict


def load_run_model(run_dir: Path, cfg: config_lib.Config, num_classes: int) -> tf.keras.Model:
    """Rebuild a run's model from its config and load its weights: the final (stripped) weights
    of a finished run, else the best or last checkpoint of an unfinished one."""
    if cfg.ensemble.members:
        return ensemble.load(run_dir, cfg, num_classes)
    weights = runs.weights_file(run_dir)
    if weights.name != "final.weights.h5" and cfg.stages:
        raise TfkarpaError(f"compression run '{run_dir}' did not finish; re-run its compress "
                           "command to resume it")
    model_cfg = config_lib.ModelConfig(**{**config_lib.to_dict(cfg)["model"], "weights": ""})
    model = build_classifier(model_cfg, (cfg.data.image_size, cfg.data.image_size, 3), num_classes)
    model = optimize.rebuild(model, cfg.stages)
    load_weights(model, weights, about=f"run '{run_dir}'")
    return model


def load_predictor(artifact: Artifact) -> Predictor:
    """The predictor of an opened run, SavedModel, TFLite file or file converted from one."""
    a = artifact
    if a.kind == "keras":
        model = load_run_model(a.path, a.config, len(a.class_names))
        fn = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False),
                         reduce_retracing=True)
        return Predictor("keras", a.path, a.class_names, a.image_size, a.config, fn, model)
    if a.kind == "saved_model":
        signature = a.loaded.signatures["serving_default"]
        predictor = Predictor("saved_model", a.path, a.class_names, a.image_size, a.config,
                              lambda x: signature(images=x)["probabilities"])
    elif converted_format(a.kind):  # converted from the TFLite graph (ONNX)
        runner = converted_runner(converted_format(a.kind), a.content, a.meta, where=str(a.path))
        predictor = Predictor(a.kind, a.path, a.class_names, a.image_size, a.config,
                              lambda x: tf.constant(runner(x.numpy())), content=a.content)
    else:
        try:
            runner = LiteRTRunner(a.content)
        except Exception as err:  # the interpreter raises many types on garbage
            raise TfkarpaError(f"'{a.path}' is not a valid TFLite model: {err}") from None
        predictor = Predictor("tflite", a.path, a.class_names, a.image_size, a.config,
                              lambda x: tf.constant(runner(x.numpy())), content=a.content)
    predictor.meta = dict(a.meta)
    return predictor


def predict_files(predictor: Predictor, inputs: list[str], top_k: int = 5,
                  batch_size: int = 64) -> list[dict]:
    """Top-k labels with scores for each image file (folders are searched recursively)."""
    files = image_files(inputs)
    k = min(top_k, len(predictor.class_names))
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = np.stack([read_image(f, predictor.image_size) for f in chunk])
        probs = predictor.predict(batch)
        for f, p in zip(chunk, probs):
            order = np.argsort(-p)[:k]
            results.append({"image": str(f), "top_k": [
                {"label": predictor.class_names[i], "class_id": int(i), "score": float(p[i])}
                for i in order]})
    return results

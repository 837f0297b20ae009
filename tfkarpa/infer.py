"""Load something that predicts (a run directory or an exported SavedModel) and run it.

`load_predictor(path)` hides what kind of artifact it was given (a run directory, a SavedModel
or a .tflite file run by LiteRT): every predictor takes uint8
images at its input size and returns class probabilities, and knows its class names and the
data config it was trained on. `evaluate` and `predict` use this, so both work the same on a
run and on its export (and later kinds of artifact only add a loader here). Detection runs and
their exports (task "detect" in the config or metadata) load as `detection.DetectionPredictor`,
which returns boxes instead of probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
import yaml

from tfkarpa import config as config_lib
from tfkarpa.errors import TfkarpaError


@dataclass
class Predictor:
    kind: str  # "keras" | "saved_model" | "tflite"
    path: Path
    class_names: list[str]
    image_size: int
    config: config_lib.Config  # what the model was trained with: data source, seed, splits
    _fn: Callable[[tf.Tensor], tf.Tensor]
    model: tf.keras.Model | None = None

    def predict(self, images_uint8) -> np.ndarray:
        out = self._fn(tf.convert_to_tensor(images_uint8, tf.uint8))
        return out.numpy() if hasattr(out, "numpy") else np.asarray(out)


def load_run_model(run_dir: Path, cfg: config_lib.Config, num_classes: int) -> tf.keras.Model:
    """Rebuild a run's model from its config and load its weights: the final (stripped) weights
    of a finished run, else the best or last checkpoint of an unfinished one."""
    from tfkarpa import optimize
    from tfkarpa.models import build_classifier

    checkpoints = run_dir / "checkpoints"
    for name in ("final.weights.h5", "best.weights.h5", "last.weights.h5"):
        if (checkpoints / name).exists():
            weights = checkpoints / name
            break
    else:
        raise TfkarpaError(f"run '{run_dir}' has no checkpoint yet (checkpoints/*.weights.h5); "
                           "train it first")
    if weights.name != "final.weights.h5" and cfg.stages:
        raise TfkarpaError(f"compression run '{run_dir}' did not finish; re-run its compress "
                           "command to resume it")
    model_cfg = config_lib.ModelConfig(**{**config_lib.to_dict(cfg)["model"], "weights": ""})
    model = build_classifier(model_cfg, (cfg.data.image_size, cfg.data.image_size, 3), num_classes)
    model = optimize.rebuild(model, cfg.stages)
    model.load_weights(str(weights))
    return model


def load_predictor(path: str | Path, overrides: list[str] = ()) -> Predictor:
    path = Path(path)
    if path.suffix == ".tflite":
        return _load_tflite(path, overrides)
    if (path / "config.yaml").is_file():
        return _load_run(path, overrides)
    if (path / "saved_model.pb").is_file():
        return _load_saved_model(path, overrides)
    if not path.exists():
        raise TfkarpaError(f"'{path}' does not exist")
    raise TfkarpaError(f"'{path}' is neither a run directory (config.yaml) nor a SavedModel "
                       "(saved_model.pb)")


def _load_run(run_dir: Path, overrides) -> Predictor:
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg = config_lib.build(base=stored, overrides=overrides)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise TfkarpaError(f"run '{run_dir}' has no manifest.json: it did not get past its start")
    class_names = json.loads(manifest_path.read_text())["data"]["classes"]
    if cfg.task == "detect":
        from tfkarpa import detection

        return detection.run_predictor(run_dir, cfg, class_names)
    model = load_run_model(run_dir, cfg, len(class_names))
    fn = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), reduce_retracing=True)
    return Predictor("keras", run_dir, class_names, cfg.data.image_size, cfg, fn, model)


def _config_from_metadata(meta: dict, overrides) -> config_lib.Config:
    """The config an exported file was trained with, as far as its metadata records it."""
    base = {"data": meta.get("data", {}), "seed": meta.get("seed", 0),
            "stages": meta.get("stages", [])}
    if meta.get("task") == "detect":
        base.update({"task": "detect", "detect": meta.get("detect", {})})
    return config_lib.build(base=base, overrides=overrides)


def _load_saved_model(path: Path, overrides) -> Predictor:
    meta_path = path / "tfkarpa.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as err:
        raise TfkarpaError(f"'{path}' is not a loadable SavedModel: {err}") from None
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise TfkarpaError(f"SavedModel '{path}' has no serving_default signature")
    if "class_names" in meta:
        class_names, size = meta["class_names"], int(meta["image_size"])
    else:
        raise TfkarpaError(f"SavedModel '{path}' was not exported by tfkarpa (no tfkarpa.json); "
                           "it needs class names and an input size")
    cfg = _config_from_metadata(meta, overrides)
    if meta.get("task") == "detect":
        from tfkarpa import detection

        return detection.saved_model_predictor(path, loaded, meta, cfg)
    return Predictor("saved_model", path, class_names, size, cfg,
                     lambda x: signature(images=x)["probabilities"])


def _load_tflite(path: Path, overrides) -> Predictor:
    from tfkarpa.export import LiteRTRunner, read_metadata

    if not path.is_file():
        raise TfkarpaError(f"'{path}' does not exist")
    content = path.read_bytes()
    try:
        meta = read_metadata(content)
        if meta.get("task") == "detect":
            from tfkarpa import detection

            cfg = _config_from_metadata(meta, overrides)
            return detection.tflite_predictor(path, content, meta, cfg)
        runner = LiteRTRunner(content)
    except TfkarpaError:
        raise
    except Exception as err:  # the flatbuffer and interpreter raise many types on garbage
        raise TfkarpaError(f"'{path}' is not a valid TFLite model: {err}") from None
    if "class_names" not in meta:
        raise TfkarpaError(f"TFLite file '{path}' was not exported by tfkarpa (no class names "
                           "in its metadata)")
    cfg = _config_from_metadata(meta, overrides)
    return Predictor("tflite", path, meta["class_names"], int(meta["image_size"]), cfg,
                     lambda x: tf.constant(runner(x.numpy())))


def read_image(path: Path, size: int) -> np.ndarray:
    """Decode one file as the exported model would, at `size`; errors name the file."""
    from tfkarpa.data.pipeline import resize_uint8

    return resize_uint8(tf.constant(decode_file(path)), size).numpy()


def _refuse_huge(path: Path, data: bytes) -> None:
    """Read only the header: an image claiming billions of pixels would exhaust memory in
    TensorFlow's decoder before any error could be raised. PIL's limit is the judge."""
    import io

    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).close()  # checks the size in the header against the limit
    except Image.DecompressionBombError as err:
        raise TfkarpaError(f"image '{path}' is too large to decode safely: {err}") from None
    except Exception:  # noqa: BLE001  (not an image PIL knows: TensorFlow's decoder says why)
        return


def decode_file(path: Path) -> np.ndarray:
    """One image file as uint8 [H, W, 3]; errors name the file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TfkarpaError(f"cannot read image '{path}': {err.strerror}") from None
    if not data:
        raise TfkarpaError(f"image '{path}' is empty (0 bytes)")
    _refuse_huge(path, data)
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as err:
        raise TfkarpaError(f"'{path}' is not an image TensorFlow can decode (JPEG, PNG, BMP, GIF): "
                           f"{err.message.splitlines()[0]}") from None
    return image.numpy()


def image_files(inputs: list[str]) -> list[Path]:
    from tfkarpa.data.sources import IMAGE_SUFFIXES

    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise TfkarpaError(f"folder '{p}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TfkarpaError(f"'{p}' does not exist")
    return files


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

"""Open what a user points at: a run directory, an exported SavedModel, a .tflite or .onnx file.

`open_artifact(path)` says what kind of artifact it is, which task made it, and what it was
trained with (the run's config.yaml, or the config recorded in an export's metadata), and loads
the SavedModel or reads the TFLite bytes once. The task named there turns it into a predictor
(`Task.load_predictor`); `tasks.load_predictor(path)` does both. Decoding image files the way
exports do (`decode_file`, `read_image`) and finding them in folders (`image_files`) is here too,
for every task's `predict`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import runs
from tfkarpa.core import formats
from tfkarpa.data.sources import IMAGE_SUFFIXES
from tfkarpa.errors import TfkarpaError

KINDS = ("keras", *formats.FORMATS)  # a run's Keras weights, or a file of a registered format


@dataclasses.dataclass
class Artifact:
    """An opened artifact: enough for its task to build a predictor."""

    kind: str  # one of KINDS
    path: Path
    task: str
    config: config_lib.Config  # what it was trained with: data source, seed, splits, ...
    class_names: list[str]
    image_size: int
    meta: dict = dataclasses.field(default_factory=dict)  # an export's tfkarpa metadata
    loaded: object = None  # the loaded SavedModel
    content: bytes | None = None  # a single-file format's bytes (.tflite, .onnx)


def open_artifact(path: str | Path, overrides: list[str] = ()) -> Artifact:
    """What `path` is; `overrides` (key=value) adjust the config it was trained with."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        return _open_run(path, overrides)
    fmt = formats.find(path)
    if fmt is not None:
        return _from_metadata(fmt, path, overrides, **fmt.read(path))
    if not path.exists():
        raise TfkarpaError(f"'{path}' does not exist")
    suffixes = ", ".join(formats.edge_suffixes())
    raise TfkarpaError(f"'{path}' is neither a run directory (config.yaml), a SavedModel "
                       f"(saved_model.pb) nor an exported file ({suffixes})")


def _open_run(run_dir: Path, overrides) -> Artifact:
    cfg = runs.read_config(run_dir, overrides)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise TfkarpaError(f"run '{run_dir}' has no manifest.json: it did not get past its start")
    class_names = json.loads(manifest_path.read_text())["data"]["classes"]
    return Artifact("keras", run_dir, cfg.task, cfg, class_names, cfg.data.image_size)


def config_from_metadata(meta: dict, overrides=()) -> config_lib.Config:
    """The config an exported file was trained with, as far as its metadata records it: every
    config key it stored (task, data, seed, stages, model and the task's sections: see
    `export.artifact_metadata`)."""
    keys = {f.name for f in dataclasses.fields(config_lib.Config)}
    return config_lib.build(base={k: v for k, v in meta.items() if k in keys},
                            overrides=overrides)


def _from_metadata(fmt: formats.Format, path: Path, overrides, meta: dict,
                   **loaded) -> Artifact:
    if "class_names" not in meta:
        raise TfkarpaError(f"{fmt.label} '{path}' was not exported by tfkarpa (no class names in "
                           "its metadata); it needs class names and an input size")
    cfg = config_from_metadata(meta, overrides)
    return Artifact(fmt.name, path, cfg.task, cfg, list(meta["class_names"]),
                    int(meta["image_size"]), meta, **loaded)


# ------------------------------------------------------------------------------ image files

def read_image(path: Path, size: int) -> np.ndarray:
    """Decode one file as the exported model would, at `size`; errors name the file."""
    from tfkarpa.data.pipeline import resize_uint8

    return resize_uint8(tf.constant(decode_file(path)), size).numpy()


def _refuse_huge(path: Path, data: bytes) -> None:
    """Read only the header: an image claiming billions of pixels would exhaust memory in
    TensorFlow's decoder before any error could be raised. PIL's limit is the judge."""
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
    """The image files named, and those under the folders named (recursively), in order."""
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


def run_task(run_dir: str | Path) -> str:
    """The task a run directory was trained for (from its config.yaml)."""
    return runs.read_config(run_dir).task

"""Writing exports, whatever the task: checked SavedModels, TFLite and ONNX files with metadata.

Every export is checked before it is moved into place, and a failed check leaves nothing
behind: `write_saved_model` saves the serving module into a temporary sibling, reloads it, runs
the task's check on the reloaded copy (the parity gate: the check raises to refuse) and only
then writes `tfkarpa.json` (class names, input size, the training config it needs to be
evaluated on its own, the check's figures) and `labels.txt`, and renames the folder into place.
A TFLite file carries the same metadata as JSON in the flatbuffer's metadata table
(`embed_metadata`, `read_metadata`). `export_run` validates the request, asks the run's task to
write its files, and records each one in the run's `exports.json`, where reports find them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import tensorflow as tf

from tfkarpa import config as config_lib
from tfkarpa import runs
from tfkarpa.core import formats as registry
from tfkarpa.data.pipeline import resize_uint8
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

# The TFLite metadata table's reader and writer, where callers have always found them.
embed_metadata = registry.embed_tflite_metadata
read_metadata = registry.read_tflite_metadata


def artifact_metadata(run_dir, cfg: config_lib.Config, sections: tuple[str, ...] = ()) -> dict:
    """What every exported file records about its run, so it can be evaluated on its own: the
    task, data, seed, model, stages, and the config `sections` its task needs to load it."""
    as_dict = config_lib.to_dict(cfg)
    return {"run_dir": str(run_dir), "task": cfg.task, "data": as_dict["data"], "seed": cfg.seed,
            "model": as_dict["model"], "stages": list(cfg.stages),
            **{name: as_dict[name] for name in sections}}


class ResizedImageServing(tf.Module):
    """The two signatures of a model that takes its images resized to one square side (no
    letterbox): `serve_images` on uint8 images of any size and `serve_bytes` on encoded
    JPEG/PNG/BMP/GIF files, both resized with the pipeline's own `resize_uint8` and handed to
    the subclass's `outputs(images)` (uint8 [batch, S, S, 3] -> named tensors)."""

    def __init__(self, image_size: int):
        super().__init__()
        self.image_size = image_size

    def outputs(self, images):
        raise NotImplementedError

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_images(self, images):
        return self.outputs(resize_uint8(images, self.image_size))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(self, image_bytes):
        def decode(data):
            image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
            return resize_uint8(image, self.image_size)

        images = tf.map_fn(decode, image_bytes, fn_output_signature=tf.TensorSpec(
            [self.image_size, self.image_size, 3], tf.uint8))
        return self.outputs(images)


def write_saved_model(path: str | Path, module: tf.Module,
                      check: Callable[[object, Path], dict], info: dict,
                      class_names: list[str]) -> dict:
    """Save `module`, check the reloaded copy, write its metadata, move it into place.

    Every tfkarpa SavedModel takes raw images and encoded files: `module` has the tf.functions
    `serve_images` (the `serving_default` signature, uint8 images of any size) and
    `serve_bytes` (encoded JPEG/PNG/BMP/GIF files). `check(loaded, tmp_dir)` returns figures to
    merge into `info` (tfkarpa.json), or raises TfkarpaError to refuse the export. Returns the
    merged info."""
    path = Path(path)
    signatures = {"serving_default": module.serve_images, "serve_bytes": module.serve_bytes}
    with runs.atomic_dir(path, "saved_model", "SavedModel folder") as tmp:
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        info = {**info, **check(tf.saved_model.load(str(tmp)), tmp)}
        (tmp / "tfkarpa.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
        (tmp / "labels.txt").write_text(labels_text(class_names))
    return info


def labels_text(class_names) -> str:
    """labels.txt: exactly one line per class, or a TfkarpaError naming the class that would
    break it (sources refuse such names when they load; this guards every other way in)."""
    from tfkarpa.data.splits import check_class_names

    check_class_names(class_names, "labels.txt")
    return "".join(f"{name}\n" for name in class_names)


def write_tflite(path: str | Path, content: bytes, info: dict) -> None:
    """The converted, already checked file with its metadata embedded, written atomically."""
    registry.FORMATS["tflite"].write(Path(path), content, info)


def write_converted(fmt: registry.Format, tflite: bytes, path: str | Path, info: dict,
                    check: Callable[[Callable, str], dict], figures_key: str = "parity") -> dict:
    """Write a format converted from a checked TFLite graph (`fmt.source == "tflite"`: ONNX)
    through the task's gate, the same way whatever the format: convert `tflite`, open the result
    in the format's runtime, `check(runner, where)` returns the figures or raises TfkarpaError
    to refuse (nothing written), then the file is written atomically with `info`, what the
    format keeps to run it, and the figures under `figures_key`. Returns the figures."""
    path = Path(path)
    content, keep = fmt.convert(tflite, str(path))
    what = f"{fmt.title} export '{path}' ({info.get('quantize', '-')})"
    figures = check(fmt.runner(content, keep, 2, str(path)), what)
    fmt.write(path, content, {**info, "format": f"tfkarpa-{fmt.name}/1", **keep,
                              figures_key: figures})
    log.info("exported %s (%s) to %s, %d bytes", fmt.label, info.get("quantize", "-"), path,
             path.stat().st_size)
    return figures


def artifact_files(path: Path) -> list[Path]:
    """The files that make up an artifact: a file, or a SavedModel's graph, variables, assets
    (not reports someone wrote into its folder)."""
    path = Path(path)
    if path.is_file():
        return [path]
    parts = [path / "saved_model.pb", *(path / "variables").rglob("*"), *(path / "assets").rglob("*")]
    return sorted(p for p in parts if p.is_file())


def artifact_size(path: Path) -> int:
    """Bytes on disk of a file, or of a SavedModel's graph, variables and assets."""
    return sum(p.stat().st_size for p in artifact_files(path))


def export_run(run_dir: str | Path, task, formats=("saved_model",), quantize=(),
               out_dir: str | Path | None = None, representative: int = 256, check: int = 64,
               per_channel: bool = True) -> dict:
    """Export a finished run of `task` in each format and TFLite mode (default: the task's
    `default_quantize`); every file checks itself first, then goes into `exports.json`.

    SavedModel goes to `<out_dir>/<run name>/`, TFLite to `<out_dir>/<run name>.<mode>.tflite`;
    `out_dir` defaults to `saved_models`. Returns the task's {"artifacts", "checks", "metrics"}.
    """
    known = registry.FORMATS  # the registry, read at call time: a format added to it is known
    unknown = [f for f in formats if f not in known]
    if unknown:
        raise TfkarpaError(f"unknown export format '{unknown[0]}' (choose {', '.join(known)})")
    offered = registry.offered(task.formats)
    missing = [f for f in formats if f not in offered]
    if missing:
        writes = f"it writes {', '.join(offered)}" if offered else "its runs are not exported"
        raise TfkarpaError(f"task={task.name} does not export to {missing[0]} ({writes})")
    if representative < 1 or check < 1:
        raise TfkarpaError("representative and check must be at least 1 image")
    if not (Path(run_dir) / "config.yaml").is_file():
        what = "exists" if Path(run_dir).exists() else "does not exist"
        raise TfkarpaError(f"'{run_dir}' is not a run directory (it {what}, with no config.yaml): "
                           "export needs the trained run")
    out = Path(out_dir or "saved_models")
    runs.ensure_writable(out, "export out")
    result = task.export(Path(run_dir), tuple(formats), tuple(quantize or task.default_quantize),
                         out, representative, check, per_channel)
    record_exports(run_dir, result["artifacts"], result["checks"])
    return result


def tflite_files(out: Path, name: str, quantize, per_channel: bool, representative: int,
                 suffix: str = ".tflite"):
    """(mode, tag, path, representative images used) for each TFLite file of an export (or
    each ONNX file, `suffix=".onnx"`: one per TFLite mode, converted from it): the file is
    `<out>/<name>.<tag><suffix>`, the tag `<mode>-per-tensor` for int8 modes with
    `per_channel=False`; only int8 modes calibrate."""
    for mode in quantize:
        int8 = mode in ("int8", "int8_full")
        tag = f"{mode}-per-tensor" if int8 and not per_channel else mode
        yield mode, tag, Path(out) / f"{name}.{tag}{suffix}", representative if int8 else 0


def parity_metrics(checks: dict) -> dict:
    """The headline parity figures of each written file (`<file>_max_abs_diff`,
    `<file>_top1_agreement`) from the checks' figures, for a command's summary."""
    metrics = {}
    for key, fig in checks.items():
        metrics[f"{key}_max_abs_diff"] = fig["max_abs_diff"]
        metrics[f"{key}_top1_agreement"] = fig["top1_agreement"]
    return metrics


def record_exports(run_dir: str | Path, artifacts: dict, checks: dict) -> None:
    """Add each written file and its check figures to the run's `exports.json` (newest export
    of a name wins), so reports and listings know every artifact a run has produced."""
    record = Path(run_dir) / "exports.json"
    known = runs.read_json(record)
    for name, path in artifacts.items():
        known[name] = {"path": str(path), "size_bytes": artifact_size(Path(path)),
                       "check": checks.get(name, {})}
    runs.atomic_write_json(record, known)

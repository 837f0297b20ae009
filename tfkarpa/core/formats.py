"""Export formats as objects, registered in one dict: what a path of the format is, how it
opens, how it is written with its metadata, and for the formats converted from a task's checked
TFLite graph (ONNX), how the conversion runs and how the converted file is run.

`FORMATS` maps each format's name (also the artifact kind a predictor reports) to its object.
The core and the tasks look formats up here: `open_artifact` asks each format whether it claims
a path, `benchmark` finds and times every edge file by its format's suffix, and a task's export
writes every format converted from TFLite with `core.export.write_converted`, the same gate for
each (the task's check on the converted file, run by the format's own runner).

Adding a format: a `Format` subclass and one line in `FORMATS`. A format converted from the
TFLite graph (`source = "tflite"`) defines `convert` and `runner` and is then offered by every
task that exports TFLite; any other kind of format also needs its writer in the tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tfkarpa import runs
from tfkarpa.errors import TfkarpaError

METADATA_NAME = "tfkarpa"  # where a file's metadata is kept (TFLite table entry, ONNX prop)


class Format:
    """One artifact format. `read(path)` returns {"meta", "loaded", "content"} for
    `core.artifacts` to build an `Artifact` from; `write(path, content, info)` stores a checked
    file with its metadata, atomically."""

    name = ""
    title = ""  # in messages: "TFLite"
    label = ""  # in messages: "TFLite file"
    suffix = ""  # a single file's suffix; "" for a folder format
    edge = False  # a single file timed at 1 and 2 threads by `benchmark`
    source: str | None = None  # the format it is converted from ("tflite"), if any

    def claims(self, path: Path) -> bool:
        return bool(self.suffix) and path.suffix == self.suffix

    def file(self, out: Path, name: str, tag: str) -> Path:
        """Where an export of run `name` in mode `tag` goes."""
        return Path(out) / f"{name}.{tag}{self.suffix}"

    def read(self, path: Path) -> dict:
        raise NotImplementedError

    def write(self, path: Path, content: bytes, info: dict) -> None:
        raise NotImplementedError

    # Formats converted from the TFLite graph (source == "tflite") also define:
    def convert(self, tflite: bytes, where: str) -> tuple[bytes, dict]:
        """The converted bytes of a TFLite graph and what its metadata must keep to run it like
        the TFLite file (e.g. the interface's names and quantization), or a TfkarpaError naming
        what does not convert."""
        raise NotImplementedError

    def runner(self, content: bytes, meta: dict, num_threads: int | None, where: str):
        """A callable: one batch as the TFLite graph takes it (uint8 images) -> {the TFLite
        signature's output name: float array}."""
        raise NotImplementedError

    def _read_file(self, path: Path) -> bytes:
        if not path.is_file():
            raise TfkarpaError(f"'{path}' does not exist")
        return path.read_bytes()


class SavedModel(Format):
    name, title, label = "saved_model", "SavedModel", "SavedModel"

    def claims(self, path: Path) -> bool:
        return (path / "saved_model.pb").is_file()

    def file(self, out: Path, name: str, tag: str = "") -> Path:
        return Path(out) / name

    def read(self, path: Path) -> dict:
        import tensorflow as tf

        meta = runs.read_json(path / "tfkarpa.json")
        try:
            loaded = tf.saved_model.load(str(path))
        except (OSError, ValueError, IndexError, tf.errors.OpError) as err:
            # A truncated variables file raises IndexError ("Read less bytes than requested").
            text = str(err).strip()
            first = text.splitlines()[0][:200] if text else type(err).__name__
            raise TfkarpaError(f"'{path}' is not a loadable SavedModel (damaged or incomplete: "
                               f"{first}); export it again from its run") from err
        if loaded.signatures.get("serving_default") is None:
            raise TfkarpaError(f"SavedModel '{path}' has no serving_default signature")
        return {"meta": meta, "loaded": loaded}


class TFLite(Format):
    name, title, label, suffix, edge = "tflite", "TFLite", "TFLite file", ".tflite", True

    def read(self, path: Path) -> dict:
        content = self._read_file(path)
        try:
            meta = read_tflite_metadata(content)
        except Exception as err:  # the flatbuffer raises many types on garbage
            raise TfkarpaError(f"'{path}' is not a valid TFLite model: {err}") from None
        return {"meta": meta, "content": content}

    def write(self, path: Path, content: bytes, info: dict) -> None:
        runs.atomic_write_bytes(Path(path), embed_tflite_metadata(content, info), kind="tflite")


class Onnx(Format):
    """The TFLite graph of a mode converted by tf2onnx and run by onnxruntime
    (`core.onnx_format` says why from TFLite)."""

    name, title, label, suffix = "onnx", "ONNX", "ONNX file", ".onnx"
    edge, source = True, "tflite"

    def read(self, path: Path) -> dict:
        from tfkarpa.core import onnx_format

        content = self._read_file(path)
        return {"meta": onnx_format.read_metadata(content, str(path)), "content": content}

    def write(self, path: Path, content: bytes, info: dict) -> None:
        from tfkarpa.core import onnx_format

        onnx_format.write(path, content, info)

    def convert(self, tflite: bytes, where: str) -> tuple[bytes, dict]:
        from tfkarpa.core import onnx_format

        return (onnx_format.from_tflite(tflite, where),
                {"tflite_interface": onnx_format.tflite_interface(tflite)})

    def runner(self, content: bytes, meta: dict, num_threads: int | None, where: str):
        from tfkarpa.core import onnx_format

        return onnx_format.Runner(content, meta.get("tflite_interface", {}), num_threads, where)


FORMATS: dict[str, Format] = {f.name: f for f in (SavedModel(), TFLite(), Onnx())}


def find(path: Path) -> Format | None:
    """The format that claims `path` (a file by its suffix, a folder by its contents)."""
    return next((f for f in FORMATS.values() if f.claims(Path(path))), None)


def converted(names) -> list[Format]:
    """The formats among `names` made by converting the TFLite graph, in registry order."""
    return [f for f in FORMATS.values() if f.name in names and f.source == "tflite"]


def converted_format(kind: str) -> Format | None:
    """The format of artifact kind `kind` when it is converted from TFLite (ONNX), else None."""
    fmt = FORMATS.get(kind)
    return fmt if fmt is not None and fmt.source == "tflite" else None


def offered(task_formats) -> tuple[str, ...]:
    """What a task that writes `task_formats` can export: those, and every format converted
    from TFLite where it writes TFLite."""
    extra = [f.name for f in FORMATS.values()
             if f.source and f.source in task_formats and f.name not in task_formats]
    return (*task_formats, *extra)


def edge_suffixes() -> tuple[str, ...]:
    return tuple(f.suffix for f in FORMATS.values() if f.edge)


def per_image(run, images) -> dict[str, np.ndarray]:
    """`run` (a batch-1 graph: [1, ...] -> {name: [1, ...]}) over a batch, one image at a time,
    the outputs concatenated by name."""
    rows = [run(np.asarray(image)[None]) for image in np.asarray(images)]
    return {name: np.concatenate([np.asarray(r[name]) for r in rows]) for name in rows[0]}


# ------------------------------------------------------------------------------ TFLite metadata

def embed_tflite_metadata(content: bytes, info: dict) -> bytes:
    """Store `info` as JSON in the flatbuffer's metadata table, where class names travel."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(info, default=str).encode(), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_tflite_metadata(content: bytes) -> dict:
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(content), 0)
    for i in range(model.MetadataLength()):
        meta = model.Metadata(i)
        if meta.Name() == METADATA_NAME.encode():
            return json.loads(model.Buffers(meta.Buffer()).DataAsNumpy().tobytes())
    return {}

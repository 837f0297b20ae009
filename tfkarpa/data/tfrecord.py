"""Sharded TFRecords: write any source once, read it back as `tfrecord:DIR` at any scale.

`convert` writes each split of a loaded source as `<split>-NNNNN-of-MMMMM.tfrecord` shards of
`tf.train.Example`s (the image PNG-encoded, so the round trip is exact, its label, height and
width) and a `dataset.json` that describes the schema, the class names, the files and the
example counts. The directory is written under a temporary name and moved into place.

`load` reads it back: the file list is interleaved in parallel (deterministically, so
evaluation order is fixed) and each record parsed and decoded in the map. Under a multi-worker
strategy the pipeline shards by file when there are at least as many files as workers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from tfkarpa.data.splits import SPLITS, SourceData, Split
from tfkarpa.errors import TfkarpaError
from tfkarpa.runs import atomic_dir

log = logging.getLogger(__name__)

FORMAT = "tfkarpa.tfrecord"
VERSION = 1
SCHEMA_FILE = "dataset.json"
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
}
FEATURE_DOCS = {
    "image": "PNG-encoded uint8 RGB image (lossless: the round trip is exact)",
    "label": "int64 class index into class_names",
    "height": "int64 image height in pixels",
    "width": "int64 image width in pixels",
}


def _example(png: bytes, label: int, height: int, width: int) -> bytes:
    feature = tf.train.Feature
    return tf.train.Example(features=tf.train.Features(feature={
        "image": feature(bytes_list=tf.train.BytesList(value=[png])),
        "label": feature(int64_list=tf.train.Int64List(value=[label])),
        "height": feature(int64_list=tf.train.Int64List(value=[height])),
        "width": feature(int64_list=tf.train.Int64List(value=[width])),
    })).SerializeToString()


def convert(data: SourceData, out: str | Path, shards: int = 4,
            progress: Callable[[str], None] = log.info) -> dict:
    """Write `data`'s splits as sharded TFRecords in `out` (created; must not exist)."""
    out = Path(out)
    if shards < 1:
        raise TfkarpaError(f"shards must be at least 1, got {shards}")
    if out.exists():
        raise TfkarpaError(f"'{out}' already exists; choose a new out= directory")
    schema = {"format": FORMAT, "version": VERSION, "source": data.source,
              "fingerprint": data.fingerprint, "class_names": data.class_names,
              "features": FEATURE_DOCS, "splits": {}}
    with atomic_dir(out) as tmp:
        for name in SPLITS:
            split = data.splits[name]
            files = [f"{name}-{i:05d}-of-{shards:05d}.tfrecord" for i in range(shards)]
            writers = [tf.io.TFRecordWriter(str(tmp / f)) for f in files]
            counts = np.zeros(data.num_classes, np.int64)
            written = 0
            try:
                # Encoding in the tf.data map runs in parallel; writing stays in order.
                encoded = split.make().map(
                    lambda x, y: (tf.io.encode_png(x), y, tf.shape(x)[0], tf.shape(x)[1]),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                for png, label, height, width in encoded.prefetch(tf.data.AUTOTUNE):
                    label = int(label)
                    writers[written % shards].write(
                        _example(png.numpy(), label, int(height), int(width)))
                    counts[label] += 1
                    written += 1
                    if written % 5000 == 0:
                        progress(f"{name}: {written} examples written")
            finally:
                for w in writers:
                    w.close()
            schema["splits"][name] = {"files": files, "examples": written,
                                      "class_counts": counts.tolist()}
            progress(f"{name}: {written} examples in {shards} shard(s)")
        (tmp / SCHEMA_FILE).write_text(json.dumps(schema, indent=2) + "\n")
    return schema


def read_schema(root: Path) -> dict:
    path = root / SCHEMA_FILE
    where = f"tfrecord:{root}"
    if not root.is_dir():
        raise TfkarpaError(f"{where}: no such directory")
    try:
        schema = json.loads(path.read_text())
    except FileNotFoundError:
        raise TfkarpaError(f"{where}: no {SCHEMA_FILE}; make the directory with "
                           "`python -m pipelines data convert SOURCE out=DIR`") from None
    except json.JSONDecodeError as err:
        raise TfkarpaError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(schema, dict) or schema.get("format") != FORMAT:
        raise TfkarpaError(f"{path}: not a {FORMAT} schema (format is "
                           f"{schema.get('format') if isinstance(schema, dict) else None!r})")
    if schema.get("version") != VERSION:
        raise TfkarpaError(f"{path}: schema version {schema.get('version')!r} is not {VERSION}")
    for key in ("class_names", "splits"):
        if key not in schema:
            raise TfkarpaError(f"{path}: missing key '{key}'")
    for name in SPLITS:
        entry = schema["splits"].get(name)
        if not isinstance(entry, dict) or not {"files", "examples"} <= set(entry):
            raise TfkarpaError(f"{path}: splits.{name} must list 'files' and 'examples'")
        for f in entry["files"]:
            if Path(f).name != f:
                raise TfkarpaError(f"{path}: splits.{name} file '{f}' must be a plain file name "
                                   "inside the directory")
            if not (root / f).is_file():
                raise TfkarpaError(f"{where}: shard '{f}' listed in {SCHEMA_FILE} is missing")
    return schema


def _parse(record):
    ex = tf.io.parse_single_example(record, FEATURES)
    image = tf.io.decode_png(ex["image"], channels=3)
    image = tf.ensure_shape(image, [None, None, 3])
    return image, tf.cast(ex["label"], tf.int32)


def load(path: str, seed: int = 0) -> SourceData:
    """`tfrecord:DIR` as a source: the splits it was written with, read shard-parallel."""
    root = Path(path).expanduser()
    schema = read_schema(root)
    class_names = [str(c) for c in schema["class_names"]]
    if len(class_names) < 2:
        raise TfkarpaError(f"tfrecord:{path}: a classifier needs at least 2 classes")

    def split(name: str) -> Split:
        entry = schema["splits"][name]
        files = [str(root / f) for f in entry["files"]]

        def make():
            ds = tf.data.Dataset.from_tensor_slices(files)
            ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            return ds.map(_parse, num_parallel_calls=tf.data.AUTOTUNE)

        return Split(int(entry["examples"]), make, files=len(files),
                     class_counts=entry.get("class_counts"))

    return SourceData(f"tfrecord:{path}", class_names, {n: split(n) for n in SPLITS},
                      str(schema.get("fingerprint", "")))

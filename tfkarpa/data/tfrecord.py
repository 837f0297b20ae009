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
import struct
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
    """Write `data`'s splits as sharded TFRecords in `out` (new, empty or its own earlier)."""
    out = Path(out)
    if shards < 1:
        raise TfkarpaError(f"shards must be at least 1, got {shards}")
    schema = {"format": FORMAT, "version": VERSION, "source": data.source,
              "fingerprint": data.fingerprint, "class_names": data.class_names,
              "features": FEATURE_DOCS, "splits": {}}
    with atomic_dir(out, "tfrecord", "data convert out") as tmp:
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


def count_records(path: Path) -> int:
    """The records in one TFRecord file, found by walking its framing (an 8-byte length, a
    4-byte CRC, the data, a 4-byte CRC) with seeks only: a shard cut short, which TensorFlow
    reports mid-training as a DataLossError naming no file, is refused here, before training,
    by name. It reads 12 bytes a record, so even a million-record split costs a few seconds."""
    size, count, offset = path.stat().st_size, 0, 0
    with path.open("rb") as f:
        while offset < size:
            header = f.read(12)
            length = struct.unpack("<Q", header[:8])[0] if len(header) == 12 else None
            if length is None or offset + 16 + length > size:
                raise TfkarpaError(
                    f"shard '{path}' is cut short: record {count + 1} at byte {offset} runs "
                    f"past the end of the file ({size} bytes); write the directory again with "
                    "`python -m pipelines data convert SOURCE out=DIR`")
            offset += 16 + length
            f.seek(offset)
            count += 1
    return count


def check_shards(root: Path, schema: dict) -> None:
    """Every shard whole, and each split holding the examples `dataset.json` says it does."""
    for name in SPLITS:
        entry = schema["splits"][name]
        found = sum(count_records(root / f) for f in entry["files"])
        if found != int(entry["examples"]):
            raise TfkarpaError(
                f"tfrecord:{root}: the {name} shards hold {found} records but {SCHEMA_FILE} says "
                f"{entry['examples']}; a shard was replaced or damaged, write the directory "
                "again with `python -m pipelines data convert SOURCE out=DIR`")


def _parse(record):
    ex = tf.io.parse_single_example(record, FEATURES)
    image = tf.io.decode_png(ex["image"], channels=3)
    image = tf.ensure_shape(image, [None, None, 3])
    return image, tf.cast(ex["label"], tf.int32)


def load(path: str, seed: int = 0) -> SourceData:
    """`tfrecord:DIR` as a source: the splits it was written with, read shard-parallel."""
    root = Path(path).expanduser()
    schema = read_schema(root)
    check_shards(root, schema)
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

"""Data for multi-task runs: images with one label per head, and their tf.data pipelines.

A head is a classification (`Head.classes`: its class names) or a regression (`Head.kind ==
"value"`: a number per image, with the training split's mean and standard deviation, which
scale its loss and its output layer). Two sources have several labels per image:

- `shapes`: the embedded scenes, with heads `class` (the shape), `colour` (the hue sector of
  its fill: red, yellow, green, cyan, blue, magenta) and `size` (its diameter as a share of the
  image side, a regression);
- `csv:FILE`: a table with an `image` column (paths relative to the file) and one column per
  head; a column whose every cell is a number is a regression head, any other a classification
  head with the sorted distinct values as its classes.

Splits hold (uint8 image, {head: label}) with int32 class ids and float32 values; the pipeline
one-hots the class heads and augments the images only (light: flip and shift, which change no
head's label; RandAugment's colour operations would change `colour`'s).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.config import Config, DataConfig, parse_heads
from tfkarpa.data import pipeline, shapes, sources
from tfkarpa.data.splits import SourceData, Split
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Head:
    """One output of a multi-task model."""

    name: str
    kind: str  # "class" | "value"
    classes: list[str] = dataclasses.field(default_factory=list)
    mean: float = 0.0  # value heads: the training split's mean and standard deviation
    std: float = 1.0
    weight: float = 1.0  # loss weight (head_weighting=fixed)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Head":
        return cls(**d)


@dataclasses.dataclass
class MultiTaskData(SourceData):
    """A source's splits with several labels per image. `class_names` are the first
    classification head's (the run listing's and the class-count figures' classes)."""

    heads: list[Head] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        return {**super().summary(), "heads": [h.as_dict() for h in self.heads]}


def _value_stats(values: np.ndarray) -> tuple[float, float]:
    std = float(np.std(values))
    return float(np.mean(values)), std if std > 1e-8 else 1.0


def _arrays_split(images: np.ndarray, labels: dict[str, np.ndarray], idx: np.ndarray,
                  primary: str | None) -> Split:
    x = images[idx]
    y = {name: values[idx] for name, values in labels.items()}
    return Split(len(idx), lambda: tf.data.Dataset.from_tensor_slices((x, y)),
                 y[primary] if primary else None, x.shape[1:])


def _choose(available: list[Head], spec: str, source: str) -> list[Head]:
    """The heads `spec` names, in its order, with its weights (all of them for "")."""
    wanted = parse_heads(spec)
    if not wanted:
        return available
    by_name = {h.name: h for h in available}
    missing = [name for name, _ in wanted if name not in by_name]
    if missing:
        raise TfkarpaError(f"config key 'heads': {source} has no head '{missing[0]}' (its heads: "
                           f"{', '.join(by_name)})")
    return [dataclasses.replace(by_name[name], weight=weight) for name, weight in wanted]


def _split_index(labels: dict[str, np.ndarray], heads: list[Head], cfg: DataConfig, seed: int):
    primary = next((h.name for h in heads if h.kind == "class"), None)
    strata = labels[primary] if primary else np.zeros(len(next(iter(labels.values()))), int)
    return sources.stratified_split(strata, cfg.val_fraction, cfg.test_fraction, seed), primary


def _with_value_stats(heads: list[Head], labels: dict[str, np.ndarray], train: np.ndarray):
    out = []
    for h in heads:
        if h.kind == "value":
            mean, std = _value_stats(labels[h.name][train])
            h = dataclasses.replace(h, mean=mean, std=std)
        out.append(h)
    return out


def load_shapes(cfg: Config, seed: int) -> MultiTaskData:
    heads = _choose([Head("class", "class", list(shapes.CLASSES)),
                     Head("colour", "class", list(shapes.HUES)), Head("size", "value")],
                    cfg.heads, "shapes")  # before drawing: a wrong name costs nothing
    drawn: list = []
    size = cfg.data.image_size or sources.SHAPES_SIZE
    images, classes, _, _ = shapes.generate(cfg.data.count, size, seed, attributes=drawn)
    colours = np.array([shapes.HUES.index(shapes.hue_name(d[0]["colour"])) for d in drawn],
                       np.int32)
    labels = {"class": classes.astype(np.int32), "colour": colours,
              "size": np.array([d[0]["diameter"] for d in drawn], np.float32)}
    labels = {h.name: labels[h.name] for h in heads}
    index, primary = _split_index(labels, heads, cfg.data, seed)
    heads = _with_value_stats(heads, labels, index["train"])
    digest = hashlib.sha256(images.tobytes())
    for name in sorted(labels):
        digest.update(name.encode() + labels[name].tobytes())
    return MultiTaskData("shapes", _class_names(heads), {
        n: _arrays_split(images, labels, i, primary) for n, i in index.items()},
        digest.hexdigest(), image_sizes=[(size, size)] * len(images), heads=heads)


def _class_names(heads: list[Head]) -> list[str]:
    return next((list(h.classes) for h in heads if h.kind == "class"), [])


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# Long: the table's checks in the order a user meets them (header, cells, images, heads), each
# error naming the file and line; split up, each step would re-read the rows.
def read_table(path: str, cfg: Config) -> tuple[list[Path], list[Head], dict[str, np.ndarray],
                                                 list[bytes], list]:
    """The rows of a `csv:FILE` source, checked: (image files, heads, labels, digests, sizes)."""
    file = Path(path).expanduser()
    where = f"csv:{path}"
    if not file.is_file():
        raise TfkarpaError(f"{where}: no such file")
    with file.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise TfkarpaError(f"{where}: the file is empty")
    header = [c.strip() for c in rows[0]]
    if "image" not in header:
        raise TfkarpaError(f"{file}, line 1: no 'image' column (columns: {', '.join(header)}); "
                           "the header names an image column and one column per head")
    columns = [c for c in header if c != "image"]
    if not columns:
        raise TfkarpaError(f"{file}, line 1: no head columns beside 'image'")
    if len(set(header)) != len(header):
        raise TfkarpaError(f"{file}, line 1: a column is named twice ({', '.join(header)})")
    files, cells = [], {c: [] for c in columns}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise TfkarpaError(f"{file}, line {line}: {len(row)} cells, the header has "
                               f"{len(header)}")
        record = dict(zip(header, (cell.strip() for cell in row)))
        for column in [*columns, "image"]:
            if not record[column]:
                raise TfkarpaError(f"{file}, line {line}: column '{column}' is empty")
        files.append((line, file.parent / record["image"]))
        for column in columns:
            cells[column].append(record[column])
    if not files:
        raise TfkarpaError(f"{where}: no rows below the header")
    results = [sources._check_image_file(p) for _, p in files]
    for (line, p), (problem, *_) in zip(files, results):
        if problem:
            raise TfkarpaError(f"{file}, line {line}: image '{p}' {problem}")
    heads, labels = [], {}
    for column in columns:
        numbers = [_number(c) for c in cells[column]]
        if all(n is not None for n in numbers):
            heads.append(Head(column, "value"))
            labels[column] = np.array(numbers, np.float32)
            continue
        classes = sorted(set(cells[column]))
        if len(classes) < 2:
            raise TfkarpaError(f"{where}: column '{column}' has one class ('{classes[0]}'); a "
                               "classification head needs at least 2")
        ids = {c: i for i, c in enumerate(classes)}
        heads.append(Head(column, "class", classes))
        labels[column] = np.array([ids[c] for c in cells[column]], np.int32)
    return ([p for _, p in files], heads, labels, [r[1] for r in results],
            [r[2] for r in results])


def load_csv(path: str, cfg: Config, seed: int) -> MultiTaskData:
    files, heads, labels, digests, sizes = read_table(path, cfg)
    heads = _choose(heads, cfg.heads, f"csv:{path}")
    labels = {h.name: labels[h.name] for h in heads}
    index, primary = _split_index(labels, heads, cfg.data, seed)
    heads = _with_value_stats(heads, labels, index["train"])
    paths = np.array([str(f) for f in files])

    def split(idx):
        chosen = paths[idx]
        y = {name: values[idx] for name, values in labels.items()}

        def make():
            ds = tf.data.Dataset.from_tensor_slices((chosen, y))
            return ds.map(sources._decode_file, num_parallel_calls=AUTOTUNE)

        return Split(len(idx), make, y[primary] if primary else None)

    digest = hashlib.sha256()
    for f, d in zip(files, digests):
        digest.update(str(f).encode() + b"\0" + d)
    for name in sorted(labels):
        digest.update(name.encode() + labels[name].tobytes())
    return MultiTaskData(f"csv:{path}", _class_names(heads),
                         {n: split(i) for n, i in index.items()}, digest.hexdigest(),
                         image_sizes=sizes, heads=heads)


def load(cfg: Config, seed: int) -> MultiTaskData:
    """The multi-task source `data.source` names, with the heads `heads` names (`data.seed`,
    if set, beats `seed`: it draws shapes' scenes and every source's split)."""
    seed = cfg.data.seed if cfg.data.seed >= 0 else seed
    kind, _, arg = cfg.data.source.partition(":")
    if cfg.data.val or cfg.data.test:
        raise TfkarpaError("config keys 'data.val' / 'data.test' are for folder: sources; a "
                           "multi-task source is split by data.val_fraction / data.test_fraction")
    if kind == "shapes" and not arg:
        data = load_shapes(cfg, seed)
    elif kind == "csv" and arg:
        data = load_csv(arg, cfg, seed)
    else:
        raise TfkarpaError(f"config key 'data.source': task=multitask needs several labels per "
                           f"image: shapes or csv:FILE (a table of image paths and one column "
                           f"per head), not '{cfg.data.source}'")
    if data.splits["train"].num_examples == 0:
        raise TfkarpaError(f"{data.source}: the train split is empty")
    sources.require_splits(data)
    return data


def targets(labels: dict, heads: list[Head]) -> dict:
    """A batch's labels as the model's targets: one-hot classes, [batch, 1] float values."""
    return {h.name: (tf.one_hot(labels[h.name], len(h.classes)) if h.kind == "class"
                     else tf.reshape(tf.cast(labels[h.name], tf.float32), (-1, 1)))
            for h in heads}


def make_dataset(split: Split, cfg: Config, heads: list[Head], training: bool,
                 batch_size: int | None = None) -> tf.data.Dataset:
    """Batched (float32 image, {head: target}); training shuffles and augments the images."""
    ds = pipeline.prepared(split, cfg, training)
    ds = ds.batch(batch_size or cfg.batch_size, num_parallel_calls=AUTOTUNE)
    aug = pipeline.augmenter(cfg.data.augment, cfg.data.flip, cfg.seed) if training else None

    def finish(x, y):
        x = tf.cast(x, tf.float32)
        if aug is not None:
            x = aug(x, training=True)
        return x, targets(y, heads)

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE)
    return pipeline.finished(ds, split, cfg, training, workers=1)

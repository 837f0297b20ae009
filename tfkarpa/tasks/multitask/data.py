"""Data for multi-task runs: images with one label per head, and their tf.data pipelines.

A head is a classification (`Head.classes`: its class names) or a regression (`Head.kind ==
"value"`: a number per image, with the training split's mean and standard deviation, which
scale its loss and its output layer). Two sources have several labels per image:

- `shapes`: the embedded scenes, with heads `class` (the shape), `colour` (the hue sector of
  its fill: red, yellow, green, cyan, blue, magenta) and `size` (its diameter as a share of the
  image side, a regression);
- `csv:FILE`: a table with an `image` column (paths relative to the file) and one column per
  head; a column whose every cell is a number is a regression head, any other a classification
  head with the sorted distinct values as its classes (`name:class` / `name:value` in the
  header decides instead: class ids written as numbers).

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
from tfkarpa.data.annotations import inside
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


def _split_index(labels: dict[str, np.ndarray], available: list[Head], cfg: DataConfig,
                 seed: int) -> dict[str, np.ndarray]:
    """Train/val/test indices, stratified by the source's first classification head, whichever
    heads a run chooses: runs on other heads of one source test on the same images."""
    first = next((h.name for h in available if h.kind == "class"), None)
    strata = labels[first] if first else np.zeros(len(next(iter(labels.values()))), int)
    return sources.stratified_split(strata, cfg.val_fraction, cfg.test_fraction, seed)


def _primary(heads: list[Head]) -> str | None:
    """The chosen heads' first classification head: the splits' `labels` (class counts)."""
    return next((h.name for h in heads if h.kind == "class"), None)


def _with_value_stats(heads: list[Head], labels: dict[str, np.ndarray], train: np.ndarray):
    out = []
    for h in heads:
        if h.kind == "value":
            mean, std = _value_stats(labels[h.name][train])
            h = dataclasses.replace(h, mean=mean, std=std)
        out.append(h)
    return out


def load_shapes(cfg: Config, seed: int) -> MultiTaskData:
    available = [Head("class", "class", list(shapes.CLASSES)),
                 Head("colour", "class", list(shapes.HUES)), Head("size", "value")]
    heads = _choose(available, cfg.heads, "shapes")  # before drawing: a wrong name costs nothing
    drawn: list = []
    size = cfg.data.image_size or sources.SHAPES_SIZE
    images, classes, _, _ = shapes.generate(cfg.data.count, size, seed, attributes=drawn)
    colours = np.array([shapes.HUES.index(shapes.hue_name(d[0]["colour"])) for d in drawn],
                       np.int32)
    labels = {"class": classes.astype(np.int32), "colour": colours,
              "size": np.array([d[0]["diameter"] for d in drawn], np.float32)}
    index = _split_index(labels, available, cfg.data, seed)
    labels = {h.name: labels[h.name] for h in heads}
    primary = _primary(heads)
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


KINDS = {"class": "class", "value": "value"}  # header suffixes: `label:class`, `age:value`


def _read_rows(file: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every row, the header first; undecodable files are errors."""
    rows = []
    try:
        with file.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as err:
        raise TfkarpaError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start}); save "
                           "the table as UTF-8 CSV") from None
    except csv.Error as err:
        raise TfkarpaError(f"{file}, line {len(rows) + 1}: not readable as CSV ({err})") from None
    return rows


def _header(file: Path, cells: list[str]) -> list[tuple[str, str]]:
    """(name, kind) per column: kind "image", "class", "value" or "" (from the cells)."""
    columns = []
    for cell in (c.strip() for c in cells):
        name, _, kind = cell.partition(":")
        if kind and kind not in KINDS:
            raise TfkarpaError(f"{file}, line 1: column '{cell}': the kind after ':' is class or "
                               "value")
        columns.append((name.strip(), "image" if name.strip() == "image" else kind))
    names = [n for n, _ in columns]
    if "image" not in names:
        raise TfkarpaError(f"{file}, line 1: no 'image' column (columns: {', '.join(names)}); "
                           "the header names an image column and one column per head")
    if len(names) < 2:
        raise TfkarpaError(f"{file}, line 1: no head columns beside 'image'")
    if len(set(names)) != len(names):
        raise TfkarpaError(f"{file}, line 1: a column is named twice ({', '.join(names)})")
    return columns


def _column_head(file: Path, name: str, kind: str, cells: list[str], lines: list[int]):
    """A column's head and labels: numbers make a value head, anything else a class head
    (`kind` from the header decides when given)."""
    numbers = [_number(c) for c in cells]
    bad = [i for i, n in enumerate(numbers) if n is None]
    if kind == "value" or (not kind and bad and len(bad) < len(cells) / 2):
        if bad:  # a number column with a typo, nan or inf: say where, not a class per number
            raise TfkarpaError(
                f"{file}, line {lines[bad[0]]}: column '{name}': '{cells[bad[0]]}' is not a "
                f"finite number ({len(bad)} such cells; write '{name}:class' in the header if "
                "the column is a classification)")
    if kind == "value" or (not kind and not bad):
        return Head(name, "value"), np.array(numbers, np.float32)
    classes = sorted(set(cells))
    if len(classes) < 2:
        raise TfkarpaError(f"{file}: column '{name}' has one class ('{classes[0]}'); a "
                           "classification head needs at least 2")
    ids = {c: i for i, c in enumerate(classes)}
    return Head(name, "class", classes), np.array([ids[c] for c in cells], np.int32)


# Long: the table's checks in the order a user meets them (cells, images, heads), each error
# naming the file and line; split up, each step would pass the rows and their lines along.
def read_table(path: str, cfg: Config) -> tuple[list[Path], list[Head], dict[str, np.ndarray],
                                                 list[bytes], list]:
    """The rows of a `csv:FILE` source, checked: (image files, heads, labels, digests, sizes).
    A column is a head: numbers make a regression head, anything else a classification head;
    `name:class` or `name:value` in the header says which (class ids written as 0/1)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TfkarpaError(f"csv:{path}: no such file")
    rows = _read_rows(file)
    if not rows:
        raise TfkarpaError(f"csv:{path}: the file is empty")
    columns = _header(file, rows[0][1])
    heads_of = [(n, k) for n, k in columns if k != "image"]
    files, lines, cells = [], [], {n: [] for n, _ in heads_of}
    for line, row in rows[1:]:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise TfkarpaError(f"{file}, line {line}: {len(row)} cells, the header has "
                               f"{len(columns)}")
        record = dict(zip((n for n, _ in columns), (cell.strip() for cell in row)))
        for name, _ in columns:
            if not record[name]:
                raise TfkarpaError(f"{file}, line {line}: column '{name}' is empty")
        inside(file.parent, record["image"], f"{file}, line {line}")  # no ../ nor /abs
        files.append(file.parent / record["image"])
        lines.append(line)
        for name, _ in heads_of:
            cells[name].append(record[name])
    if not files:
        raise TfkarpaError(f"csv:{path}: no rows below the header")
    heads, labels = [], {}
    for name, kind in heads_of:
        head, labels[name] = _column_head(file, name, kind, cells[name], lines)
        heads.append(head)
    results = [sources._check_image_file(p) for p in files]
    for line, p, (problem, *_) in zip(lines, files, results):
        if problem:
            raise TfkarpaError(f"{file}, line {line}: image '{p}' {problem}")
    log.info("csv:%s: %d images; heads %s", path, len(files), ", ".join(
        f"{h.name} ({len(h.classes)} classes)" if h.kind == "class" else f"{h.name} (value)"
        for h in heads))
    return files, heads, labels, [r[1] for r in results], [r[2] for r in results]


def load_csv(path: str, cfg: Config, seed: int) -> MultiTaskData:
    files, available, labels, digests, sizes = read_table(path, cfg)
    heads = _choose(available, cfg.heads, f"csv:{path}")
    index = _split_index(labels, available, cfg.data, seed)
    labels = {h.name: labels[h.name] for h in heads}
    primary = _primary(heads)
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

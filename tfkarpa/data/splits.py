"""What every data source hands on: named splits of a dataset, and the facts known about them.

`Split` is one split (how to build its tf.data.Dataset, its size, labels when known up front);
`SourceData` is a source's class names, splits and fingerprint. They live apart from the
loaders (`sources`, `tfrecord`, `detection`) so that each loader can build on them without
importing another loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf

from tfkarpa.errors import TfkarpaError

SPLITS = ("train", "val", "test")


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be one line of an export's labels.txt (None when it can): empty or
    blank, a NUL, or any character a reader's splitlines() breaks a line at (newline, carriage
    return, form feed, U+2028, ...). Such a name would make labels.txt hold more or fewer lines
    than there are classes, and every consumer would pair labels with the wrong outputs."""
    if not name.strip():
        return "is empty or blank"
    if "\0" in name:
        return "holds a NUL character"
    if len(f"x{name}x".splitlines()) != 1:
        return "holds a line break"
    return None


def check_class_names(class_names, where: str) -> None:
    """Refuse class names that cannot round-trip through labels.txt, naming them and `where`."""
    for name in class_names:
        problem = class_name_problem(str(name))
        if problem:
            raise TfkarpaError(f"{where}: class name {str(name)!r} {problem}, so it cannot be one "
                               "line of labels.txt; rename the class")


@dataclass
class Split:
    """One split of a source. `make` builds a fresh dataset of (uint8 HxWx3 image, int32 label)."""

    num_examples: int
    make: Callable[[], tf.data.Dataset]
    labels: np.ndarray | None = None  # known up front for array and file sources
    in_memory_shape: tuple | None = None  # (H, W, 3) when every image already has one size
    files: int = 0  # record files behind the split (sharded sources): workers can split by file
    class_counts: list[int] | None = None  # when labels are not held in memory


@dataclass
class SourceData:
    source: str
    class_names: list[str]
    splits: dict[str, Split]
    fingerprint: str
    skipped: list[str] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] | None = None  # (width, height) of each source image

    def __post_init__(self):
        check_class_names(self.class_names, self.source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        """A split by name; "all" is every example of the source (train, val, test in turn; a
        test split that is the validation set, as given, counts once)."""
        if name != "all":
            if name not in self.splits:
                raise TfkarpaError(f"split '{name}' is not one of {', '.join(SPLITS)}, all")
            return self.splits[name]
        parts = [s for n, s in self.splits.items()
                 if not (n == "test" and s is self.splits.get("val"))]

        def make():
            ds = parts[0].make()
            for part in parts[1:]:
                ds = ds.concatenate(part.make())
            return ds

        known = all(p.labels is not None for p in parts)
        shapes = {p.in_memory_shape for p in parts}
        return Split(sum(p.num_examples for p in parts), make,
                     np.concatenate([p.labels for p in parts]) if known else None,
                     shapes.pop() if len(shapes) == 1 else None)

    def summary(self) -> dict:
        counts = {}
        for name, split in self.splits.items():
            per_class = split.class_counts
            if split.labels is not None:
                per_class = np.bincount(split.labels, minlength=self.num_classes)
            if per_class is not None:
                counts[name] = {self.class_names[i]: int(n) for i, n in enumerate(per_class)}
        return {
            "source": self.source,
            "classes": self.class_names,
            "examples": {name: s.num_examples for name, s in self.splits.items()},
            "class_counts": counts,
            "fingerprint": self.fingerprint,
            "skipped": self.skipped,
            **({"image_sizes": size_stats(self.image_sizes)} if self.image_sizes else {}),
        }


def labels_of(split: Split) -> np.ndarray:
    """The split's labels in order: held in memory, else read once from its data."""
    if split.labels is not None:
        return split.labels
    return np.array([int(y) for _, y in split.make().as_numpy_iterator()], np.int32)


def subset(split: Split, indices: np.ndarray, labels: np.ndarray | None = None) -> Split:
    """The examples of `split` at `indices` (in the split's order), as a split of its own.
    `labels`: the whole split's labels when already read (see `labels_of`)."""
    labels = split.labels if labels is None else labels
    keep = np.zeros(split.num_examples if split.num_examples >= 0 else len(labels), bool)
    keep[indices] = True

    def make():
        take = tf.constant(keep)
        return split.make().enumerate().filter(lambda i, example: take[i]).map(
            lambda i, example: example)

    kept = np.flatnonzero(keep)
    return Split(len(kept), make, None if labels is None else labels[kept],
                 split.in_memory_shape)


def size_stats(sizes: list[tuple[int, int]]) -> dict:
    """Smallest, median and largest source image by area, as "WxH", and how many there are."""
    ordered = sorted(sizes, key=lambda wh: (wh[0] * wh[1], wh))
    show = lambda wh: f"{wh[0]}x{wh[1]}"  # noqa: E731
    return {"images": len(ordered), "smallest": show(ordered[0]),
            "median": show(ordered[len(ordered) // 2]), "largest": show(ordered[-1]),
            "distinct": len(set(ordered))}

"""Data sources: a source string in, checked train/val/test splits of (uint8 image, label) out.

Sources are named by short strings: `digits` (scikit-learn's 1,797 real 8x8 digits), `shapes`
(the embedded procedural set), `tfds:NAME` (any TFDS image-classification set), `folder:PATH`
(one sub-folder per class). Library users can also pass arrays with `from_arrays`. The schema
is checked once, here: labels in range, at least two classes, every image file readable. A
source without its own splits gets deterministic, stratified train/val/test splits from the
seed, so the same seed always tests on the same images.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from tfkarpa.config import DataConfig, parse_label_budget
from tfkarpa.data.splits import (SPLITS, SourceData, Split, class_name_problem,  # noqa: F401
                                  labels_of, size_stats, subset)  # (SPLITS, ... re-exported)
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SHAPES_SIZE = 32  # the side `shapes` is drawn at for classification when data.image_size is auto
# PIL reads more formats than tf.io.decode_image; these are the ones both read.
_TF_DECODABLE = {"JPEG", "PNG", "BMP", "GIF", "MPO"}


def stratified_split(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int):
    """Indices for train/val/test, the same fractions from every class, fixed by the seed.

    val and test are in index order; train is in a seeded random order. A source sorted by
    class (a folder read class by class, an idx file sorted by label) would otherwise reach
    training's shuffle buffer (`data.shuffle_buffer`, 10,000) in class order, and with more
    images than the buffer each stretch of an epoch would hold one or two classes."""
    rng = np.random.default_rng(seed)
    parts = {name: [] for name in SPLITS}
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 3:  # small classes still get one held-out image per asked-for split
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    split = {name: np.sort(np.concatenate(p)) for name, p in parts.items()}
    split["train"] = split["train"][rng.permutation(len(split["train"]))]
    return split


def _check_labels(labels: np.ndarray, class_names: list[str], where: str) -> None:
    if len(class_names) < 2:
        raise TfkarpaError(f"{where}: a classifier needs at least 2 classes, found {len(class_names)}")
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if len(bad):
        raise TfkarpaError(
            f"{where}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range "
            f"[0, {len(class_names) - 1}] ({len(bad)} such labels)"
        )


def from_arrays(images, labels, class_names, *, val_fraction=0.1, test_fraction=0.1, seed=0,
                source="arrays") -> SourceData:
    """A source from in-memory uint8 images [N, H, W, 3] (or [N, H, W] grayscale) and labels."""
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise TfkarpaError(
            f"{source}: images must be uint8 of shape [N, H, W, 3], got {images.dtype} {images.shape}"
        )
    if len(images) != len(labels):
        raise TfkarpaError(f"{source}: {len(images)} images but {len(labels)} labels")
    class_names = [str(c) for c in class_names]
    _check_labels(labels, class_names, source)
    index = stratified_split(labels, val_fraction, test_fraction, seed)

    def split(idx):
        x, y = images[idx], labels[idx].astype(np.int32)
        return Split(len(idx), lambda: tf.data.Dataset.from_tensor_slices((x, y)), y, x.shape[1:])

    digest = hashlib.sha256(images.tobytes())
    digest.update(labels.tobytes())
    return SourceData(source, class_names, {n: split(i) for n, i in index.items()},
                      digest.hexdigest(), image_sizes=[images.shape[2:0:-1]] * len(images))


def load_digits(cfg: DataConfig, seed: int) -> SourceData:
    from sklearn.datasets import load_digits as sk_digits  # ships inside scikit-learn: no download

    digits = sk_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return from_arrays(images, digits.target, [str(d) for d in range(10)],
                       val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed,
                       source="digits")


# The idx format of MNIST, Fashion-MNIST, KMNIST and EMNIST: train and test files by their
# standard names ('-' or '.' before idx; gzip or not).
IDX_FILES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """One idx file: bytes 0 0 TYPE NDIM, NDIM big-endian uint32 sizes, then the data. Read with
    numpy here: neither TFDS nor Keras reads a local idx file (they download their own)."""
    import gzip

    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise TfkarpaError(f"{path}: cannot be read ({err})") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _IDX_TYPES or not raw[3]:
        raise TfkarpaError(f"{path}: not an idx file (it must start with the bytes 0 0 TYPE "
                           "NDIM, as MNIST's files do)")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) < header or len(raw) - header != need:
        raise TfkarpaError(f"{path}: its header says {need} bytes of data {shape}, it holds "
                           f"{max(len(raw) - header, 0)}; the file is cut short or damaged")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def _idx_file(root: Path, stem: str, kind: str) -> Path | None:
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            path = root / f"{stem}{sep}{kind}-ubyte{suffix}"
            if path.is_file():
                return path
    return None


def load_idx(path: str, cfg: DataConfig, seed: int) -> SourceData:
    """`idx:DIR`: MNIST-format files. train-* is split into train and val (stratified,
    data.val_fraction); t10k-* is the test set as given (without it, test is carved too).
    Class names from DIR/classes.txt (one per line) if present, else the label numbers."""
    root = Path(path).expanduser()
    where = f"idx:{path}"
    if not root.is_dir():
        raise TfkarpaError(f"{where}: no such directory")
    arrays = {}
    for split, (images_stem, labels_stem) in IDX_FILES.items():
        images, labels = _idx_file(root, images_stem, "idx3"), _idx_file(root, labels_stem, "idx1")
        if images is None and labels is None and split == "test":
            continue
        if images is None or labels is None:
            missing = f"{images_stem}-idx3-ubyte" if images is None else f"{labels_stem}-idx1-ubyte"
            raise TfkarpaError(f"{where}: no {missing}[.gz] (MNIST's file names: "
                               "train-images-idx3-ubyte, train-labels-idx1-ubyte and, for the "
                               "test set, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")
        x, y = read_idx(images), read_idx(labels)
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
            raise TfkarpaError(f"{images}: holds {x.dtype} {x.shape}; images must be uint8 "
                               "[N, H, W] (or [N, H, W, 3])")
        if y.ndim != 1 or len(y) != len(x):
            raise TfkarpaError(f"{labels}: holds {y.shape} labels for the {len(x)} images of "
                               f"{images.name}; one label per image")
        arrays[split] = (x, y.astype(np.int64))
    top = max(int(y.max()) for _, y in arrays.values()) + 1
    names_file = root / "classes.txt"
    names = (names_file.read_text().splitlines() if names_file.is_file()
             else [str(c) for c in range(top)])
    if len(names) < top:
        raise TfkarpaError(f"{names_file}: {len(names)} class names for labels up to {top - 1}; "
                           "one name per line for every label")
    x, y = arrays["train"]
    test_fraction = 0.0 if "test" in arrays else cfg.test_fraction
    data = from_arrays(x, y, names, val_fraction=cfg.val_fraction, test_fraction=test_fraction,
                       seed=seed, source=where)
    if "test" in arrays:
        given = from_arrays(*arrays["test"], names, val_fraction=0.0, test_fraction=0.0,
                            seed=seed, source=where)
        data.splits["test"] = given.splits["train"]
        data.fingerprint = hashlib.sha256((data.fingerprint + given.fingerprint).encode()
                                          ).hexdigest()
        data.image_sizes = data.image_sizes + given.image_sizes
    return data


def load_shapes(cfg: DataConfig, seed: int) -> SourceData:
    from tfkarpa.data import shapes

    # Drawn at data.image_size; at auto, at 32 pixels (the size it reports, so auto keeps it).
    images, labels, _, _ = shapes.generate(cfg.count, cfg.image_size or SHAPES_SIZE, seed)
    return from_arrays(images, labels, list(shapes.CLASSES), val_fraction=cfg.val_fraction,
                       test_fraction=cfg.test_fraction, seed=seed, source="shapes")


def _decode_file(path, label):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False,
                               dtype=tf.uint8)
    return image, label


def _check_image_file(path: Path) -> tuple[str | None, bytes, tuple[int, int] | None]:
    """Return (problem or None, sha256 digest, (width, height)) for one file, decoding it fully."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror})", b"", None
    digest = hashlib.sha256(data).digest()
    if not data:
        return "empty file (0 bytes)", digest, None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return (f"not an image file (suffix '{path.suffix}'; expected "
                f"{', '.join(IMAGE_SUFFIXES)})", digest, None)
    try:
        import io

        with Image.open(io.BytesIO(data)) as img:
            fmt, size = img.format, img.size
            img.load()
    except Image.DecompressionBombError as err:  # PIL's guard: refuse before allocating
        return f"too large to decode safely: {err}", digest, None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"not a readable image ({err})", digest, None
    if fmt not in _TF_DECODABLE:
        return (f"is {fmt} data, which TensorFlow cannot decode; convert it to PNG or JPEG",
                digest, size)
    return None, digest, size


@dataclass
class _Scanned:
    """One folder of class sub-folders, checked: usable files, labels, digests, sizes."""

    class_names: list[str]
    files: list[Path]
    labels: np.ndarray
    digests: list[bytes]
    sizes: list[tuple[int, int]]
    skipped: list[str]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


# Long: the folder's checks in the order a user meets them (classes, files, bad images, empty
# classes), each error naming the folder; split up, each step would re-derive the lists.
def _scan_folder(root: Path, where: str, cfg: DataConfig) -> _Scanned:
    if not root.is_dir():
        raise TfkarpaError(f"{where}: no such directory")
    class_dirs = _class_dirs(root)
    for d in class_dirs:  # a folder name is the class name: it must fit one line of labels.txt
        problem = class_name_problem(d.name)
        if problem:
            raise TfkarpaError(f"{where}: class folder {str(d)!r} {problem} in its name, so it "
                               "cannot be one line of labels.txt; rename the folder")
    if len(class_dirs) < 2:
        raise TfkarpaError(
            f"{where}: found {len(class_dirs)} class sub-folder(s); a classifier needs one "
            "sub-folder per class and at least 2 classes"
        )
    files, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in sorted(d.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                files.append(f)
                labels.append(label)
    if not files:
        raise TfkarpaError(f"{where}: the class sub-folders hold no files")
    log.info("checking %d image files in %s", len(files), root)
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        results = list(pool.map(_check_image_file, files))
    bad = [(f, problem) for f, (problem, *_) in zip(files, results) if problem]
    if bad and not cfg.skip_bad:
        listing = "; ".join(f"{f}: {p}" for f, p in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise TfkarpaError(
            f"{where}: {len(bad)} of {len(files)} files are not usable images: {listing}{more}. "
            "Remove or fix them, or pass data.skip_bad=true to skip them."
        )
    skipped = [f"{f}: {p}" for f, p in bad]
    for entry in skipped:
        log.warning("skipping %s", entry)
    keep = [i for i, (problem, *_) in enumerate(results) if not problem]
    class_names = [d.name for d in class_dirs]
    kept_labels = np.array([labels[i] for i in keep], np.int32)
    empty = [class_names[c] for c in range(len(class_names)) if not np.any(kept_labels == c)]
    if empty:
        raise TfkarpaError(f"{where}: class folder(s) with no usable images: {', '.join(empty)}")
    return _Scanned(class_names, [files[i] for i in keep], kept_labels,
                    [results[i][1] for i in keep], [results[i][2] for i in keep], skipped)


def _file_split(files: list[Path], labels: np.ndarray) -> Split:
    paths = [str(f) for f in files]

    def make():
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        return ds.map(_decode_file, num_parallel_calls=tf.data.AUTOTUNE)

    return Split(len(files), make, labels)


# Split folders as public sets ship them: DIR/train, DIR/val (or valid/, validation/), DIR/test.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}


def _given_folders(root: Path, cfg: DataConfig) -> dict[str, Path] | None:
    """Splits the user already made: `data.val` / `data.test` folders, or split folders under
    PATH (train/ with val/, valid/ or validation/ and/or test/), each holding the class folders.
    A split that is not given is carved from train (load_folder)."""
    if cfg.val or cfg.test:
        given = {"train": root}
        for name in ("val", "test"):
            target = getattr(cfg, name)
            if target:
                kind, sep, rest = target.partition(":")
                if sep and kind != "folder":
                    raise TfkarpaError(f"config key 'data.{name}': '{target}' is not a folder "
                                       "(the training data is folder:)")
                given[name] = Path(rest if sep else target).expanduser()
        return given
    names = {d.name for d in _class_dirs(root)} if root.is_dir() else set()
    splits = sorted(n for n in names if n in SPLIT_FOLDERS)
    # "train" alone among other folders is a class (trains, buses, cars); train with another
    # split name is a set shipped in splits.
    if "train" not in splits or len(splits) < 2:
        return None
    others = sorted(names - set(splits))
    if others:
        raise TfkarpaError(
            f"folder:{root}: holds split folders ({', '.join(splits)}) beside other folders "
            f"({', '.join(others[:6])}); put every class folder inside {splits[0]}/ (and the "
            "other splits), or point data= at one split")
    given: dict[str, Path] = {}
    for name in splits:
        split = SPLIT_FOLDERS[name]
        if split in given:
            raise TfkarpaError(f"folder:{root}: both {given[split].name}/ and {name}/ are "
                               f"{split} splits; keep one")
        given[split] = root / name
    return given


def load_folder(path: str, cfg: DataConfig, seed: int) -> SourceData:
    """One sub-folder per class; split by the configured fractions, unless the splits are
    given (PATH/train with PATH/val, valid or validation and/or PATH/test, or data.val /
    data.test), which are used as they are. Without a validation set one is carved from train
    (stratified, data.val_fraction); without a test set the validation set is also the test
    set."""
    root = Path(path).expanduser()
    where = f"folder:{path}"
    given = _given_folders(root, cfg)
    if given:
        scanned = {name: _scan_folder(p, f"folder:{p}", cfg) for name, p in given.items()}
        names = scanned["train"].class_names
        for name, found in scanned.items():
            if found.class_names != names:
                raise TfkarpaError(f"folder:{given[name]}: its class folders "
                                   f"{found.class_names[:6]} differ from the training set's "
                                   f"{names[:6]}; the {name} split must have the same classes")
        # A given train/ folder is read class by class: its order is mixed once, seeded (see
        # stratified_split for why).
        train = scanned["train"]
        order = np.random.default_rng(seed).permutation(len(train.files))
        splits = {"train": _file_split([train.files[i] for i in order], train.labels[order]),
                  **{name: _file_split(s.files, s.labels) for name, s in scanned.items()
                     if name != "train"}}
        if "val" not in splits:  # carved from train: the validation set picks the best epoch
            index = stratified_split(train.labels, cfg.val_fraction, 0.0, seed)
            splits["train"], splits["val"] = (
                _file_split([train.files[i] for i in index[n]], train.labels[index[n]])
                for n in ("train", "val"))
            log.info("%s: no validation set given; %d of the %d training images held out as "
                     "validation (data.val_fraction=%g, the same fraction of every class, "
                     "seed %d)", where, len(index["val"]), len(train.files), cfg.val_fraction,
                     seed)
            if not len(index["val"]):
                raise TfkarpaError(f"{where}: no validation set given and data.val_fraction="
                                   f"{cfg.val_fraction:g} holds none out of train; give val/ "
                                   "or set data.val_fraction above 0")
        if "test" not in splits:
            log.info("%s: no test set given; the validation set is also the test set", where)
            splits["test"] = splits["val"]
        everything = [(f"{name}/{f.relative_to(given[name])}", d) for name, found in scanned.items()
                      for f, d in zip(found.files, found.digests)]
        sizes = [wh for found in scanned.values() for wh in found.sizes]
        skipped = [item for found in scanned.values() for item in found.skipped]
    else:
        found = _scan_folder(root, where, cfg)
        names, sizes, skipped = found.class_names, found.sizes, found.skipped
        everything = [(str(f.relative_to(root)), d) for f, d in zip(found.files, found.digests)]
        index = stratified_split(found.labels, cfg.val_fraction, cfg.test_fraction, seed)
        splits = {n: _file_split([found.files[i] for i in idx], found.labels[idx])
                  for n, idx in index.items()}
    digest = hashlib.sha256()
    for name, file_digest in everything:
        digest.update(name.encode() + b"\0" + file_digest)
    return SourceData(where, names, splits, digest.hexdigest(), skipped, sizes)


def tfds_builder(name: str, data_dir: str):
    """The TFDS builder for `name`, prepared on first use (the user named it, so fetching it is
    what they asked for); errors suggest close names and say where the data was looked for."""
    import tensorflow_datasets as tfds

    where = f"tfds:{name}"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as err:  # tfds raises several types for unknown or misspelled names
        close = difflib.get_close_matches(name, tfds.list_builders(), n=1)
        hint = f"; did you mean 'tfds:{close[0]}'?" if close else ""
        raise TfkarpaError(f"{where}: unknown TFDS data set ({err}){hint}") from None
    if not builder.info.splits:
        # Without network (or with a wrong data_dir) the error says where we looked.
        log.info("preparing %s in %s (downloads on first use)", where, builder.data_dir)
        try:
            builder.download_and_prepare()
        except Exception as err:
            raise TfkarpaError(
                f"{where}: not prepared in '{builder.data_dir}' and could not be downloaded "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "point data.data_dir at a prepared copy"
            ) from None
    return builder


def load_tfds(name: str, cfg: DataConfig, seed: int) -> SourceData:
    import tensorflow_datasets as tfds

    where = f"tfds:{name}"
    builder = tfds_builder(name, cfg.data_dir)
    info = builder.info
    image_key, label_key = _tfds_keys(info, where)
    class_names = list(info.features[label_key].names)
    if len(class_names) < 2:
        raise TfkarpaError(f"{where}: label feature '{label_key}' has fewer than 2 classes")
    channels = info.features[image_key].shape[-1]
    # Builders without split metadata (TFDS's mock_data in tests) still have the usual pair.
    available = set(info.splits.keys()) or {"train", "test"}
    if "train" not in available:
        raise TfkarpaError(f"{where}: has no 'train' split (splits: {', '.join(sorted(available))})")
    val_pct = int(round(cfg.val_fraction * 100))
    test_pct = int(round(cfg.test_fraction * 100))
    train_end = (100 - (0 if "validation" in available else val_pct)
                 - (0 if "test" in available else test_pct))
    split_names = {"train": f"train[:{train_end}%]" if train_end < 100 else "train"}
    split_names["val"] = ("validation" if "validation" in available
                          else f"train[{train_end}%:{train_end + val_pct}%]")
    split_names["test"] = "test" if "test" in available else f"train[{100 - test_pct}%:]"

    def split(tfds_split: str) -> Split:
        def make():
            ds = builder.as_dataset(split=tfds_split, shuffle_files=False,
                                    read_config=tfds.ReadConfig(shuffle_seed=seed))

            def pick(ex):
                image = ex[image_key]
                if channels == 1:
                    image = tf.image.grayscale_to_rgb(image)
                elif channels == 4:
                    image = image[..., :3]
                return image, tf.cast(ex[label_key], tf.int32)

            return ds.map(pick, num_parallel_calls=tf.data.AUTOTUNE)

        try:
            count = info.splits[tfds_split].num_examples
        except Exception:  # mocked builders may not know slice sizes
            count = -1
        return Split(count, make)

    fingerprint = hashlib.sha256(f"{info.full_name}|{split_names}".encode()).hexdigest()
    return SourceData(where, class_names, {n: split(s) for n, s in split_names.items()}, fingerprint)


def _tfds_keys(info, where: str) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    if info.supervised_keys and len(info.supervised_keys) == 2:
        image_key, label_key = info.supervised_keys
        if isinstance(image_key, str) and isinstance(label_key, str):
            return image_key, label_key
    features = info.features
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise TfkarpaError(f"{where}: not an image-classification data set (needs an Image and a "
                           "ClassLabel feature)")
    return images[0], labels[0]


SOURCES = {
    "digits": lambda arg, cfg, seed: load_digits(cfg, seed),
    "shapes": lambda arg, cfg, seed: load_shapes(cfg, seed),
    "tfds": lambda arg, cfg, seed: load_tfds(arg, cfg, seed),
    "folder": lambda arg, cfg, seed: load_folder(arg, cfg, seed),
    "tfrecord": lambda arg, cfg, seed: _load_tfrecord(arg, seed),
    "idx": lambda arg, cfg, seed: load_idx(arg, cfg, seed),
}
_NEEDS_ARG = {"tfds", "folder", "tfrecord", "idx"}


def _load_tfrecord(path: str, seed: int) -> SourceData:
    from tfkarpa.data import tfrecord  # it builds on this module

    return tfrecord.load(path, seed)


def load(cfg: DataConfig, seed: int = 0) -> SourceData:
    """Resolve `cfg.source` and return its checked splits (`cfg.seed`, if set, beats `seed`)."""
    seed = cfg.seed if cfg.seed >= 0 else seed
    kind, sep, arg = cfg.source.partition(":")
    if kind not in SOURCES:
        close = difflib.get_close_matches(kind, list(SOURCES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise TfkarpaError(
            f"config key 'data.source': unknown data source '{cfg.source}'{hint} "
            "(choose digits, shapes, tfds:NAME, folder:PATH, tfrecord:DIR or idx:DIR)"
        )
    if kind in _NEEDS_ARG and not arg:
        raise TfkarpaError(f"config key 'data.source': '{kind}' needs an argument, as in '{kind}:...'")
    if kind not in _NEEDS_ARG and sep:
        raise TfkarpaError(f"config key 'data.source': '{kind}' takes no argument")
    if kind != "folder" and (cfg.val or cfg.test):
        raise TfkarpaError(f"config keys 'data.val' / 'data.test' name separate folders for "
                           f"folder: sources, not {kind}")
    data = SOURCES[kind](arg, cfg, seed)
    if data.splits["train"].num_examples == 0:
        raise TfkarpaError(f"{data.source}: the train split is empty; add images or lower "
                           "data.val_fraction / data.test_fraction")
    return data


def require_splits(data: SourceData, names=("train", "val", "test")) -> None:
    """Training needs a validation and a test split; say so before any work starts."""
    for name in names:
        if data.splits[name].num_examples == 0:
            raise TfkarpaError(
                f"{data.source}: the {name} split is empty ({data.splits['train'].num_examples} "
                "training images); add images or raise data.val_fraction / data.test_fraction"
            )


def with_label_budget(data: SourceData, spec: str, seed: int) -> SourceData:
    """Keep only part of the training split's labelled images (`data.labels`): a share or a
    count of each class, drawn per class from `seed`. The same seed draws nested subsets (the
    1% images are among the 10% ones); validation and test splits are untouched."""
    kind, amount = parse_label_budget(spec)
    if kind == "fraction" and amount >= 1.0:
        return data
    train = data.splits["train"]
    if train.labels is None:  # labels are not held in memory (tfrecord, tfds): read them once
        log.info("reading the labels of %s to choose data.labels=%s", data.source, spec)
    labels = labels_of(train)
    rng = np.random.default_rng([seed, 1])
    chosen = []
    for cls in range(data.num_classes):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n = max(1, int(round(len(idx) * amount))) if kind == "fraction" else int(amount)
        chosen.append(idx[:min(n, len(idx))])
    keep = np.sort(np.concatenate(chosen))
    kept = subset(train, keep, labels)
    log.info("data.labels=%s: %d of %d training images keep their labels", spec, len(keep),
             len(labels))
    digest = hashlib.sha256(f"{data.fingerprint}|labels={spec}|{seed}".encode()).hexdigest()
    return SourceData(data.source, data.class_names, {**data.splits, "train": kept}, digest,
                      data.skipped, data.image_sizes)

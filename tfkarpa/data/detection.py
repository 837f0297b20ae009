"""Detection data: sources of images with boxes, and the tf.data pipeline that feeds detectors.

A detection source gives, per split, images with their boxes in absolute pixel `xyxy` (the
keras-cv name) and class indices: `shapes` (embedded scenes with several objects), `coco:JSON`,
`voc:DIR`, `yolo:DIR` (read and checked by `annotations`), and `tfds:voc/2007` /
`tfds:coco/2017` (TFDS's relative `yxyx` boxes converted by keras-cv). Ground truth stays in the
original image's pixels, which is where evaluation happens.

The pipeline letterboxes every image to `image_size` (one scale for both sides, padding at the
bottom and right), so a box maps back to the original image by one division. `letterbox` is the
same function in training and in the exported serving graph. Decoded, letterboxed images are
cached; augmentation is keras-cv's box-aware layers (flip, jittered resize, mosaic for
`strong`) on ragged boxes, and batches end as the dense, -1-padded
`{"boxes": [B, M, 4], "classes": [B, M]}` that keras-cv detectors train on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf

from tfkarpa.config import Config, DataConfig
from tfkarpa.data import annotations, masks, sources
from tfkarpa.data.pipeline import AUTOTUNE, concrete_size, finished, float32_layers
from tfkarpa.data.splits import check_class_names
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

BOX_FORMAT = "xyxy"
SOURCES = ("shapes", "coco", "voc", "yolo", "tfds")
SHAPES_SIZE = 64  # the side detection scenes are drawn at when data.image_size is auto
# TFDS detection sets tfkarpa maps to boxes + classes: name prefix -> (objects key, label key).
MIN_BOX_SIDE = 1.0  # px after letterboxing: a box thinner than a pixel is dropped (`seen_boxes`)
TFDS_DETECTION = {"voc": ("objects", "label"), "coco": ("objects", "label")}


@dataclass
class GroundTruth:
    """One image's truth in its own pixels: what evaluation compares predictions with."""

    name: str  # file path or "shapes[i]": how reports and errors name the image
    height: int
    width: int
    boxes: np.ndarray  # float32 [n, 4] xyxy pixels
    classes: np.ndarray  # int32 [n]
    image_id: int | None = None  # the annotation file's own id (COCO): results files keep it
    masks: list | None = None  # instance masks, one COCO RLE dict per box (`data.masks`)


@dataclass
class DetectionSplit:
    """`make()` yields (uint8 [H, W, 3] image, float32 [n, 4] xyxy boxes, int32 [n] classes)."""

    make: Callable[[], tf.data.Dataset]
    truth: list[GroundTruth]

    @property
    def num_examples(self) -> int:
        return len(self.truth)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(t.classes) for t in self.truth))

    @property
    def max_boxes(self) -> int:
        return max((len(t.classes) for t in self.truth), default=0)


@dataclass
class DetectionData:
    source: str
    class_names: list[str]
    splits: dict[str, DetectionSplit]
    fingerprint: str
    skipped: list[str] = field(default_factory=list)
    category_ids: list[int] | None = None  # the annotation file's id of each class (COCO)
    given_splits: bool = False  # the source came with its splits (used as given, not re-split)
    tiny_boxes: dict | None = None  # boxes under a pixel at the input size (`tiny_boxes`)

    def __post_init__(self):
        check_class_names(self.class_names, self.source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of every image: an auto `data.image_size` is chosen from them."""
        return [(t.width, t.height) for t in self.split("all").truth]

    def split(self, name: str) -> DetectionSplit:
        """A split by name; "all" is every image of the source (train, val, test in turn; a
        test split that repeats the validation files counts once)."""
        if name != "all":
            if name not in self.splits:
                raise TfkarpaError(f"split '{name}' is not one of train, val, test, all")
            return self.splits[name]
        parts = [s for n, s in self.splits.items()
                 if not (n == "test" and s is self.splits.get("val"))]

        def make():
            ds = parts[0].make()
            for part in parts[1:]:
                ds = ds.concatenate(part.make())
            return ds

        return DetectionSplit(make, [t for part in parts for t in part.truth])

    def summary(self) -> dict:
        boxes = {}
        for name, split in self.splits.items():
            counts = np.zeros(self.num_classes, np.int64)
            for t in split.truth:
                counts += np.bincount(t.classes, minlength=self.num_classes)
            boxes[name] = {c: int(n) for c, n in zip(self.class_names, counts)}
        from tfkarpa.data.sources import size_stats

        sizes = [(t.width, t.height) for split in self.splits.values() for t in split.truth]
        return {"source": self.source, "classes": self.class_names,
                "examples": {n: s.num_examples for n, s in self.splits.items()},
                "boxes": boxes, "fingerprint": self.fingerprint, "skipped": self.skipped,
                **({"tiny_boxes_dropped": self.tiny_boxes} if self.tiny_boxes else {}),
                **({"image_sizes": size_stats(sizes)} if sizes else {})}


# ---------------------------------------------------------------------------------- sources

def _split_indices(count: int, cfg: DataConfig, seed: int) -> dict[str, np.ndarray]:
    """A seeded random split by the configured fractions (detection images carry many classes,
    so there is no single label to stratify on)."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = int(round(count * cfg.test_fraction))
    n_val = int(round(count * cfg.val_fraction))
    if count >= 3:
        n_test = max(n_test, 1) if cfg.test_fraction > 0 else 0
        n_val = max(n_val, 1) if cfg.val_fraction > 0 else 0
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


def _ragged_boxes(truth: list[GroundTruth]):
    boxes = tf.ragged.constant([t.boxes.reshape(-1, 4) for t in truth], dtype=tf.float32,
                               ragged_rank=1, inner_shape=(4,))
    classes = tf.ragged.constant([t.classes for t in truth], dtype=tf.int32)
    return boxes, classes


def _array_split(images: np.ndarray, truth: list[GroundTruth]) -> DetectionSplit:
    def make():
        boxes, classes = _ragged_boxes(truth)
        return tf.data.Dataset.from_tensor_slices((images, boxes, classes))

    return DetectionSplit(make, truth)


def _file_split(truth: list[GroundTruth]) -> DetectionSplit:
    def make():
        paths = tf.constant([t.name for t in truth])
        boxes, classes = _ragged_boxes(truth)

        def read(path, b, c):
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            return image, b, c

        return tf.data.Dataset.from_tensor_slices((paths, boxes, classes)).map(
            read, num_parallel_calls=AUTOTUNE, deterministic=True)

    return DetectionSplit(make, truth)


def parse_objects(text: str) -> tuple[int, int]:
    """`data.objects`: '3' or '1-4' objects per generated scene."""
    low, _, high = str(text).partition("-")
    try:
        low, high = int(low), int(high or low)
    except ValueError:
        raise TfkarpaError(f"config key 'data.objects': expected N or MIN-MAX, got '{text}'") from None
    if not 0 <= low <= high or high == 0:
        raise TfkarpaError(f"config key 'data.objects': need 0 <= MIN <= MAX and MAX > 0, got '{text}'")
    return low, high


def load_shapes(cfg: DataConfig, seed: int, with_masks: bool = False) -> DetectionData:
    from tfkarpa.data import shapes

    low, high = parse_objects(cfg.objects)
    size = cfg.image_size or SHAPES_SIZE
    drawn = [] if with_masks else None  # each object's visible pixels, exact
    images, _, boxes, classes = shapes.generate(
        cfg.count, size, seed, num_objects=(low, high), min_scale=cfg.min_scale,
        max_scale=cfg.max_scale, max_iou=cfg.overlap, masks=drawn)
    truth = [GroundTruth(f"shapes[{i}]", size, size, b, c.astype(np.int32),
                         masks=masks.encode(drawn[i]) if with_masks else None)
             for i, (b, c) in enumerate(zip(boxes, classes))]
    parts = _split_indices(len(images), cfg, seed)
    digest = hashlib.sha256(images.tobytes())
    for t in truth:
        digest.update(t.boxes.tobytes() + t.classes.tobytes())
    splits = {name: _array_split(images[idx], [truth[i] for i in idx]) for name, idx in parts.items()}
    return DetectionData("shapes", list(shapes.CLASSES), splits, digest.hexdigest())


def _truth_of(found: annotations.DetectionSet) -> list[GroundTruth]:
    return [GroundTruth(str(e.path), e.height, e.width, e.boxes, e.classes, e.image_id, e.masks)
            for e in found.examples]


def _fingerprint(source: str, truth: list[GroundTruth]) -> str:
    digest = hashlib.sha256(source.encode())
    for t in truth:
        digest.update(t.name.encode() + t.boxes.tobytes() + t.classes.tobytes())
        digest.update(str(Path(t.name).stat().st_size).encode())
    return digest.hexdigest()


def _from_annotated(found: annotations.DetectionSet, cfg: DataConfig, seed: int) -> DetectionData:
    truth = _truth_of(found)
    parts = _split_indices(len(truth), cfg, seed)
    splits = {name: _file_split([truth[i] for i in idx]) for name, idx in parts.items()}
    return DetectionData(found.source, found.class_names, splits,
                         _fingerprint(found.source, truth), list(found.skipped),
                         found.category_ids)


def _from_given(sets: dict[str, annotations.DetectionSet], source: str) -> DetectionData:
    """Splits the user already made (separate annotation files, Ultralytics' data.yaml, VOC's
    ImageSets), used as given. Without a test set the validation set is also the test set."""
    train = sets["train"]
    for name, found in sets.items():
        if found.class_names != train.class_names or found.category_ids != train.category_ids:
            raise TfkarpaError(f"{found.source}: its classes {found.class_names[:6]} (ids "
                               f"{found.category_ids}) differ from the training set's "
                               f"{train.class_names[:6]} (ids {train.category_ids}) in "
                               f"{train.source}; the {name} split must name the same classes")
    if "test" not in sets:
        log.info("%s: no test set given; the validation set (%s) is also the test set", source,
                 sets["val"].source)
    truth = {name: _truth_of(found) for name, found in sets.items()}
    splits = {name: _file_split(t) for name, t in truth.items()}
    splits.setdefault("test", splits["val"])
    fingerprint = _fingerprint(source, [t for part in truth.values() for t in part])
    skipped = [item for found in sets.values() for item in found.skipped]
    return DetectionData(source, train.class_names, splits, fingerprint, skipped,
                         train.category_ids, given_splits=True)


def _voc_given(found: annotations.DetectionSet, lists: dict[str, set[str]]) -> dict:
    """A VOC set cut by its ImageSets lists (image ids are the image files' stems)."""
    out = {}
    for split, ids in lists.items():
        examples = [e for e in found.examples if e.path.stem in ids]
        if not examples:
            raise TfkarpaError(f"{found.source}: ImageSets/Main/{split}.txt names no image "
                               "that has a usable annotation")
        out[split] = annotations.DetectionSet(f"{found.source}[{split}]", found.class_names,
                                              examples, found.skipped if split == "train" else [])
    return out


def load_tfds(name: str, cfg: DataConfig, seed: int) -> DetectionData:
    """TFDS detection sets (voc/*, coco/*): relative yxyx boxes become pixel xyxy (keras-cv)."""
    from tfkarpa import kcv
    bounding_box = kcv.load().bounding_box

    where = f"tfds:{name}"
    family = name.split("/")[0]
    if family not in TFDS_DETECTION:
        raise TfkarpaError(f"{where}: not a detection data set tfkarpa maps (choose "
                           f"{', '.join(f'tfds:{k}/...' for k in TFDS_DETECTION)})")
    objects_key, label_key = TFDS_DETECTION[family]
    builder = sources.tfds_builder(name, cfg.data_dir)
    info = builder.info
    class_names = list(info.features[objects_key][label_key].names)
    available = set(info.splits.keys()) or {"train", "validation", "test"}
    names = {"train": "train", "val": "validation" if "validation" in available else "test",
             "test": "test" if "test" in available else "validation"}

    def examples(tfds_split: str) -> tf.data.Dataset:
        ds = builder.as_dataset(split=tfds_split, shuffle_files=False)

        def pick(ex):
            image = ex["image"]
            image = image[..., :3] if image.shape[-1] != 1 else tf.image.grayscale_to_rgb(image)
            shape = tf.shape(image)
            boxes = bounding_box.convert_format(
                tf.reshape(tf.cast(ex[objects_key]["bbox"], tf.float32), (-1, 4)),
                source="rel_yxyx", target=BOX_FORMAT, images=image)
            labels = tf.cast(ex[objects_key][label_key], tf.int32)
            if "is_crowd" in ex[objects_key]:  # COCO's crowd regions are "ignore" areas
                keep = tf.logical_not(ex[objects_key]["is_crowd"])
                boxes, labels = tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep)
            return image, boxes, labels, shape[0], shape[1]

        return ds.map(pick, num_parallel_calls=AUTOTUNE)

    problems = annotations._Problems(where, cfg.skip_bad)
    splits = {}
    for ours, theirs in names.items():
        # Truth is read once and checked like any annotation file; training then pairs TFDS's
        # images with these checked boxes (evaluation needs them in memory anyway).
        truth = []
        for i, (_, b, c, h, w) in enumerate(examples(theirs)):
            name, b, c = f"{where}[{theirs}][{i}]", b.numpy(), c.numpy()
            if len(b) != len(c):
                problems.add(f"{name}: {len(b)} boxes but {len(c)} labels")
                b, c = b[:0], c[:0]  # the image stays (the zip with images needs it), unlabelled
            keep = np.ones(len(c), bool)
            for k, box in enumerate(b):
                problem = annotations.box_problem(box, int(w), int(h))
                if problem or not 0 <= c[k] < len(class_names):
                    problems.add(f"{name} object {k}: {problem or f'class {c[k]} unknown'}")
                    keep[k] = False
            truth.append(GroundTruth(name, int(h), int(w), b[keep], c[keep]))
        splits[ours] = _tfds_split(examples, theirs, truth)
    skipped = problems.finish()
    fingerprint = hashlib.sha256(f"{info.full_name}|{names}".encode()).hexdigest()
    return DetectionData(where, class_names, splits, fingerprint, skipped)


def _tfds_split(examples, tfds_split: str, truth: list[GroundTruth]) -> DetectionSplit:
    def make():
        boxes, classes = _ragged_boxes(truth)
        images = examples(tfds_split).map(lambda x, b, c, h, w: x)
        return tf.data.Dataset.zip(images, tf.data.Dataset.from_tensor_slices((boxes, classes))
                                   ).map(lambda x, bc: (x, bc[0], bc[1]))

    return DetectionSplit(make, truth)


def _load_files(kind: str, arg: str, cfg: DataConfig, seed: int,
                with_masks: bool = False) -> DetectionData:
    """coco:, voc:, yolo: sources, with the splits they come with or `data.val` / `data.test`
    (annotation files or folders of the same kind), else split by the configured fractions."""
    def read(target: str, images: str = "") -> annotations.DetectionSet:
        return {"coco": lambda: annotations.load_coco(target, images or None, cfg.skip_bad,
                                                      with_masks),
                "voc": lambda: annotations.load_voc(target, cfg.skip_bad),
                "yolo": lambda: annotations.load_yolo(target, cfg.skip_bad)}[kind]()

    source = f"{kind}:{arg}"
    given = {name: _same_kind(getattr(cfg, name), kind) for name in ("val", "test")
             if getattr(cfg, name)}
    if kind == "yolo" and arg.endswith((".yaml", ".yml")):
        if given:
            raise TfkarpaError(f"{source}: the data.yaml names its own splits; drop data.val / "
                               "data.test")
        return _from_given(annotations.load_yolo_yaml(arg, cfg.skip_bad), source)
    if kind == "coco" and Path(arg).is_dir():
        if given:
            raise TfkarpaError(f"{source}: a COCO folder brings its own splits; drop data.val / "
                               "data.test, or name the training file as coco:FILE")
        files = annotations.coco_split_files(arg)
        if not files:
            raise TfkarpaError(f"{source}: no COCO annotation files found (looked for "
                               "annotations/instances_train.json and "
                               "train/_annotations.coco.json); name the file as coco:FILE")
        sets = {name: read(str(path)) for name, path in files.items()}
        if "val" not in sets:  # carved from train, as folder: sources do
            if "test" not in sets:
                return _from_annotated(sets["train"], cfg, seed)
            sets["train"], sets["val"] = _carve_val(sets["train"], cfg.val_fraction, seed)
            log.info("%s: no validation file; %d of the training images are the validation "
                     "set (data.val_fraction=%g)", source, len(sets["val"].examples),
                     cfg.val_fraction)
        return _from_given(sets, source)
    if given:
        if "val" not in given:
            raise TfkarpaError("config key 'data.test' needs 'data.val' too (the validation set "
                               "picks the best epoch)")
        return _from_given({"train": read(arg, cfg.images),
                            **{n: read(t, getattr(cfg, f"{n}_images")) for n, t in given.items()}},
                           source)
    found = read(arg, cfg.images)
    lists = annotations.voc_image_sets(arg) if kind == "voc" else None
    if lists:
        return _from_given(_voc_given(found, lists), source)
    return _from_annotated(found, cfg, seed)


def _carve_val(found: annotations.DetectionSet, fraction: float,
               seed: int) -> tuple[annotations.DetectionSet, annotations.DetectionSet]:
    """(train, val) cut from one annotated set by a seeded random `fraction` (at least one)."""
    order = np.random.default_rng(seed).permutation(len(found.examples))
    n_val = max(1, int(round(len(order) * fraction)))
    if len(order) - n_val < 1:
        raise TfkarpaError(f"{found.source}: {len(order)} image(s) cannot give a validation "
                           "set; add images or a validation file")
    held = set(order[:n_val].tolist())

    def part(keep, skipped):
        return dataclasses.replace(found, skipped=skipped, examples=[
            e for i, e in enumerate(found.examples) if (i in held) == keep])

    return part(False, found.skipped), part(True, [])  # the skipped files named once


def _same_kind(target: str, kind: str) -> str:
    """`data.val=val.json` or `data.val=coco:val.json`: a path of the training source's kind."""
    prefix, sep, rest = target.partition(":")
    if sep and prefix in SOURCES:
        if prefix != kind:
            raise TfkarpaError(f"config keys 'data.val' / 'data.test': '{target}' is a {prefix} "
                               f"source, the training data is {kind}")
        return rest
    return target


def load(cfg: DataConfig, seed: int = 0, with_masks: bool = False) -> DetectionData:
    """Resolve `cfg.source` as a detection source and return its checked splits; with
    `with_masks`, every box's instance mask too (shapes and coco: sources)."""
    seed = cfg.seed if cfg.seed >= 0 else seed
    kind, sep, arg = cfg.source.partition(":")
    if kind not in SOURCES:
        raise TfkarpaError(f"config key 'data.source': '{cfg.source}' is not a detection source "
                           "(choose shapes, coco:ANNOTATIONS.json, voc:DIR, yolo:DIR, "
                           "tfds:voc/2007 or tfds:coco/2017)")
    if with_masks and kind not in ("shapes", "coco"):
        raise TfkarpaError(f"config key 'data.source': instance masks come from shapes or "
                           f"coco:ANNOTATIONS.json (polygons or RLE), not {kind}")
    if kind != "shapes" and not arg:
        raise TfkarpaError(f"config key 'data.source': '{kind}' needs an argument, as in '{kind}:...'")
    if kind in ("shapes", "tfds") and (cfg.val or cfg.test):
        raise TfkarpaError(f"config keys 'data.val' / 'data.test' name separate files for "
                           f"coco:, voc:, yolo: and folder: sources, not {kind}")
    if kind == "shapes":
        if sep:
            raise TfkarpaError("config key 'data.source': 'shapes' takes no argument")
        data = load_shapes(cfg, seed, with_masks)
    elif kind == "tfds":
        data = load_tfds(arg, cfg, seed)
    else:
        data = _load_files(kind, arg, cfg, seed, with_masks)
    if data.splits["train"].num_examples == 0:
        raise TfkarpaError(f"{data.source}: the train split is empty; add images or lower "
                           "data.val_fraction / data.test_fraction")
    if not data.splits["train"].num_boxes:
        raise TfkarpaError(f"{data.source}: the train split has no boxes to learn from")
    return data


# --------------------------------------------------------------------------------- pipeline

def letterbox(images: tf.Tensor, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """uint8 image(s) [..., H, W, 3] -> (uint8 [..., size, size, 3], scale).

    One scale for both sides (aspect kept), content at the top left, zero padding: a box in the
    letterboxed image is the original box times `scale`. At the model's size it is the identity.
    Written here rather than with keras-cv's `Resizing(pad_to_aspect_ratio=True)` because the
    serving graph needs the scale to map boxes back, and that layer does not return it.
    """
    if images.shape[-3] == size and images.shape[-2] == size:
        return images, tf.constant(1.0)
    shape = tf.shape(images)
    height, width = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    scale = size / tf.maximum(height, width)
    new = tf.stack([tf.maximum(1, tf.cast(tf.round(height * scale), tf.int32)),
                    tf.maximum(1, tf.cast(tf.round(width * scale), tf.int32))])
    resized = tf.image.resize(images, new, method="bilinear", antialias=True)
    resized = tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
    return tf.image.pad_to_bounding_box(resized, 0, 0, size, size), scale


def seen_boxes(boxes, scale):
    """Which xyxy boxes stay at least MIN_BOX_SIDE px wide and high at `scale`: a thinner one (a
    5000 x 50 image letterboxed to 64 px shrinks a 10 px box to 0.13 px) is no object the model
    can see, only a target that teaches it to fire on padding. The pipelines drop them."""
    sides = (boxes[..., 2:] - boxes[..., :2]) * scale
    return tf.reduce_all(sides >= MIN_BOX_SIDE, axis=-1)


def tiny_boxes(data: DetectionData, size: int) -> dict:
    """The boxes `seen_boxes` drops at input side `size`, per split, for the manifest and the
    log: {"min_side_px", "count" {split: n}, "examples" [first 20, naming image and box]}.
    Evaluation still scores predictions against them (in the image's own pixels)."""
    counts, examples = {}, []
    for name, split in data.splits.items():
        counts[name] = 0
        for t in split.truth:
            if not len(t.boxes):
                continue
            scale = size / max(t.height, t.width)
            sides = (t.boxes[:, 2:] - t.boxes[:, :2]) * scale
            for k in np.flatnonzero((sides < MIN_BOX_SIDE).any(axis=1)):
                counts[name] += 1
                if len(examples) < 20:
                    w, h = sides[k]
                    examples.append(f"{t.name}: box {int(k)} is {w:.2f} x {h:.2f} px at "
                                    f"data.image_size={size}")
    return {"min_side_px": MIN_BOX_SIDE, "count": counts, "examples": examples}


def augmenter(strength: str, flip: bool, size: int, seed: int | None):
    """keras-cv's box-aware augmentation for batches of {"images", "bounding_boxes"}, or None."""
    if strength == "off":
        return None
    from tfkarpa import kcv
    keras_cv = kcv.load()

    with float32_layers():
        layers = []
        if strength == "strong":
            layers.append(keras_cv.layers.Mosaic(bounding_box_format=BOX_FORMAT, seed=seed))
        if flip:
            layers.append(keras_cv.layers.RandomFlip("horizontal", bounding_box_format=BOX_FORMAT,
                                                     seed=seed))
        scale = (0.75, 1.3) if strength == "light" else (0.5, 1.5)
        layers.append(keras_cv.layers.JitteredResize(
            target_size=(size, size), scale_factor=scale, bounding_box_format=BOX_FORMAT,
            seed=seed))
        return tf.keras.Sequential(layers, name=f"detect_augment_{strength}")


def max_boxes(data: DetectionData, cfg: Config) -> int:
    """Padding length of the dense box tensors: every training image's boxes fit (mosaic puts
    up to four images' boxes in one)."""
    most = max(s.max_boxes for s in data.splits.values())
    if cfg.data.augment == "strong":
        most *= 4
    return max(1, most)


def make_dataset(split: DetectionSplit, cfg: Config, training: bool, boxes: int,
                 batch_size: int | None = None, workers: int = 1,
                 padded: bool = False) -> tf.data.Dataset:
    """Batches of (float32 images [B, S, S, 3] in [0, 255], {"boxes", "classes"} dense -1-padded
    to `boxes`), letterboxed to `data.image_size`; training shuffles and augments.

    `padded` (validation under multi-worker strategies) fills the last batch with copies of the
    first image, so that every worker runs the same number of full batches. The copies count
    in the validation loss only: the validation mAP is scored on the split itself."""
    from tfkarpa import kcv
    bounding_box = kcv.load().bounding_box

    size = concrete_size(cfg)
    batch_size = batch_size or cfg.batch_size

    def fit(image, b, c):
        image, scale = letterbox(image, size)
        keep = seen_boxes(b, scale)  # counted in the manifest (`tiny_boxes`)
        return image, tf.boolean_mask(b, keep) * scale, tf.boolean_mask(c, keep)

    ds = split.make().map(fit, num_parallel_calls=AUTOTUNE)
    if cfg.data.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(cfg.data.shuffle_buffer, max(1, split.num_examples)), seed=cfg.seed,
                        reshuffle_each_iteration=True)

    def as_dict(image, b, c):
        image = tf.ensure_shape(tf.cast(image, tf.float32), (size, size, 3))
        return {"images": image, "bounding_boxes": {"boxes": b, "classes": tf.cast(c, tf.float32)}}

    ds = ds.map(as_dict, num_parallel_calls=AUTOTUNE)
    if padded:
        ds = ds.concatenate(ds.take(1).repeat((-split.num_examples) % batch_size))
    ds = ds.ragged_batch(batch_size, drop_remainder=padded)
    aug = augmenter(cfg.data.augment, cfg.data.flip, size, cfg.seed) if training else None

    def to_model(batch):
        if aug is not None:
            batch = aug(batch, training=True)
        dense = bounding_box.to_dense(batch["bounding_boxes"], max_boxes=boxes)
        return batch["images"], {"boxes": tf.reshape(dense["boxes"], (-1, boxes, 4)),
                                 "classes": tf.reshape(dense["classes"], (-1, boxes))}

    ds = ds.map(to_model, num_parallel_calls=AUTOTUNE)
    return finished(ds, split, cfg, training, workers, by_file=False)


def make_mask_dataset(split: DetectionSplit, cfg: Config, training: bool, boxes: int,
                      batch_size: int | None = None, workers: int = 1,
                      padded: bool = False) -> tf.data.Dataset:
    """`make_dataset` with instance masks: (float32 images [B, S, S, 3], {"boxes", "classes"
    (-1 padded to `boxes`), "masks" uint8 [B, boxes, S, S]}), letterboxed like the images.

    Each image's masks are decoded from their RLEs as it is read (pycocotools; a few hundred
    bytes per object stay in memory, not the pixels). Training may flip horizontally
    (`data.flip`), masks and boxes with the image; keras-cv's augmentation layers know boxes,
    not masks, so nothing else."""
    size = concrete_size(cfg)
    batch_size = batch_size or cfg.batch_size
    shapes = tf.constant([[t.height, t.width] for t in split.truth], tf.int32)

    def decode(index):
        t = split.truth[int(index)]
        return masks.decode(t.masks or [], t.height, t.width)

    def read_masks(index):
        drawn = tf.numpy_function(decode, [index], tf.uint8, stateful=False)
        return tf.reshape(drawn, tf.concat([[-1], shapes[index]], 0))

    def fit(item, index):
        image, b, c = item
        boxed, scale = letterbox(image, size)
        drawn = _letterboxed_masks(read_masks(index), shapes[index], scale, size)
        # The content's width in the letterbox (it sits at the top left): what a flip mirrors.
        width = tf.minimum(size, tf.maximum(1, tf.cast(tf.round(
            tf.cast(shapes[index][1], tf.float32) * scale), tf.int32)))
        keep = seen_boxes(b, scale)  # counted in the manifest (`tiny_boxes`)
        return (boxed, tf.boolean_mask(b, keep) * scale, tf.boolean_mask(c, keep),
                tf.boolean_mask(drawn, keep), width)

    ds = tf.data.Dataset.zip((split.make(), tf.data.Dataset.range(split.num_examples)))
    ds = ds.map(fit, num_parallel_calls=AUTOTUNE)
    if cfg.data.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(cfg.data.shuffle_buffer, max(1, split.num_examples)), seed=cfg.seed,
                        reshuffle_each_iteration=True)
    if training and cfg.data.flip:
        ds = ds.map(_random_flip(size, cfg.seed))
    else:
        ds = ds.map(lambda image, b, c, drawn, width: (image, b, c, drawn))

    def as_model(image, b, c, drawn):
        return (tf.ensure_shape(tf.cast(image, tf.float32), (size, size, 3)),
                {"boxes": b, "classes": tf.cast(c, tf.float32), "masks": drawn})

    ds = ds.map(as_model, num_parallel_calls=AUTOTUNE)
    if padded:
        ds = ds.concatenate(ds.take(1).repeat((-split.num_examples) % batch_size))
    ds = ds.padded_batch(batch_size, padded_shapes=(
        [size, size, 3], {"boxes": [boxes, 4], "classes": [boxes], "masks": [boxes, size, size]}),
        padding_values=(0.0, {"boxes": -1.0, "classes": -1.0, "masks": tf.constant(0, tf.uint8)}),
        drop_remainder=padded)
    return finished(ds, split, cfg, training, workers, by_file=False)


def _letterboxed_masks(drawn, shape, scale, size: int):
    """Masks [N, H, W] of an image of `shape` scaled like the letterboxed image: resized by
    `scale` and padded at the bottom right to `size` x `size`."""
    if drawn.shape[-1] == size and drawn.shape[-2] == size:
        return drawn
    new = tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32)
    drawn = tf.image.resize(tf.cast(drawn[..., None], tf.float32), tf.maximum(new, 1))
    return tf.image.pad_to_bounding_box(tf.cast(drawn >= 0.5, tf.uint8), 0, 0, size,
                                        size)[..., 0]


def _random_flip(size: int, seed: int):
    """A map that flips half the letterboxed examples horizontally, masks and boxes with the
    image. Only the content mirrors: columns 0..width-1 reversed, the padding stays right."""
    rng = tf.random.Generator.from_seed(seed)

    def flip(image, b, c, drawn, width):
        def mirrored():
            columns = tf.concat([tf.reverse(tf.range(width), [0]), tf.range(width, size)], 0)
            x0, x1 = tf.cast(width, tf.float32) - b[:, 2], tf.cast(width, tf.float32) - b[:, 0]
            return (tf.gather(image, columns, axis=1),
                    tf.stack([x0, b[:, 1], x1, b[:, 3]], axis=-1),
                    tf.gather(drawn, columns, axis=2))

        image, b, drawn = tf.cond(rng.uniform([]) < 0.5, mirrored, lambda: (image, b, drawn))
        return image, b, c, drawn

    return flip


def images_of(split: DetectionSplit, size: int, count: int | None = None):
    """(letterboxed uint8 images [N, S, S, 3], scales [N]) of a split, in order."""
    ds = split.make()
    if count is not None:
        ds = ds.take(count)
    images, scales = [], []
    for image, scale in ds.map(lambda x, b, c: letterbox(x, size), num_parallel_calls=AUTOTUNE):
        images.append(image.numpy())
        scales.append(float(scale))
    if not images:
        return np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.float32)
    return np.stack(images), np.array(scales, np.float32)

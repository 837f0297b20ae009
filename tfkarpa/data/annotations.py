"""Box annotations in the formats people have: COCO JSON, Pascal VOC XML, YOLO txt.

Each reader returns a `DetectionSet`: class names and, per image, its file, size, boxes as
absolute pixel `xyxy` (float32 [n, 4]) and class indices. Formats are converted with keras-cv's
`bounding_box.convert_format`, never by hand. Every annotation is checked once, here: the image
exists inside the data directory and decodes, boxes have positive size and lie inside the
image, class ids are known, ids are unique. Problems are errors that name the file, the
annotation (COCO id, VOC object, YOLO line) and what is wrong; with `skip_bad=True` the bad
annotations (or images) are left out and listed in `skipped`. Images without objects are fine.
COCO files may bring instance masks (`segmentation` polygons or RLE, `load_coco(with_masks=
True)`), checked the same way: empty, misshapen or out-of-image masks name their annotation.

Annotation files are untrusted input: a path in them cannot leave the data directory, XML is
parsed by expat (whose entity-expansion limits stop "billion laughs" documents), and nothing
is ever unpickled or evaluated.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tfkarpa.data import masks
from tfkarpa.errors import TfkarpaError

log = logging.getLogger(__name__)

# Boxes may touch the border; allow rounding in tools that write float coordinates.
_EDGE = 0.5


@dataclass
class Annotated:
    path: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 [n, 4], absolute pixels, xyxy
    classes: np.ndarray  # int32 [n]
    image_id: int | None = None  # the annotation file's own id (COCO), kept for results files
    masks: list | None = None  # with masks=True (COCO): one RLE dict per box (`data.masks`)


@dataclass
class DetectionSet:
    source: str
    class_names: list[str]
    examples: list[Annotated]
    skipped: list[str] = field(default_factory=list)
    category_ids: list[int] | None = None  # the file's own id of each class (COCO)

    @property
    def num_boxes(self) -> int:
        return int(sum(len(e.classes) for e in self.examples))


def convert_boxes(boxes: np.ndarray, source: str, target: str = "xyxy",
                  image_shape: tuple[int, int] | None = None) -> np.ndarray:
    """keras-cv's format conversion on a NumPy array (image_shape for relative formats)."""
    from tfkarpa import kcv
    bounding_box = kcv.load().bounding_box

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return boxes
    shape = None if image_shape is None else (int(image_shape[0]), int(image_shape[1]), 3)
    out = bounding_box.convert_format(boxes, source=source, target=target, image_shape=shape)
    return np.asarray(out, np.float32)


def inside(root: Path, relative: str, where: str) -> Path:
    """`root / relative`, refused when the path as written leaves `root`: absolute, or climbing
    out with `..`. Every source that reads paths from a file checks them here. The text is
    checked, not the resolved target: a symlink the user placed in their own folder is theirs."""
    text = os.path.normpath(relative)
    if os.path.isabs(relative) or text == ".." or text.startswith(".." + os.sep):
        raise TfkarpaError(f"{where}: path '{relative}' leaves the data directory '{root}'")
    return (Path(root) / relative).absolute()


def box_problem(box: np.ndarray, width: int, height: int) -> str | None:
    """Why an xyxy pixel box is unusable in a width x height image, or None."""
    x0, y0, x1, y1 = (float(v) for v in box)
    shown = [round(float(v), 2) for v in box]
    if not np.all(np.isfinite(box)):
        return f"box {shown} is not finite"
    if x1 <= x0 or y1 <= y0:
        return f"box {shown} has no area (xyxy)"
    if x0 < -_EDGE or y0 < -_EDGE or x1 > width + _EDGE or y1 > height + _EDGE:
        return f"box {shown} (xyxy) extends outside the {width}x{height} image"
    return None


class _Problems:
    """Collects problems; raises them together, or records them as skipped."""

    def __init__(self, where: str, skip_bad: bool):
        self.where, self.skip_bad, self.items = where, skip_bad, []

    def add(self, text: str) -> None:
        self.items.append(text)

    def finish(self) -> list[str]:
        if self.items and not self.skip_bad:
            listing = "; ".join(self.items[:5])
            more = f" (and {len(self.items) - 5} more)" if len(self.items) > 5 else ""
            raise TfkarpaError(f"{self.where}: {len(self.items)} bad annotation(s): {listing}{more}. "
                               "Fix them, or pass data.skip_bad=true to leave them out.")
        for item in self.items:
            log.warning("skipping %s", item)
        return list(self.items)


def _image_problem(path: Path) -> str | None:
    from tfkarpa.data.sources import _check_image_file

    if not path.is_file():
        return "image file does not exist"
    return _check_image_file(path)[0]


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        return img.size  # (width, height)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TfkarpaError(f"{path}: no such annotation file") from None
    except UnicodeDecodeError:
        raise TfkarpaError(f"{path}: not a text (UTF-8) file") from None
    except json.JSONDecodeError as err:
        raise TfkarpaError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column "
                           f"{err.colno})") from None


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def coco_images(annotations: str | Path, images: str | Path | None = None) -> Path:
    """The folder a COCO file's `file_name`s are relative to: `images` when given; else COCO's
    own layout, ROOT/annotations/instances_<split>.json with its images in ROOT/<split>/ (or
    ROOT/images/<split>/: train2017, val2017, val, ...) when that folder exists; else the
    file's own folder (Roboflow's train/_annotations.coco.json, and most hand-made sets). Each
    annotation file has its own: a validation file's images are not looked for in the
    training images' folder."""
    path = Path(annotations)
    if images:
        return Path(images)
    split = path.stem[len("instances_"):] if path.stem.startswith("instances_") else ""
    if split and path.parent.name == "annotations":
        for folder in (path.parent.parent / split, path.parent.parent / "images" / split):
            if folder.is_dir():
                return folder
    return path.parent


# COCO files of a folder as sets ship them, split by split: COCO's own
# annotations/instances_<split>.json (train2017, val2017, ...) and Roboflow's
# <split>/_annotations.coco.json (train/, valid/, test/).
_COCO_SPLITS = {"train": ("train", "train2017", "train2014"),
                "val": ("val", "val2017", "val2014", "valid", "validation"),
                "test": ("test", "test2017", "test2014")}


def coco_split_files(directory: str | Path) -> dict[str, Path]:
    """{split: annotation file} found in a COCO folder (`coco:DIR`); {} when it holds none."""
    root = Path(directory)
    found = {}
    for split, names in _COCO_SPLITS.items():
        candidates = [path for name in names
                      for path in (root / "annotations" / f"instances_{name}.json",
                                   root / name / "_annotations.coco.json")
                      if path.is_file()]
        if len(candidates) > 1:
            raise TfkarpaError(f"coco:{root}: {len(candidates)} {split} annotation files "
                               f"({', '.join(str(c.relative_to(root)) for c in candidates)}); "
                               "name the one to use as coco:FILE")
        if candidates:
            found[split] = candidates[0]
    if found and "train" not in found:
        raise TfkarpaError(f"coco:{root}: {', '.join(sorted(found))} annotation files but no "
                           "training one (annotations/instances_train.json or "
                           "train/_annotations.coco.json)")
    return found


# Long: one pass over the format that checks each field where it reads it, so an error names
# the file, the entry and the field; split up, that context would be passed around.
def load_coco(annotations: str | Path, images: str | Path | None = None,
              skip_bad: bool = False, with_masks: bool = False) -> DetectionSet:
    """COCO object-detection JSON; images where `coco_images` finds them. `with_masks`: each
    annotation's `segmentation` (polygons or RLE) too, read and checked by `data.masks`."""
    path = Path(annotations)
    root = coco_images(path, images)
    where = f"coco:{path}"
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise TfkarpaError(f"{path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise TfkarpaError(f"{path}: missing key '{key}' (a list)")

    categories = {}
    for i, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or not _int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise TfkarpaError(f"{path}: categories[{i}] needs an integer 'id' and a 'name'")
        if cat["id"] in categories:
            raise TfkarpaError(f"{path}: category id {cat['id']} appears twice")
        categories[cat["id"]] = cat["name"]
    if not categories:
        raise TfkarpaError(f"{path}: 'categories' is empty")
    order = sorted(categories)
    index = {cid: i for i, cid in enumerate(order)}

    problems = _Problems(where, skip_bad)
    image_info = {}
    for i, img in enumerate(doc["images"]):
        if not isinstance(img, dict) or not _int(img.get("id")) or not isinstance(
                img.get("file_name"), str):
            raise TfkarpaError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'")
        if img["id"] in image_info:
            raise TfkarpaError(f"{path}: image id {img['id']} appears twice")
        w, h = img.get("width"), img.get("height")
        if not (_int(w) and _int(h) and w > 0 and h > 0):
            raise TfkarpaError(f"{path}: image id {img['id']} ('{img['file_name']}') needs positive "
                               "integer 'width' and 'height'")
        image_info[img["id"]] = img

    boxes = {image_id: [] for image_id in image_info}
    seen, crowd = set(), 0
    for i, ann in enumerate(doc["annotations"]):
        if not isinstance(ann, dict) or not _int(ann.get("id")):
            raise TfkarpaError(f"{path}: annotations[{i}] needs an integer 'id'")
        aid = ann["id"]
        if aid in seen:
            raise TfkarpaError(f"{path}: annotation id {aid} appears twice")
        seen.add(aid)
        img = image_info.get(ann.get("image_id"))
        if img is None:
            problems.add(f"annotation id {aid}: image_id {ann.get('image_id')!r} is not in 'images'")
            continue
        label = f"annotation id {aid} (image '{img['file_name']}')"
        if ann.get("category_id") not in index:
            problems.add(f"{label}: unknown category_id {ann.get('category_id')!r}")
            continue
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            problems.add(f"{label}: 'bbox' must be 4 numbers [x, y, width, height]")
            continue
        if ann.get("iscrowd"):
            crowd += 1  # crowd regions are "ignore" areas in COCO, not objects to learn
            continue
        if bbox[2] <= 0 or bbox[3] <= 0:
            problems.add(f"{label}: bbox {bbox} has non-positive width or height")
            continue
        box = convert_boxes(np.array(bbox, np.float32), "xywh")[0]
        problem = box_problem(box, img["width"], img["height"])
        if problem:
            problems.add(f"{label}: {problem}")
            continue
        mask = None
        if with_masks:
            if "segmentation" not in ann:
                problems.add(f"{label}: no 'segmentation' (instance masks need one per object)")
                continue
            mask, problem = masks.from_coco(ann["segmentation"], img["height"], img["width"])
            if problem:
                problems.add(f"{label}: {problem}")
                continue
        boxes[img["id"]].append((box, index[ann["category_id"]], mask))

    examples = []
    for image_id, img in image_info.items():
        label = f"image id {image_id} ('{img['file_name']}')"
        try:
            file = inside(root, img["file_name"], f"{path}: {label}")
        except TfkarpaError as err:
            problems.add(str(err).split(": ", 1)[1])
            continue
        problem = _image_problem(file)
        if problem:
            problems.add(f"{label} at {file}: {problem}")
            continue
        size = _image_size(file)
        if size != (img["width"], img["height"]):
            problems.add(f"{label}: the file is {size[0]}x{size[1]}, the JSON says "
                         f"{img['width']}x{img['height']}")
            continue
        items = boxes[image_id]
        examples.append(Annotated(
            file, img["width"], img["height"],
            np.array([b for b, _, _ in items], np.float32).reshape(-1, 4),
            np.array([c for _, c, _ in items], np.int32), image_id,
            [m for _, _, m in items] if with_masks else None))
    skipped = problems.finish()
    if crowd:
        log.info("%s: %d crowd annotation(s) left out of training", where, crowd)
    if not examples:
        raise TfkarpaError(f"{where}: no usable images")
    return DetectionSet(where, [categories[c] for c in order], examples, skipped, order)


def coco_ids(annotations: str | Path, files: list[Path], class_names: list[str],
             images: str | Path | None = None) -> tuple[list[int], list[int]]:
    """The ids a COCO file gives `files` (matched by path, else by unique file name) and
    `class_names` (matched by name): so results written with them score against that file."""
    path = Path(annotations)
    doc = _read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list)
                                            for k in ("images", "categories")):
        raise TfkarpaError(f"{path}: expected a COCO file with 'images' and 'categories' lists")
    root = coco_images(path, images).resolve()
    by_path, by_name = {}, {}
    for img in doc["images"]:
        if isinstance(img, dict) and _int(img.get("id")) and isinstance(img.get("file_name"), str):
            by_path[(root / img["file_name"]).resolve()] = img["id"]
            by_name.setdefault(Path(img["file_name"]).name, []).append(img["id"])
    ids = []
    for file in files:
        found = by_path.get(Path(file).resolve())
        if found is None and len(by_name.get(Path(file).name, [])) == 1:
            found = by_name[Path(file).name][0]
        if found is None:
            raise TfkarpaError(f"{path}: no image entry for '{file}' (matched by path under "
                               f"{root}, then by file name)")
        ids.append(found)
    categories = {c.get("name"): c.get("id") for c in doc["categories"] if isinstance(c, dict)}
    missing = [n for n in class_names if not _int(categories.get(n))]
    if missing:
        raise TfkarpaError(f"{path}: no category named {', '.join(missing)} (the model's classes "
                           f"are {', '.join(class_names)})")
    return ids, [categories[n] for n in class_names]


def _voc_number(obj: ET.Element, tag: str) -> float:
    node = obj.find(f"bndbox/{tag}")
    if node is None or node.text is None:
        raise ValueError(f"missing bndbox/{tag}")
    return float(node.text)


# Long: one pass over the format that checks each field where it reads it, so an error names
# the file, the entry and the field; split up, that context would be passed around.
def load_voc(directory: str | Path, skip_bad: bool = False,
             class_names: list[str] | None = None) -> DetectionSet:
    """Pascal VOC: DIR/Annotations/*.xml and the images in DIR/JPEGImages (or beside them)."""
    root = Path(directory)
    where = f"voc:{root}"
    xml_dir = root / "Annotations"
    if not xml_dir.is_dir():
        raise TfkarpaError(f"{where}: no Annotations/ directory of XML files")
    image_dir = root / "JPEGImages" if (root / "JPEGImages").is_dir() else xml_dir
    problems = _Problems(where, skip_bad)
    parsed = []
    for xml in sorted(xml_dir.glob("*.xml")):
        try:
            tree = ET.parse(xml)
        except ET.ParseError as err:
            line, column = err.position
            problems.add(f"{xml}: malformed XML at line {line}, column {column}")
            continue
        node = tree.getroot()
        filename = (node.findtext("filename") or "").strip()
        width, height = node.findtext("size/width"), node.findtext("size/height")
        if not filename:
            problems.add(f"{xml}: no <filename>")
            continue
        try:
            width, height = int(float(width)), int(float(height))
            assert width > 0 and height > 0
        except (TypeError, ValueError, AssertionError):
            problems.add(f"{xml}: <size> needs positive <width> and <height>")
            continue
        objects = []
        for k, obj in enumerate(node.findall("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            label = f"{xml}: object {k} ('{name}')"
            if not name:
                problems.add(f"{xml}: object {k} has no <name>")
                continue
            try:
                # VOC pixels are 1-based and inclusive: [xmin - 1, xmax] in 0-based edges.
                box = np.array([_voc_number(obj, "xmin") - 1, _voc_number(obj, "ymin") - 1,
                                _voc_number(obj, "xmax"), _voc_number(obj, "ymax")], np.float32)
            except ValueError as err:
                problems.add(f"{label}: {err}")
                continue
            problem = box_problem(box, width, height)
            if problem:
                problems.add(f"{label}: {problem}")
                continue
            objects.append((box, name))
        parsed.append((xml, filename, width, height, objects))

    names = list(class_names) if class_names else sorted(
        {name for *_, objects in parsed for _, name in objects})
    index = {n: i for i, n in enumerate(names)}
    examples = []
    for xml, filename, width, height, objects in parsed:
        try:
            file = inside(image_dir, filename, str(xml))
        except TfkarpaError as err:
            problems.add(str(err))
            continue
        problem = _image_problem(file)
        if problem:
            problems.add(f"{xml}: image {file}: {problem}")
            continue
        unknown = [n for _, n in objects if n not in index]
        if unknown:
            problems.add(f"{xml}: unknown class name(s) {', '.join(sorted(set(unknown)))}")
            continue
        examples.append(Annotated(file, width, height,
                                  np.array([b for b, _ in objects], np.float32).reshape(-1, 4),
                                  np.array([index[n] for _, n in objects], np.int32)))
    skipped = problems.finish()
    if not examples:
        raise TfkarpaError(f"{where}: no usable annotated images")
    if len(names) < 1:
        raise TfkarpaError(f"{where}: no object classes found")
    return DetectionSet(where, names, examples, skipped)


def voc_image_sets(directory: str | Path) -> dict[str, set[str]] | None:
    """VOC's own split lists, DIR/ImageSets/Main/{train,val[,test]}.txt (one image id per line,
    the file stem), or None when the set has none."""
    main = Path(directory) / "ImageSets" / "Main"
    if not (main / "train.txt").is_file():
        return None
    if not (main / "val.txt").is_file():
        raise TfkarpaError(f"voc:{directory}: ImageSets/Main has train.txt but no val.txt")
    return {split: {line.split()[0] for line in (main / f"{split}.txt").read_text().splitlines()
                    if line.strip()}
            for split in ("train", "val", "test") if (main / f"{split}.txt").is_file()}


def _yolo_names(root: Path) -> list[str]:
    import yaml

    for candidate in ("classes.txt", "obj.names", "names.txt"):
        if (root / candidate).is_file():
            names = [n.strip() for n in (root / candidate).read_text().splitlines() if n.strip()]
            if names:
                return names
    if (root / "data.yaml").is_file():
        try:
            doc = yaml.safe_load((root / "data.yaml").read_text())
        except yaml.YAMLError as err:
            raise TfkarpaError(f"{root / 'data.yaml'}: not valid YAML ({err})") from None
        return _names_of(doc.get("names") if isinstance(doc, dict) else None, root / "data.yaml")
    raise TfkarpaError(f"yolo:{root}: no class names file (classes.txt, obj.names or data.yaml)")


def load_yolo(directory: str | Path, skip_bad: bool = False) -> DetectionSet:
    """YOLO txt: DIR/images/*, DIR/labels/<stem>.txt with `class cx cy w h` per line (relative
    to the image size), class names in classes.txt / obj.names / data.yaml."""
    from tfkarpa.data.sources import IMAGE_SUFFIXES

    root = Path(directory)
    where = f"yolo:{root}"
    images, labels = root / "images", root / "labels"
    if not images.is_dir() or not labels.is_dir():
        raise TfkarpaError(f"{where}: needs images/ and labels/ directories, or a data.yaml "
                           "file naming its train/val/test images")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return _yolo_set(where, files, lambda file: labels / f"{file.stem}.txt", _yolo_names(root),
                     skip_bad)


def load_yolo_yaml(path: str | Path, skip_bad: bool = False) -> dict[str, DetectionSet]:
    """An Ultralytics `data.yaml`: `path` (the root; relative to the YAML file), `train`, `val`
    and optional `test` (each a folder of images, a .txt list of image files, or a list of
    those, relative to the root) and `names`. Labels are found as Ultralytics finds them: the
    image path with its last `images` folder replaced by `labels`, suffix `.txt`. Returns
    {split: DetectionSet}, the splits as given."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise TfkarpaError(f"yolo:{path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise TfkarpaError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict):
        raise TfkarpaError(f"{path}: expected a mapping with train, val and names")
    names = _names_of(doc.get("names"), path)
    root = Path(str(doc.get("path") or "."))
    root = root if root.is_absolute() else path.parent / root
    if not root.is_dir():
        raise TfkarpaError(f"{path}: 'path' {doc.get('path')!r} is not a directory ({root})")
    out = {}
    for split in ("train", "val", "test"):
        entry = doc.get(split)
        if entry in (None, "", []):
            if split != "test":
                raise TfkarpaError(f"{path}: missing '{split}' (a folder of images, a .txt list "
                                   "of image files, or a list of those)")
            continue
        files = _yolo_split_files(entry, root, f"{path}: '{split}'")
        out[split] = _yolo_set(f"yolo:{path}[{split}]", files, _label_of, names, skip_bad)
    return out


def _names_of(names, path: Path) -> list[str]:
    if isinstance(names, dict):
        if not all(_int(k) for k in names) or sorted(names) != list(range(len(names))):
            raise TfkarpaError(f"{path}: 'names' keys must be 0..N-1")
        names = [names[i] for i in range(len(names))]
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    raise TfkarpaError(f"{path}: needs 'names', a list of class names (or 0: name, 1: name ...)")


def _label_of(image: Path) -> Path:
    """Ultralytics' rule: .../images/.../x.jpg -> .../labels/.../x.txt (the last `images`)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _yolo_split_files(entry, root: Path, where: str) -> list[Path]:
    from tfkarpa.data.sources import IMAGE_SUFFIXES

    files = []
    for item in entry if isinstance(entry, list) else [entry]:
        if not isinstance(item, str):
            raise TfkarpaError(f"{where}: expected a path, got {item!r}")
        target = inside(root, item, where)
        if target.is_dir():
            files += sorted(p for p in target.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif target.suffix == ".txt" and target.is_file():
            for n, line in enumerate(target.read_text().splitlines(), start=1):
                line = line.strip()
                if line:  # "./images/x.jpg" lines are relative to the list's folder
                    base = target.parent if line.startswith("./") else root
                    files.append(inside(base, line, f"{target} line {n}"))
        else:
            raise TfkarpaError(f"{where}: '{item}' is neither a folder of images nor a .txt list "
                               f"of image files ({target})")
    if not files:
        raise TfkarpaError(f"{where}: no images found")
    return files


# Long: one pass over the format that checks each field where it reads it, so an error names
# the file, the entry and the field; split up, that context would be passed around.
def _yolo_set(where: str, files: list[Path], label_of, names: list[str],
              skip_bad: bool) -> DetectionSet:
    problems = _Problems(where, skip_bad)
    examples = []
    for file in files:
        problem = _image_problem(file)
        if problem:
            problems.add(f"{file}: {problem}")
            continue
        width, height = _image_size(file)
        txt = label_of(file)
        rows = []
        if txt.is_file():  # no label file: an image without objects
            try:
                lines = txt.read_text().splitlines()
            except UnicodeDecodeError:
                problems.add(f"{txt}: not a text file")
                continue
            for n, line in enumerate(lines, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 5:
                    problems.add(f"{txt} line {n}: expected 5 fields (class cx cy w h), got "
                                 f"{len(fields)}")
                    continue
                try:
                    cls = int(fields[0])
                    values = [float(v) for v in fields[1:]]
                except ValueError:
                    problems.add(f"{txt} line {n}: not numbers: '{line.strip()[:60]}'")
                    continue
                if not 0 <= cls < len(names):
                    problems.add(f"{txt} line {n}: class {cls} is not in 0..{len(names) - 1}")
                    continue
                if not all(np.isfinite(values)) or not all(0.0 <= v <= 1.0 for v in values):
                    problems.add(f"{txt} line {n}: coordinates must be in [0, 1] (relative "
                                 f"to the image), got {values}")
                    continue
                rows.append((n, cls, values))
        boxes = np.zeros((0, 4), np.float32)
        if rows:
            relative = np.array([v for *_, v in rows], np.float32)
            # keras-cv has no relative centre format: scale to pixels, then convert.
            boxes = convert_boxes(relative * np.array([width, height, width, height],
                                                      np.float32), "center_xywh")
        keep, classes = [], []
        for (n, cls, _), box in zip(rows, boxes):
            problem = box_problem(box, width, height)
            if problem:
                problems.add(f"{txt} line {n}: {problem}")
                continue
            keep.append(box)
            classes.append(cls)
        examples.append(Annotated(file, width, height, np.array(keep, np.float32).reshape(-1, 4),
                                  np.array(classes, np.int32)))
    skipped = problems.finish()
    if not examples:
        raise TfkarpaError(f"{where}: no usable images")
    return DetectionSet(where, names, examples, skipped)

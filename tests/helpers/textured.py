"""A small detection data set that is not `shapes`, written as a user would have it.

Coloured objects (ellipses, chevrons, rings, hexagons) on textured backgrounds (smooth colour
noise under stripes at a random angle), on images of several sizes that are not square, saved
as JPEG with COCO annotation files whose image ids and category ids are not 1..N in file order.
Tests and benchmarks use it as "data nobody on the team tuned for"; `shapes` is where the
defaults came from.

    python tests/helpers/textured.py OUT [train=320] [val=100] [test=0] [classes=2] [seed=0]

writes OUT/images/*.jpg and OUT/train.json, OUT/val.json (and OUT/test.json when test > 0).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("ellipse", "chevron", "ring", "hexagon")
CATEGORY_IDS = (3, 7, 11, 19)  # what a user's file might hold: not 1..N
_SS = 2  # drawn at twice the size and reduced: smooth edges


def _texture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour noise with stripes over it: float32 [H, W, 3] in [0, 255]."""
    grid = rng.uniform(40, 215, (4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), np.float32)
    angle, period = rng.uniform(0, math.pi), rng.uniform(4, 14)
    yy, xx = np.mgrid[0:height, 0:width]
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    stripes = wave[..., None] * rng.uniform(10, 35) * rng.choice([-1, 1], 3)
    grain = rng.normal(0, 6, (height, width, 3))
    return np.clip(base + stripes + grain, 0, 255)


def _visible_colour(rng: np.random.Generator, background: np.ndarray, cx: float, cy: float,
                    r: float) -> tuple[int, int, int]:
    """A random colour that stands out from the background under the object (as objects
    people annotate do): at least 120 apart (RGB distance) from its mean colour there."""
    y0, y1 = int(max(0, cy - r)), int(cy + r) + 1
    x0, x1 = int(max(0, cx - r)), int(cx + r) + 1
    under = background[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
    for _ in range(50):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - under) >= 120:
            break
    else:
        colour = np.where(under > 127, 0, 255)
    return tuple(int(v) for v in colour)


def _outline(kind: str, cx: float, cy: float, r: float, angle: float):
    """Polygon points of an object, or None for the ellipse and ring (drawn as ellipses)."""
    if kind == "hexagon":
        return [(cx + r * math.cos(angle + k * math.pi / 3),
                 cy + r * math.sin(angle + k * math.pi / 3)) for k in range(6)]
    if kind == "chevron":  # an arrow head: a V with thick arms
        pts = [(-r, -r), (0.15 * r, 0), (-r, r), (-0.35 * r, r), (r, 0), (-0.35 * r, -r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    return None


def _scene(rng: np.random.Generator, classes: int, count: tuple[int, int] = (1, 4)):
    width, height = int(rng.integers(80, 129)), int(rng.integers(72, 113))
    background = _texture(rng, width, height)
    canvas = Image.fromarray(background.astype(np.uint8)).resize((width * _SS, height * _SS))
    draw = ImageDraw.Draw(canvas)
    objects, taken = [], []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        for _try in range(30):
            r = rng.uniform(8, 21)
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in taken):
                break
        else:
            continue
        taken.append((cx, cy, r))
        label = int(rng.integers(0, classes))
        kind = CLASSES[label]
        colour = _visible_colour(rng, background, cx, cy, r)
        S = _SS
        if kind in ("ellipse", "ring"):
            rx, ry = (r, r * rng.uniform(0.55, 1.0)) if kind == "ellipse" else (r, r)
            if rng.random() < 0.5:
                rx, ry = ry, rx
            box = [cx - rx, cy - ry, cx + rx, cy + ry]
            if kind == "ring":
                draw.ellipse([v * S for v in box], outline=colour, width=max(2, int(r * 0.35 * S)))
            else:
                draw.ellipse([v * S for v in box], fill=colour)
        else:
            pts = _outline(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
            draw.polygon([(x * S, y * S) for x, y in pts], fill=colour)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = [min(xs), min(ys), max(xs), max(ys)]
        box = [max(0.0, box[0]), max(0.0, box[1]), min(width, box[2]), min(height, box[3])]
        objects.append((box, label))
    image = canvas.filter(ImageFilter.BoxBlur(0.5)).resize((width, height), Image.LANCZOS)
    return image, objects


def write(out: str | Path, train: int = 320, val: int = 100, test: int = 0, classes: int = 2,
          seed: int = 0) -> dict[str, Path]:
    """Write the images and one COCO file per split; returns {split: annotation file}."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": CATEGORY_IDS[k], "name": CLASSES[k], "supercategory": "object"}
                  for k in range(classes)]
    files, ann_id = {}, 5000
    counts = {"train": train, "val": val, "test": test}
    next_id = 0
    for split, count in counts.items():
        if count <= 0:
            continue
        images, anns = [], []
        # Ids the way exported sets have them: large, gapped and not in file order.
        ids = (rng.permutation(count) * 3 + 101 + next_id).tolist()
        next_id += 3 * count + 7
        for k in range(count):
            image, objects = _scene(rng, classes)
            name = f"{split}_{k:04d}.jpg"
            image.save(out / "images" / name, quality=92)
            images.append({"id": ids[k], "file_name": f"images/{name}", "width": image.width,
                           "height": image.height})
            for (x0, y0, x1, y1), label in objects:
                ann_id += 1
                anns.append({"id": ann_id, "image_id": ids[k], "category_id": CATEGORY_IDS[label],
                             "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2),
                                      round(y1 - y0, 2)],
                             "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0})
        files[split] = out / f"{split}.json"
        files[split].write_text(json.dumps({"images": images, "annotations": anns,
                                            "categories": categories}))
    return files


def write_folder(out: str | Path, train: int = 60, val: int = 20, test: int = 20,
                 classes: int = 4, seed: int = 0) -> Path:
    """A classification set of the same scenes, one object each: OUT/{train,val,test}/<class>/
    with `train`, `val`, `test` JPEGs per class (the splits a user would already have)."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, count in {"train": train, "val": val, "test": test}.items():
        for label in range(classes):
            folder = out / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            made = 0
            while made < count:
                image, objects = _scene(rng, classes, count=(1, 1))
                if objects and objects[0][1] == label:
                    image.save(folder / f"{made:04d}.jpg", quality=92)
                    made += 1
    return out


if __name__ == "__main__":
    options = dict(a.split("=", 1) for a in sys.argv[2:])
    written = write(sys.argv[1], **{k: int(v) for k, v in options.items()})
    print("\n".join(f"{k}: {v}" for k, v in written.items()))

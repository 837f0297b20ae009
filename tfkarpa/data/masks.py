"""Instance masks as COCO run-length encodings, by pycocotools' mask API (the format's reference).

Masks travel as compressed RLE dicts (`{"size": [height, width], "counts": str}`): a 640 x 480
object costs a few hundred bytes instead of 300 KB, they are what COCO files and results hold,
and pycocotools scores them (`iouType="segm"`). `from_coco` reads an annotation's
`segmentation` (polygons, or RLE compressed or not) and says what is wrong with a bad one;
`encode` / `decode` convert binary arrays.
"""

from __future__ import annotations

import numpy as np

# Polygon points may sit on the border, and tools that write floats overshoot a little.
_EDGE = 0.5


def encode(masks: np.ndarray) -> list[dict]:
    """Binary masks [n, H, W] (or one [H, W]) -> compressed RLE dicts with str counts (JSON)."""
    from pycocotools import mask as coco_mask

    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if not len(masks):
        return []
    rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
            for r in rles]


def _native(rles: list[dict]) -> list[dict]:
    return [{"size": r["size"], "counts": r["counts"].encode("ascii")
             if isinstance(r["counts"], str) else r["counts"]} for r in rles]


def decode(rles: list[dict], height: int, width: int) -> np.ndarray:
    """Compressed RLE dicts -> uint8 masks [n, H, W] (n may be 0)."""
    from pycocotools import mask as coco_mask

    if not rles:
        return np.zeros((0, height, width), np.uint8)
    return coco_mask.decode(_native(rles)).transpose(2, 0, 1)


def area(rles: list[dict]) -> np.ndarray:
    from pycocotools import mask as coco_mask

    return (coco_mask.area(_native(rles)).astype(np.float64) if rles
            else np.zeros((0,), np.float64))


def different_pixels(a: list[dict], b: list[dict]) -> np.ndarray:
    """[len(a), len(b)]: how many pixels each pair of masks (one image) disagree on, from
    pycocotools' IoU and areas (|A xor B| = union - intersection)."""
    from pycocotools import mask as coco_mask

    if not a or not b:
        return np.zeros((len(a), len(b)), np.float64)
    iou = np.asarray(coco_mask.iou(_native(a), _native(b), [0] * len(b)), np.float64)
    total = area(a)[:, None] + area(b)[None, :]
    union = total / (1.0 + iou)  # |A| + |B| = union + intersection, intersection = iou * union
    return np.rint(union * (1.0 - iou))  # whole pixels (the IoU is a float ratio)


def to_box(rle: dict) -> np.ndarray:
    """The mask's tight box, xyxy pixels (float32 [4])."""
    from pycocotools import mask as coco_mask

    x, y, w, h = coco_mask.toBbox(_native([rle])[0])
    return np.array([x, y, x + w, y + h], np.float32)


def from_coco(segmentation, height: int, width: int) -> tuple[dict | None, str | None]:
    """An annotation's `segmentation` -> (compressed RLE dict, None), or (None, what is wrong):
    polygons ([[x1, y1, x2, y2, ...], ...], at least 3 points each, inside the image), an
    uncompressed RLE ({"size": [h, w], "counts": [ints]}) or a compressed one (str counts), of
    the image's size and not empty."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, list) for p in segmentation):
            return None, "'segmentation' polygons must be a non-empty list of [x1, y1, x2, y2, ...]"
        for k, polygon in enumerate(segmentation):
            if len(polygon) < 6 or len(polygon) % 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon):
                return None, (f"segmentation polygon {k} needs an even count of numbers, at "
                              f"least 3 points, got {len(polygon)} values")
            xs, ys = np.asarray(polygon[0::2], float), np.asarray(polygon[1::2], float)
            if (xs.min() < -_EDGE or ys.min() < -_EDGE or xs.max() > width + _EDGE
                    or ys.max() > height + _EDGE):
                return None, (f"segmentation polygon {k} reaches outside the {width}x{height} "
                              f"image (x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g})")
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2) or not isinstance(counts, (list, str)):
            return None, "'segmentation' RLE needs 'size' [height, width] and 'counts'"
        if list(size) != [height, width]:
            return None, (f"segmentation RLE size {size} is not the image's "
                          f"[{height}, {width}] (height, width)")
        if isinstance(counts, list):
            if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != height * width:
                return None, (f"segmentation RLE counts must be non-negative integers adding up "
                              f"to height x width = {height * width}")
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            # Compressed counts are ASCII ('0'..'o'); another character would not even encode.
            if not counts.isascii():
                return None, (f"segmentation RLE counts {counts[:20]!r} do not describe a "
                              f"{height}x{width} mask (non-ASCII characters: pycocotools "
                              "writes ASCII)")
            rle = {"size": size, "counts": counts.encode("ascii")}
            # pycocotools reads a truncated string without complaint: a string that does not
            # come back from its own mask is not a height x width mask's RLE.
            try:
                again = coco_mask.encode(coco_mask.decode(rle))["counts"]
            except Exception:  # noqa: BLE001  (pycocotools raises bare Exceptions)
                again = None
            if again != rle["counts"]:
                return None, (f"segmentation RLE counts '{counts[:20]}' do not describe a "
                              f"{height}x{width} mask")
    else:
        return None, "'segmentation' must be polygons (a list) or an RLE (a dict)"
    if coco_mask.area(rle) <= 0:
        return None, "segmentation mask is empty (0 pixels)"
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}, None

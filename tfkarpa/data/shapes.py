"""`shapes`: an embedded, procedural image data set with class labels and boxes.

Every image is drawn from its own seed (`[seed, index]`), so a data set is the same on every
machine, and growing `count` keeps the images already drawn. Each scene has a background made
of a random two-colour gradient plus noise, and one or more filled shapes of a random class,
colour, size, rotation and position. Shapes are drawn four times larger and averaged down,
which gives anti-aliased edges without any extra dependency. Boxes are exact: they are the
extent of the drawn geometry, in pixel coordinates of the output image, format "xyxy" (the
keras-cv name), so the same scenes serve classification (one object) and detection (several).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring")
BOX_FORMAT = "xyxy"
_SUPERSAMPLE = 4


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        radii, count = [r], 4
    elif kind == "triangle":
        radii, count = [r], 3
    elif kind == "star":
        radii, count = [r, 0.42 * r], 10
    elif kind == "cross":
        # A plus sign: twelve corners, arms a third of the diameter wide.
        h = r * 0.34
        pts = [(h, r), (h, h), (r, h), (r, -h), (h, -h), (h, -r),
               (-h, -r), (-h, -h), (-r, -h), (-r, h), (-h, h), (-h, r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(kind)
    return [
        (cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / count),
         cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / count))
        for k in range(count)
    ]


def _colour_far_from(rng: np.random.Generator, others: list[np.ndarray], min_dist: float) -> np.ndarray:
    for _ in range(100):
        colour = rng.integers(0, 256, 3)
        if all(np.linalg.norm(colour - o) >= min_dist for o in others):
            return colour
    return 255 - np.mean(others, axis=0)


# Long: one scene drawn step by step (background, then each object and its box), in the order
# the random draws are made; any split would change which draw feeds which choice.
def render_scene(
    rng: np.random.Generator,
    size: int,
    num_objects: int = 1,
    min_scale: float = 0.35,
    max_scale: float = 0.9,
    max_iou: float = 0.3,
    with_mask: bool = False,
    attributes: list | None = None,
    masks: list | None = None,
):
    """Draw one scene: returns (uint8 image HxWx3, boxes [n, 4] xyxy float32, classes [n]).

    With `with_mask`, also the shapes' coverage [H, W] in [0, 1] (for checking boxes). A list
    passed as `attributes` gets each drawn object's {"colour": (r, g, b), "diameter": share of
    the image side} (the multi-task heads' labels); one passed as `masks` gets each object's
    visible mask, bool [H, W]: the pixels it covers at least half of once the shapes drawn
    over it are taken away (COCO's convention, instance segmentation's targets). The draws are
    the same either way.
    """
    bg_a, bg_b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    bg_a = bg_a.astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = t[:, None] if rng.random() < 0.5 else t[None, :]
    bg_end = bg_a + (bg_b.astype(np.float32) - bg_a) * rng.uniform(0.2, 0.8)
    background = bg_a + (bg_end - bg_a) * ramp[..., None]
    background = background + rng.normal(0.0, 6.0, (size, size, 3))

    big = size * _SUPERSAMPLE
    drawn_masks = []  # supersampled coverage of each object, in drawing order
    mask_canvas = Image.new("L", (big, big), 0)
    colour_canvas = Image.new("RGB", (big, big), (0, 0, 0))
    boxes, classes = [], []
    for _ in range(num_objects):
        for _attempt in range(20):
            diameter = rng.uniform(min_scale, max_scale) * size
            r = diameter / 2
            cx, cy = rng.uniform(r, size - r, 2)
            kind = int(rng.integers(len(CLASSES)))
            angle = rng.uniform(0, 2 * math.pi)
            if CLASSES[kind] in ("circle", "ring"):
                box = (cx - r, cy - r, cx + r, cy + r)
            else:
                pts = np.array(_polygon(CLASSES[kind], cx, cy, r, angle))
                box = (*pts.min(0), *pts.max(0))
            if all(_iou(box, other) <= max_iou for other in boxes):
                break
        else:
            continue
        colour = _colour_far_from(rng, [bg_a, bg_end], 110.0)
        shape_mask = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(shape_mask)
        s = _SUPERSAMPLE
        if CLASSES[kind] == "circle":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
        elif CLASSES[kind] == "ring":
            draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
            inner = r * 0.55
            draw.ellipse([(cx - inner) * s, (cy - inner) * s, (cx + inner) * s, (cy + inner) * s], fill=0)
        else:
            draw.polygon([(x * s, y * s) for x, y in _polygon(CLASSES[kind], cx, cy, r, angle)], fill=255)
        colour_canvas.paste(tuple(int(c) for c in colour), mask=shape_mask)
        mask_canvas.paste(255, mask=shape_mask)
        if masks is not None:
            drawn_masks.append(np.asarray(shape_mask, np.float32) / 255.0)
        boxes.append(tuple(float(np.clip(v, 0, size)) for v in box))
        classes.append(kind)
        if attributes is not None:
            attributes.append({"colour": tuple(int(c) for c in colour),
                               "diameter": float(diameter / size)})

    if masks is not None:
        masks.extend(_visible_masks(drawn_masks, size))
    alpha = np.asarray(mask_canvas.resize((size, size), Image.BOX), np.float32)[..., None] / 255.0
    fg = np.asarray(colour_canvas.resize((size, size), Image.BOX), np.float32)
    # The colour canvas is black outside shapes, so un-premultiply it by the coverage.
    fg = np.where(alpha > 0, fg / np.maximum(alpha, 1e-6), 0.0)
    image = background * (1 - alpha) + fg * alpha
    out = (
        np.clip(np.rint(image), 0, 255).astype(np.uint8),
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(classes, np.int32),
    )
    return (*out, alpha[..., 0]) if with_mask else out


def _visible_masks(drawn: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each object's visible pixels: its supersampled coverage less what later shapes cover,
    averaged over each pixel's block of samples, kept where that average is at least half (a
    pixel split half and half goes to the shape on top, so masks never overlap)."""
    if not drawn:
        return []
    covered_later = np.zeros_like(drawn[0])
    claimed = np.zeros((size, size), bool)
    visible = []
    for coverage in reversed(drawn):
        own = coverage * (1.0 - covered_later)
        covered_later = np.maximum(covered_later, coverage)
        share = own.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
        mask = (share >= 0.5) & ~claimed
        claimed |= mask
        visible.append(mask)
    return visible[::-1]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def generate(count: int, size: int = 32, seed: int = 0, num_objects: int | tuple[int, int] = 1,
             min_scale: float = 0.35, max_scale: float = 0.9, max_iou: float = 0.3,
             attributes: list | None = None, masks: list | None = None):
    """`count` scenes: (images [N,S,S,3] uint8, labels [N], boxes list, box classes list).

    `num_objects` is a count or a (min, max) range drawn per scene; `min_scale`/`max_scale` bound
    an object's diameter as a share of the image side, `max_iou` how much two may overlap
    (occlusion: later shapes are drawn over earlier ones). For one object per scene, `labels`
    is that object's class: the classification target. A list passed as `attributes` gets
    one list per scene of its objects' colours and sizes, one passed as `masks` one bool array
    [n, S, S] per scene of its objects' visible masks (see `render_scene`).
    """
    low, high = (num_objects, num_objects) if isinstance(num_objects, int) else num_objects
    images = np.empty((count, size, size, 3), np.uint8)
    boxes, box_classes = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        n = low if low == high else int(rng.integers(low, high + 1))
        drawn = [] if attributes is not None else None
        scene_masks = [] if masks is not None else None
        images[i], b, c = render_scene(rng, size, n, min_scale, max_scale, max_iou,
                                       attributes=drawn, masks=scene_masks)
        if drawn is not None:
            attributes.append(drawn)
        if scene_masks is not None:
            masks.append(np.asarray(scene_masks, bool).reshape(len(c), size, size))
        boxes.append(b)
        box_classes.append(c)
    labels = np.array([c[0] if len(c) else -1 for c in box_classes], np.int32)
    return images, labels, boxes, box_classes


# Hue sectors of 60 degrees, centred on the primaries and secondaries: the `colour` head's classes.
HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")


def hue_name(rgb) -> str:
    """The name of an RGB colour's hue sector (HUES)."""
    import colorsys

    hue = colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0]
    return HUES[int(((hue * 360.0 + 30.0) % 360.0) // 60.0)]

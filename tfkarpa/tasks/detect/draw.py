"""Pictures of detections: ground truth in thin green, predictions in their class colour with
name and score (and their masks tinted in it); PNG galleries of a split for reports and
TensorBoard."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tfkarpa import runs
from tfkarpa.data import detection as det_data
from tfkarpa.data import masks
from tfkarpa.tasks.detect.metrics import Detections

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]


def draw(image: np.ndarray, detections: Detections | None, class_names: list[str],
         truth: det_data.GroundTruth | None = None, min_score: float = 0.3,
         upscale: int = 1) -> np.ndarray:
    """The image with ground truth (thin green) and detections (class colour, name and score;
    their instance masks, where they have them, tinted in the class colour)."""
    from PIL import Image, ImageDraw

    image = np.asarray(image, np.uint8)
    if detections is not None and detections.masks:
        image = _tinted(image, detections, min_score)
    img = Image.fromarray(image)
    if upscale > 1:  # small images are unreadable at 1:1 with text on them
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    pen = ImageDraw.Draw(img)
    if truth is not None:
        for box in truth.boxes:
            pen.rectangle([float(v) * upscale for v in box], outline=(0, 255, 0), width=1)
    if detections is not None:
        for box, score, cls in zip(detections.boxes, detections.scores, detections.classes):
            if score < min_score:
                continue
            colour = _PALETTE[int(cls) % len(_PALETTE)]
            xy = [float(v) * upscale for v in box]
            pen.rectangle(xy, outline=colour, width=2)
            label = f"{class_names[int(cls)]} {score:.2f}"
            pen.text((xy[0] + 2, max(0, xy[1] - 11)), label, fill=colour)
    return np.asarray(img)


def _tinted(image: np.ndarray, detections: Detections, min_score: float,
            alpha: float = 0.45) -> np.ndarray:
    """Each shown detection's mask blended into the image in its class colour."""
    out = image.astype(np.float32)
    height, width = image.shape[:2]
    shown = [i for i, score in enumerate(detections.scores) if score >= min_score]
    if not shown:
        return image
    # The masks' own size may differ from the picture's (a letterboxed image at scale 1 is
    # padded below or right): they cover its top left, as the letterbox puts the image there.
    mask_height, mask_width = detections.masks[shown[0]]["size"]
    drawn = np.zeros((len(shown), height, width), bool)
    h, w = min(height, mask_height), min(width, mask_width)
    decoded = masks.decode([detections.masks[i] for i in shown], mask_height, mask_width)
    drawn[:, :h, :w] = decoded[:, :h, :w].astype(bool)
    for i, inside in zip(shown, drawn):
        colour = np.array(_PALETTE[int(detections.classes[i]) % len(_PALETTE)], np.float32)
        out[inside] = (1 - alpha) * out[inside] + alpha * colour
    return np.clip(out, 0, 255).astype(np.uint8)


def write_pictures(split: det_data.DetectionSplit, found: list[Detections],
                   class_names: list[str], out_dir: Path, count: int, min_score: float) -> str:
    """PNGs of the first `count` images with truth and detections drawn, written atomically."""
    from PIL import Image

    with runs.atomic_dir(out_dir, "pictures", "pictures folder") as tmp:
        for i, (item, truth, detections) in enumerate(zip(split.make().take(count), split.truth,
                                                            found)):
            image = item[0].numpy()
            upscale = max(1, 256 // max(image.shape[:2]))
            picture = draw(image, detections, class_names, truth, min_score, upscale)
            Image.fromarray(picture).save(tmp / f"{i:03d}.png")
    return str(out_dir)

"""A small detection set of real photographs: the default detector (YOLOv8-xxs from scratch)
against YOLOv8 on ImageNet EfficientNet-Lite0 (`model=yolov8_lite0 model.weights=imagenet`).

Data, built per seed: 128x128 scenes whose backgrounds are random crops of the photographs that
ship inside installed packages (matplotlib's grace_hopper.jpg, scikit-learn's china.jpg and
flower.jpg, each scaled and flipped at random), with one to three Fashion-MNIST photographs
(Debian's `dataset-fashion-mnist`, /usr/share/datasets/fashion-mnist or --idx DIR) of four
kinds (trouser, sneaker, bag, boot) pasted in at 32-64 px, their grey level as opacity; a box
is the pasted item's visible extent. --train scenes (default 200) for training, 60 for
validation and 100 for test, as JPEGs with COCO files, images in train/ val/ test/ beside
annotations/instances_<split>.json (the layout COCO ships in).

Each arm is the command a user types, in a fresh process, timed from start to finish, with the
same number of optimizer steps (--steps, batch 16) so both see the same images; export=false
(the export does not change the figure):

    scratch:   python -m pipelines train task=detect data=coco:DIR steps=S seed=N export=false
    imagenet:  the same with model=yolov8_lite0 model.weights=imagenet

The rule, fixed before the first run: "met" when the ImageNet arm's mean test mAP@0.5 over the
seeds is at least 10 points above scratch's and it wins on every seed.

    python benchmarks/detection_transfer.py          # writes results/detection_transfer.json
    python benchmarks/detection_transfer.py --quick  # 40 scenes, 20 steps, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import write
from transfer import read_idx

ROOT = Path(__file__).resolve().parents[1]
KINDS = {1: "trouser", 7: "sneaker", 8: "bag", 9: "boot"}  # Fashion-MNIST label: name
SIDE = 128
MARGIN = 0.10


def photographs() -> list[Path]:
    """The photographs that ship inside installed packages (found where their packages are)."""
    import matplotlib
    import sklearn

    found = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
             Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
             Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
    missing = [str(p) for p in found if not p.is_file()]
    if missing:
        raise SystemExit(f"missing package photographs: {', '.join(missing)}")
    return found


def background(photos: list[np.ndarray], rng) -> np.ndarray:
    photo = photos[rng.integers(len(photos))]
    scale = rng.uniform(0.3, 1.0)
    crop = int(min(photo.shape[:2]) * scale)
    y, x = rng.integers(photo.shape[0] - crop + 1), rng.integers(photo.shape[1] - crop + 1)
    patch = Image.fromarray(photo[y:y + crop, x:x + crop]).resize((SIDE, SIDE), Image.BILINEAR)
    patch = np.asarray(patch, np.float32)
    return patch[:, ::-1] if rng.random() < 0.5 else patch


def scene(photos, items, labels, rng) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One scene: (uint8 RGB image, [(kind label, [x, y, w, h])])."""
    image = background(photos, rng)
    boxes = []
    for _ in range(rng.integers(1, 4)):
        i = rng.integers(len(items))
        side = int(rng.integers(32, 65))
        grey = np.asarray(Image.fromarray(items[i]).resize((side, side), Image.BILINEAR),
                          np.float32)
        alpha = np.clip(grey / 64.0, 0.0, 1.0)[..., None]
        tint = rng.uniform(0.6, 1.0, size=3)  # the item in a colour, as photographs have
        x, y = (int(v) for v in rng.integers(0, SIDE - side + 1, size=2))
        region = image[y:y + side, x:x + side]
        image[y:y + side, x:x + side] = region * (1 - alpha) + grey[..., None] * tint * alpha
        rows, cols = np.nonzero(alpha[..., 0] > 0.25)
        if len(rows):
            boxes.append((int(labels[i]), [float(x + cols.min()), float(y + rows.min()),
                                           float(cols.max() - cols.min() + 1),
                                           float(rows.max() - rows.min() + 1)]))
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def write_set(idx: Path, out: Path, sizes: dict[str, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in photographs()]
    categories = [{"id": k, "name": v} for k, v in KINDS.items()]
    for split, n in sizes.items():
        prefix = "t10k" if split == "test" else "train"  # test items never seen in training
        images = read_idx(idx / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(idx / f"{prefix}-labels-idx1-ubyte.gz")
        keep = np.isin(labels, list(KINDS))
        items, kinds = images[keep], labels[keep]
        folder = out / split
        folder.mkdir(parents=True)
        coco = {"images": [], "annotations": [], "categories": categories}
        for n_image in range(n):
            image, boxes = scene(photos, items, kinds, rng)
            name = f"{split}_{n_image:04d}.jpg"
            Image.fromarray(image).save(folder / name, quality=92)
            coco["images"].append({"id": n_image + 1, "file_name": name, "width": SIDE,
                                   "height": SIDE})
            for label, box in boxes:
                coco["annotations"].append({"id": len(coco["annotations"]) + 1,
                                            "image_id": n_image + 1, "category_id": label,
                                            "bbox": box, "area": box[2] * box[3],
                                            "iscrowd": 0})
        (out / "annotations").mkdir(exist_ok=True)
        (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def train(data: Path, seed: int, extra: list[str], cwd: Path) -> dict:
    args = ["train", "task=detect", f"data=coco:{data}", f"seed={seed}", "export=false", *extra,
            "--json"]
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=cwd, text=True,
                         capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    manifest = json.loads((cwd / result["run_dir"] / "manifest.json").read_text())
    return {"command": " ".join(["python -m pipelines", *args[:-1]]),
            "test_map50": result["metrics"]["test_map50"],
            "test_map": result["metrics"]["test_map"],
            "seconds": round(seconds, 1),
            "chosen": {k: v["value"] for k, v in manifest.get("auto", {}).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idx", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not (args.idx / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"no Fashion-MNIST idx files in {args.idx}: `apt-get install "
                         "dataset-fashion-mnist`, or --idx DIR")
    sizes = ({"train": 40, "val": 12, "test": 12} if args.quick else
             {"train": args.train, "val": 60, "test": 100})
    steps = 20 if args.quick else args.steps
    arms = {"scratch": [], "imagenet": ["model=yolov8_lite0", "model.weights=imagenet"]}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in args.seeds:
            data = tmp / f"scenes-{seed}"
            write_set(args.idx, data, sizes, seed)
            for arm, extra in arms.items():
                row = {"arm": arm, "seed": seed,
                       **train(data, seed, [f"steps={steps}", *extra], tmp)}
                print(json.dumps(row), flush=True)
                runs.append(row)
    if args.quick:  # a smoke test: nothing written
        return
    mean = {arm: float(np.mean([r["test_map50"] for r in runs if r["arm"] == arm]))
            for arm in arms}
    pairs = zip([r for r in runs if r["arm"] == "imagenet"],
                [r for r in runs if r["arm"] == "scratch"])
    wins = all(t["test_map50"] > s["test_map50"] for t, s in pairs)
    met = mean["imagenet"] >= mean["scratch"] + MARGIN and wins
    write("detection_transfer", {
        "data": f"{SIDE}x{SIDE} scenes: package photographs as backgrounds, 1-3 Fashion-MNIST "
                f"items of {len(KINDS)} kinds pasted at 32-64 px; {sizes} scenes per seed",
        "steps": steps, "batch_size": 16,
        "rule": f"met when the ImageNet arm's mean test mAP@0.5 is at least {MARGIN:.2f} above "
                "scratch's and it wins on every seed",
        "runs": runs, "mean_test_map50": mean, "target": "met" if met else "not met"})


if __name__ == "__main__":
    main()

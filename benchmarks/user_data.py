"""A user's own small detection set with the default command, with and without the settings
chosen from the data.

The set is `tests/helpers/textured.py` (not `shapes`, where the defaults were tuned): 320
training and 100 validation images of 72-128 pixels, two classes of coloured objects on
striped, noisy backgrounds, as JPEGs with COCO files whose ids are not 1..N. Each arm runs
the command a user types, in a fresh process, timed from start to finish:

    adaptive:  python -m pipelines train task=detect data=coco:train.json data.val=val.json
    fixed:     the same with the shapes recipe's fixed sizes (shapes_yolov8: 64 px, 20 epochs,
               no augmentation), which is what that command meant before sizes were chosen

then scores the run on every image of val.json with `evaluate ... split=all` and checks the
detections file it writes against val.json with pycocotools directly (the ids must match).
The same for classification: a folder of the same scenes with one object each (4 classes,
train/ val/ test/ sub-folders of 100/30/50 images per class), `train data=folder:DIR` with the
settings chosen from the data against the old fixed ones (32 px, 10 epochs).

    python benchmarks/user_data.py            # writes benchmarks/results/user_data.json
    python benchmarks/user_data.py --unseen   # then: a 3-class set the rules never saw
    python benchmarks/user_data.py --quick    # 40 images, 2 epochs each: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, write

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "helpers"))
import textured  # noqa: E402

TARGET_MAP50, BUDGET_SECONDS = 0.90, 900


def pipelines(*args: str, cwd: Path) -> tuple[dict, float]:
    """Run `python -m pipelines ARGS --json` in a fresh process: (its JSON, wall seconds)."""
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipelines", *args, "--json"], cwd=cwd,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                              **_env()})
    seconds = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), seconds


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def coco_map50(annotations: Path, detections: Path) -> float:
    """mAP@0.5 of a detections file against an annotation file, by pycocotools alone."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        rows = json.loads(detections.read_text())
        ev = COCOeval(gt, gt.loadRes([{k: r[k] for k in ("image_id", "category_id", "bbox",
                                                          "score")} for r in rows]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return round(float(ev.stats[1]), 4)


def arm(name: str, extra: list[str], files: dict, work: Path) -> dict:
    run = work / "runs" / name
    print(f"[{name}] training ...", flush=True)
    trained, train_seconds = pipelines(
        "train", *extra, f"data=coco:{files['train']}", f"data.val={files['val']}",
        f"run_dir={run}", f"export_dir={work / 'export' / name}", "--quiet", cwd=work)
    evaluated, _ = pipelines("evaluate", str(run), f"data=coco:{files['val']}", "split=all",
                             f"out={work / 'eval' / name}", "--quiet", cwd=work)
    manifest = json.loads((run / "manifest.json").read_text())
    config = (run / "config.yaml").read_text()
    result = {
        "command": ["train", *extra, "data=coco:train.json", "data.val=val.json"],
        "chosen": manifest.get("auto", {}),
        "image_size": int(next(l.split(":")[1] for l in config.splitlines()
                               if l.strip().startswith("image_size:"))),
        "epochs": manifest["training"]["epochs"],
        "train_seconds": round(train_seconds, 1),
        "val_map50_tfkarpa": round(evaluated["metrics"]["map50"], 4),
        "val_map_tfkarpa": round(evaluated["metrics"]["map"], 4),
        "val_map50_pycocotools_on_val_json": coco_map50(
            files["val"], Path(evaluated["artifacts"]["detections"])),
    }
    print(f"[{name}] {json.dumps(result)}", flush=True)
    return result


def classify_arm(name: str, extra: list[str], root: Path, work: Path) -> dict:
    """`train data=folder:ROOT` (train/ val/ test/ sub-folders, used as given), timed."""
    run = work / "runs" / f"classify-{name}"
    print(f"[classify {name}] training ...", flush=True)
    trained, seconds = pipelines("train", f"data=folder:{root}", *extra, f"run_dir={run}",
                                 f"export_dir={work / 'export' / f'classify-{name}'}",
                                 "--quiet", cwd=work)
    manifest = json.loads((run / "manifest.json").read_text())
    result = {"command": ["train", "data=folder:DIR", *extra],
              "chosen": manifest.get("auto", {}),
              "epochs": manifest["training"]["epochs"],
              "train_seconds": round(seconds, 1),
              "test_accuracy": round(trained["metrics"]["test_accuracy"], 4),
              "test_images": manifest["data"]["examples"]["test"]}
    print(f"[classify {name}] {json.dumps(result)}", flush=True)
    return result


def unseen() -> None:
    """The rules (150 epochs of 320 images, 96 px, light augmentation) were picked on the
    seed-0 set; this checks the default command on a set made after that choice."""
    sizes = dict(train=400, val=120)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = textured.write(work / "data", **sizes, classes=3, seed=7)
        result = arm("adaptive", ["task=detect"], files, work)
    path = RESULTS / "user_data.json"
    summary = json.loads(path.read_text())
    summary.pop("machine", None)
    summary["unseen_set"] = {
        "data": {"generator": "tests/helpers/textured.py", **sizes, "classes": 3, "seed": 7},
        "adaptive": result,
        "met": (result["val_map50_pycocotools_on_val_json"] >= TARGET_MAP50
                and result["train_seconds"] <= BUDGET_SECONDS)}
    write("user_data", summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("adaptive", "fixed"))
    parser.add_argument("--unseen", action="store_true",
                        help="the default command on a set the rules were not chosen on (3 "
                             "classes, 400 + 120 images, generator seed 7), added to the JSON")
    args = parser.parse_args()
    if args.unseen:
        return unseen()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = dict(train=40, val=12) if args.quick else dict(train=320, val=100)
        files = textured.write(work / "data", **sizes, classes=2, seed=0)
        quick = ["epochs=2"] if args.quick else []
        arms = {"adaptive": ["task=detect", *quick],
                "fixed": ["shapes_yolov8", *quick]}
        results = {name: arm(name, extra, files, work) for name, extra in arms.items()
                   if not args.only or name == args.only}
        per_class = dict(train=10, val=4, test=4) if args.quick else dict(train=100, val=30,
                                                                           test=50)
        folder = textured.write_folder(work / "folder", **per_class, classes=4, seed=1)
        classify = {"adaptive": quick,
                    # what `train data=folder:...` meant before: 32 px, 10 epochs, light.
                    "fixed": ["data.image_size=32", "epochs=10", "data.augment=light", *quick]}
        classified = {name: classify_arm(name, extra, folder, work)
                      for name, extra in classify.items() if not args.only or name == args.only}
    adaptive = results.get("adaptive")
    summary = {
        "data": {"generator": "tests/helpers/textured.py", **sizes, "classes": 2, "seed": 0},
        "arms": results,
        "target": {"val_map50": TARGET_MAP50, "seconds": BUDGET_SECONDS},
        "classification": {"data": {"generator": "textured.write_folder", "classes": 4,
                                    "per_class": per_class, "seed": 1},
                           "arms": classified},
    }
    if adaptive:
        summary["target"]["met"] = (adaptive["val_map50_pycocotools_on_val_json"] >= TARGET_MAP50
                                    and adaptive["train_seconds"] <= BUDGET_SECONDS)
    print(json.dumps(summary, indent=2))
    if not args.quick and not args.only:
        write("user_data", summary)


if __name__ == "__main__":
    main()

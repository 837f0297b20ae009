"""ONNX beside TFLite, from one run each: the demo classifier and a YOLOv8 detector.

Trains the `demo` recipe (small_cnn on the embedded shapes, 15 epochs) and a shorter
`shapes_yolov8` (YOLOv8-xs on 2,500 shapes scenes at 64 px, 10 epochs: a detector that finds
things, so that int8 is tried on real scores and not on a barely trained model's), exports each
to TFLite and ONNX in every mode listed (classifier: float and int8 with a float interface;
detector: float, dynamic and int8), each file separately so that a refused one is recorded
with its reason and the others still measured, then measures every written file with
`tfkarpa.tasks.benchmark`: test figure through its own runtime (LiteRT, onnxruntime; accuracy
for the classifier, COCO mAP for the detector), size, batch-1 latency at 1 and 2 threads in
Python, and for the TFLite files LiteRT's own `litert-benchmark` tool at 1 and 2 threads.

Rules, fixed before the first run: a mode is met when both its TFLite and ONNX files are
written (every export gate passed) and the ONNX file's test figure is within 0.5 points of the
TFLite file's (it is the same graph) and within 1 point of Keras; a refused file makes its mode
not met. Reported, not judged: ONNX latency against TFLite's (onnxruntime and XNNPACK are
different kernels), and litert-benchmark against the Python timing (the tool runs the graph
without the Python call).

    python benchmarks/onnx_export.py          # writes benchmarks/results/onnx_export.json
    python benchmarks/onnx_export.py --quick  # tiny runs, nothing written: a smoke test
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import write

from pipelines._cli import resolve_recipe
from tfkarpa import config, tasks
from tfkarpa.errors import TfkarpaError
from tfkarpa.tasks import benchmark, export_run

POINTS_TFLITE, POINTS_KERAS = 0.5, 1.0
DETECTOR = ["data.count=2500", "epochs=10"]  # the recipe, shorter: about 5 minutes here


def measure(recipe: str, overrides: list[str], quantize: list[str], tmp: Path) -> dict:
    out = tmp / "exports" / recipe
    cfg = config.build([resolve_recipe(recipe)],
                       [f"runs_root={tmp}/runs", f"export_dir={out}/{recipe}", *overrides])
    run_dir = tasks.run(cfg, verbose=2)["run_dir"]
    refused = {}
    for mode in quantize:
        for fmt in ("tflite", "onnx"):
            try:
                export_run(run_dir, [fmt], [mode], out)
            except TfkarpaError as err:  # the gate's reason, kept as the result
                refused[f"{fmt}_{mode}"] = str(err)
    table = benchmark([run_dir, str(out)], tmp / "bench" / recipe, runs=200)
    rows = {r["artifact"]: r for r in table["rows"]}
    keras = next(r for r in table["rows"] if r["kind"] == "keras")
    name = Path(run_dir).resolve().name
    pairs = []
    for mode in quantize:
        lite, onnx = rows.get(f"{name}.{mode}.tflite"), rows.get(f"{name}.{mode}.onnx")
        pair = {"mode": mode, "keras": keras["accuracy"],
                "refused": {k: v for k, v in refused.items() if k.endswith(f"_{mode}")}}
        for kind, row in (("tflite", lite), ("onnx", onnx)):
            if row is not None:
                pair[kind] = row["accuracy"]
                pair.setdefault("bytes", {})[kind] = row["size_bytes"]
                pair.setdefault("p50_ms", {}).update(
                    {f"{kind}_{t}t": row[f"latency_{t}t"]["p50_ms"] for t in (1, 2)})
        if lite is not None:
            pair["litert_benchmark_p50_ms"] = {
                f"{t}t": (lite.get(f"litert_tool_{t}t") or {}).get("p50_ms") for t in (1, 2)}
        if lite is not None and onnx is not None:
            gap_lite = 100 * abs(onnx["accuracy"] - lite["accuracy"])
            gap_keras = 100 * abs(onnx["accuracy"] - keras["accuracy"])
            pair.update(points_from_tflite=round(gap_lite, 3), points_from_keras=round(gap_keras, 3),
                        met=gap_lite <= POINTS_TFLITE and gap_keras <= POINTS_KERAS)
        else:
            pair["met"] = False
        pairs.append(pair)
    return {"recipe": recipe, "overrides": overrides, "figure": tasks.TASKS[cfg.task].benchmark_figure,
            "pairs": pairs, "table": table["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, nothing written")
    args = parser.parse_args()
    quick = ["epochs=1", "data.count=200"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = [measure("demo", quick, ["none", "int8"], tmp),
                   measure("shapes_yolov8", [*DETECTOR, *quick], ["none", "dynamic", "int8"], tmp)]
    if args.quick:
        print(json.dumps(results, default=str)[:3000])
        return
    met = all(p["met"] for r in results for p in r["pairs"])
    write("onnx_export", {
        "rule": f"a mode is met when its TFLite and ONNX files are both written and the ONNX "
                f"file's test figure is within {POINTS_TFLITE} points of the TFLite file's and "
                f"within {POINTS_KERAS} point of Keras; met when every mode of both models is",
        "results": results, "target": "met" if met else "not met"})


if __name__ == "__main__":
    main()

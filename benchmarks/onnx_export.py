"""ONNX beside TFLite, from one run: the demo classifier.

Trains the `demo` recipe (small_cnn on the embedded shapes, 15 epochs), exports it to TFLite
and ONNX in float and int8 (int8 with a float interface), then measures every file with
`tfkarpa.tasks.benchmark`: test accuracy through its own runtime (LiteRT, onnxruntime), size,
batch-1 latency at 1 and 2 threads in Python, and for the TFLite files LiteRT's own
`litert-benchmark` tool at 1 and 2 threads. A detector is not measured here yet.

Rules, fixed before the first run: each ONNX file's test figure within 0.5 points of the
TFLite file of the same mode (it is the same graph) and within 1 point of Keras; reported, not
judged: ONNX latency against TFLite's (onnxruntime and XNNPACK are different kernels), and
litert-benchmark against the Python timing (the tool runs the graph without the Python call).

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
from tfkarpa.tasks import benchmark, export_run

POINTS_TFLITE, POINTS_KERAS = 0.5, 1.0


def measure(recipe: str, overrides: list[str], quantize: list[str], tmp: Path) -> dict:
    out = tmp / "exports" / recipe
    cfg = config.build([resolve_recipe(recipe)],
                       [f"runs_root={tmp}/runs", f"export_dir={out}/{recipe}", *overrides])
    run_dir = tasks.run(cfg, verbose=2)["run_dir"]
    export_run(run_dir, ["tflite", "onnx"], quantize, out)
    table = benchmark([run_dir, str(out)], tmp / "bench" / recipe, runs=200)
    rows = {r["artifact"]: r for r in table["rows"]}
    keras = next(r for r in table["rows"] if r["kind"] == "keras")
    name = Path(run_dir).resolve().name
    pairs = []
    for mode in quantize:
        lite, onnx = rows[f"{name}.{mode}.tflite"], rows[f"{name}.{mode}.onnx"]
        gap_lite = 100 * abs(onnx["accuracy"] - lite["accuracy"])
        gap_keras = 100 * abs(onnx["accuracy"] - keras["accuracy"])
        pairs.append({
            "mode": mode, "keras": keras["accuracy"], "tflite": lite["accuracy"],
            "onnx": onnx["accuracy"], "points_from_tflite": round(gap_lite, 3),
            "points_from_keras": round(gap_keras, 3),
            "bytes": {"tflite": lite["size_bytes"], "onnx": onnx["size_bytes"]},
            "p50_ms": {f"{kind}_{t}t": row[f"latency_{t}t"]["p50_ms"]
                       for kind, row in (("tflite", lite), ("onnx", onnx)) for t in (1, 2)},
            "litert_benchmark_p50_ms": {f"{t}t": (lite.get(f"litert_tool_{t}t") or {}).get("p50_ms")
                                        for t in (1, 2)},
            "met": gap_lite <= POINTS_TFLITE and gap_keras <= POINTS_KERAS})
    return {"recipe": recipe, "overrides": overrides, "figure": "test accuracy", "pairs": pairs,
            "table": table["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs, nothing written")
    args = parser.parse_args()
    quick = ["epochs=1", "data.count=400"] if args.quick else []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = [measure("demo", quick, ["none", "int8"], tmp)]
    if args.quick:
        print(json.dumps(results, default=str)[:3000])
        return
    met = all(p["met"] for r in results for p in r["pairs"])
    write("onnx_export", {
        "rule": f"met when every ONNX file's test figure is within {POINTS_TFLITE} points of the "
                f"TFLite file of its mode and within {POINTS_KERAS} point of Keras",
        "results": results, "target": "met" if met else "not met"})


if __name__ == "__main__":
    main()

"""Compression figures on ResNet-20 trained on the embedded shapes set, all from one run.

Trains ResNet-20 (recipe shapes_resnet20), exports it to TFLite in every quantize mode, makes
QAT, 80%-pruned, 2:4-pruned and 16-cluster runs from it with `compress`, exports those, and
measures every artifact with `tfkarpa.tasks.benchmark` (size, gzip size, accuracy on the test split
through each artifact's own runtime, batch-1 latency). The ratios the compression issue asks for
are computed from that one table.

    python benchmarks/compression.py          # writes benchmarks/results/compression.json (+ .md, .png)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from _common import RESULTS, write

from pipelines._cli import resolve_recipe
from tfkarpa import config, tasks
from tfkarpa.tasks import benchmark, export_run
from tfkarpa.tasks.classify.compress import compress_run


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "saved_models"
        cfg = config.build([resolve_recipe("shapes_resnet20")],
                           [f"runs_root={tmp}/runs", f"export_dir={out}/resnet20"])
        base = tasks.run(cfg, verbose=2)["run_dir"]
        export_run(base, ["tflite"], ["none", "fp16", "dynamic", "int8", "int8_full"], out)
        export_run(base, ["tflite"], ["int8"], out, per_channel=False)
        stages = {
            "qat": compress_run(base, ["qat=true", f"export_dir={out}"], verbose=2),
            "prune80": compress_run(base, ["prune.sparsity=0.8", "epochs=8", f"export_dir={out}"],
                                    verbose=2),
            "prune24": compress_run(base, ["prune.structure=2:4", f"export_dir={out}"], verbose=2),
            "cluster16": compress_run(base, ["cluster.clusters=16", f"export_dir={out}"], verbose=2),
        }
        for name, result in stages.items():
            modes = ["int8"] if name == "qat" else ["none", "int8"] if name == "prune80" else ["none"]
            export_run(result["run_dir"], ["tflite"], modes, out)
        export_run(stages["prune80"]["run_dir"], ["tflite"], ["int8"], out, per_channel=False)
        table = benchmark([str(out)], Path(tmp) / "bench", runs=200)
        for name in ("benchmark.md", "accuracy_vs_size.png"):
            shutil.copy(Path(tmp) / "bench" / name, RESULTS / f"compression_{name.split('.')[0]}.{name.split('.')[-1]}")

    rows = {r["artifact"].replace(".tflite", ""): r for r in table["rows"]}
    base_name = Path(base).name
    dense = rows[f"{base_name}.none"]

    def row(name):
        return rows[name]

    def lat(r):
        return r["latency_2t"]["p50_ms"]

    int8 = row(f"{base_name}.int8")
    int8_pt = row(f"{base_name}.int8-per-tensor")
    qat_int8 = row(f"{Path(stages['qat']['run_dir']).name}.int8")
    pruned = row(f"{Path(stages['prune80']['run_dir']).name}.none")
    pruned_int8 = row(f"{Path(stages['prune80']['run_dir']).name}.int8")
    pruned_int8_pt = row(f"{Path(stages['prune80']['run_dir']).name}.int8-per-tensor")
    figures = {
        "int8_size_over_float": int8["size_bytes"] / dense["size_bytes"],
        "int8_per_tensor_size_over_float": int8_pt["size_bytes"] / dense["size_bytes"],
        "int8_per_tensor_accuracy_drop_points": 100 * (dense["accuracy"] - int8_pt["accuracy"]),
        "int8_latency_2t_over_float": lat(int8) / lat(dense),
        "int8_accuracy_drop_points": 100 * (dense["accuracy"] - int8["accuracy"]),
        "qat_int8_accuracy_drop_points": 100 * (dense["accuracy"] - qat_int8["accuracy"]),
        "prune80_gzip_smaller_x": dense["gzip_bytes"] / pruned["gzip_bytes"],
        "prune80_accuracy_drop_points": 100 * (dense["accuracy"] - pruned["accuracy"]),
        "prune80_int8_gzip_smaller_x": dense["gzip_bytes"] / pruned_int8["gzip_bytes"],
        "prune80_int8_per_tensor_gzip_smaller_x": dense["gzip_bytes"] / pruned_int8_pt["gzip_bytes"],
        "prune80_int8_per_tensor_accuracy_drop_points": 100 * (dense["accuracy"] - pruned_int8_pt["accuracy"]),
    }
    targets = {
        "int8_size_over_float": ("<=", 0.27), "int8_latency_2t_over_float": ("<=", 0.45),
        "int8_per_tensor_size_over_float": ("<=", 0.27),
        "int8_per_tensor_accuracy_drop_points": ("<=", 1.0),
        "prune80_int8_per_tensor_gzip_smaller_x": (">=", 10.0),
        "prune80_int8_per_tensor_accuracy_drop_points": ("<=", 1.0),
        "int8_accuracy_drop_points": ("<=", 1.0), "qat_int8_accuracy_drop_points": ("<=", 0.5),
        "prune80_gzip_smaller_x": (">=", 3.0), "prune80_accuracy_drop_points": ("<=", 1.0),
        "prune80_int8_gzip_smaller_x": (">=", 10.0),
    }
    verdict = {k: (figures[k] <= t if op == "<=" else figures[k] >= t) for k, (op, t) in targets.items()}
    for k, v in figures.items():
        print(f"{k}: {v:.3f} (target {targets[k][0]} {targets[k][1]}: {'met' if verdict[k] else 'MISSED'})")
    write("compression", {
        "model": "resnet20 v1 on shapes 32x32 (recipe shapes_resnet20); compress defaults (5 epochs "
                 "at a tenth of the learning rate) except 8 epochs for 80% pruning",
        "reference": table["reference"], "figures": figures,
        "targets": {k: f"{op} {t}" for k, (op, t) in targets.items()}, "met": verdict,
        "table": table["rows"],
    })


if __name__ == "__main__":
    main()

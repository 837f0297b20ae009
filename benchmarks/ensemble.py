"""An ensemble of three seeds against its best member: accuracy, calibration, latency, size.

Issue (training techniques): `python -m pipelines ensemble RUN RUN RUN` makes one model of
several runs. Three ResNet-8 runs on digits (15 epochs, seeds 0-2, one split: data.seed=0) are
combined by mean and by vote; the test accuracy and ECE come from each run's own test report,
the size and batch-1 latency of each SavedModel from `python -m pipelines benchmark` over all of
them in one process (one table, so the latency ratios are measured side by side).

    python benchmarks/ensemble.py

Writes benchmarks/results/ensemble.json.
"""

from __future__ import annotations

import json
import tempfile

from _common import cli, write

MEMBER = ["data=digits", "data.seed=0", "model=resnet", "model.depth=8", "epochs=15"]
SEEDS = (0, 1, 2)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs, saved = {}, {}
        for seed in SEEDS:
            name = f"seed{seed}"
            r = cli("train", *MEMBER, f"seed={seed}", f"name={name}", f"runs_root={tmp}/runs",
                     f"export_dir={tmp}/sm/{name}")
            runs[name], saved[name] = r, r["artifacts"]["saved_model"]
            print(f"{name}: test accuracy {r['metrics']['test_accuracy']:.4f}", flush=True)
        members = [runs[f"seed{s}"]["run_dir"] for s in SEEDS]
        for method in ("mean", "vote"):
            name = f"ensemble_{method}"
            r = cli("ensemble", *members, f"method={method}", f"name={name}",
                     f"runs_root={tmp}/runs", f"export_dir={tmp}/sm/{name}")
            runs[name], saved[name] = r, r["artifacts"]["saved_model"]
            print(f"{name}: test accuracy {r['metrics']['test_accuracy']:.4f}", flush=True)
        table = cli("benchmark", *saved.values(), f"out={tmp}/bench", "runs=200")["rows"]
    by_path = {row["path"]: row for row in table}
    rows = {}
    for name, r in runs.items():
        bench = by_path[saved[name]]
        rows[name] = {"test_accuracy": round(r["metrics"]["test_accuracy"], 4),
                      "test_ece": round(r["metrics"]["test_ece"], 4),
                      "saved_model_bytes": bench["size_bytes"],
                      "latency_p50_ms": bench["latency_tf"]["p50_ms"],
                      "params": r["metrics"]["params"]}
    best = max((f"seed{s}" for s in SEEDS), key=lambda k: rows[k]["test_accuracy"])
    for name in ("ensemble_mean", "ensemble_vote"):
        row, ref = rows[name], rows[best]
        row["vs_best_member"] = {
            "accuracy_points": round(100 * (row["test_accuracy"] - ref["test_accuracy"]), 2),
            "ece_difference": round(row["test_ece"] - ref["test_ece"], 4),
            "latency_ratio": round(row["latency_p50_ms"] / ref["latency_p50_ms"], 2),
            "size_ratio": round(row["saved_model_bytes"] / ref["saved_model_bytes"], 2)}
    write("ensemble", {"benchmark": "ensemble", "best_member": best, "setup": {
        "members": " ".join(["python -m pipelines train", *MEMBER, "seed=S"]),
        "latency": "batch 1, SavedModel serving signature, TensorFlow's default threads, p50 of "
                   "200 runs, one benchmark process over every model"}, "rows": rows})
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

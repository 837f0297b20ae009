"""Federated training against centralised training on the same data and total epochs.

Target (issue: federated learning): on shapes, 10 clients with Dirichlet(0.3) label skew, the
better of FedAvg and FedProx within 3 points of centralised training's test accuracy, with the
same number of passes over the data: 30 rounds x 0.5 of the clients x 3 local epochs = 45
epochs' worth, against `train epochs=45`, both at batch 16 (the federate recipe's). Also: FedAdam, bytes per client and round, and
differential privacy at two noise levels with the epsilon each spends.

    python benchmarks/federated.py            # writes benchmarks/results/federated.json
    python benchmarks/federated.py --quick    # 6 rounds: a smoke run of the same cases

Every case is the CLI in a fresh process (`python -m pipelines federate|train ... --json`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=shapes", "model=small_cnn", "batch_size=16", "seed=0", "export=false"]
LOCAL_EPOCHS = 3  # the federate recipe's
FED = ["clients=10", "fraction=0.5", f"local_epochs={LOCAL_EPOCHS}", "partition=dirichlet:0.3"]
GAP_TARGET = 3.0  # points


def cases(rounds: int) -> dict[str, list[str]]:
    epochs = int(rounds * 0.5 * LOCAL_EPOCHS)
    fed = ["federate", *FED, f"rounds={rounds}"]
    return {
        "centralised": ["train", f"epochs={epochs}"],
        "fedavg": [*fed, "strategy.fl=fedavg"],
        "fedprox": [*fed, "strategy.fl=fedprox", "proximal_mu=0.01"],
        "fedadam": [*fed, "strategy.fl=fedadam", "server_lr=0.01"],
        "fedavg_dp_noise_0.1": [*fed, "dp.clip=1.0", "dp.noise=0.1"],
        "fedavg_dp_noise_0.5": [*fed, "dp.clip=1.0", "dp.noise=0.5"],
    }


def run_case(name: str, args: list[str], tmp: str) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipelines", *args, *COMMON,
                          f"run_dir={tmp}/{name}", "--json", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])["metrics"]
    row = {"command": " ".join(["python -m pipelines", *args, *COMMON]),
           "test_accuracy": round(m["test_accuracy"], 4), "fit_seconds": m["fit_seconds"],
           "wall_seconds": round(time.time() - started, 1), "params": m["params"]}
    for key in ("bytes_per_client_round", "epsilon", "delta", "final_val_accuracy"):
        if m.get(key) is not None:
            row[key] = m[key]
    print(f"{name:<22} test accuracy {row['test_accuracy']:.4f}  ({row['wall_seconds']} s)",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="6 rounds (a smoke run)")
    args = parser.parse_args()
    rounds = 6 if args.quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_case(name, a, tmp) for name, a in cases(rounds).items()}
    central = results["centralised"]["test_accuracy"]
    best = max(("fedavg", "fedprox"), key=lambda k: results[k]["test_accuracy"])
    gap = round(100 * (central - results[best]["test_accuracy"]), 2)
    summary = {"rounds": rounds, "centralised_epochs": int(rounds * 0.5 * LOCAL_EPOCHS),
               "better_of_fedavg_fedprox": best, "gap_points": gap,
               "gap_target_points": GAP_TARGET, "gap_met": gap <= GAP_TARGET}
    print(json.dumps(summary))
    if not args.quick:
        write("federated", {"cases": results, "summary": summary})


if __name__ == "__main__":
    main()
